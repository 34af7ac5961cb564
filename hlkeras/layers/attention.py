"""`MultiHeadAttention`: a drop-in for `keras.layers.MultiHeadAttention` with
grouped-query attention, rotary position embeddings and a fused QKV
projection, and its attention cores.

The attention core is one of two implementations, a per-layer choice
(`MultiHeadAttention(attention_core=...)`, serialized with the layer) whose
default, `None`, takes `default_attention_core()`:
- `"dot_product_attention"`: `keras.ops.dot_product_attention`, the backend's
  fused kernel: SDPA on torch, flash/cuDNN through
  `jax.nn.dot_product_attention` on a JAX GPU or TPU;
- `"einsum"`: head-major batched matmuls and a float32 softmax, written so
  grouped-query attention never copies the key/value heads.
On CPU the default per backend is `DEFAULT_ATTENTION_CORE`, measured by
`benchmarks/attention.py` (forward + backward, jit where the backend has it).
The einsum core also serves the cases the fused kernel cannot: attention
dropout in training, `return_attention_scores=True` and
`value_dim != key_dim`.
"""

import functools
import math

import keras
from keras import ops

from hlkeras import _validation
from hlkeras.layers.attention_ops import MASKED_LOGIT
from hlkeras.layers.attention_ops import and_masks
from hlkeras.layers.attention_ops import attention_mask_to_4d
from hlkeras.layers.attention_ops import causal_mask
from hlkeras.layers.attention_ops import dynamic_shape
from hlkeras.layers.attention_ops import padding_mask
from hlkeras.layers.attention_ops import rotary_embedding
from hlkeras.layers.lora import LoRADense
from hlkeras.layers.lora import check_lora_arguments
from hlkeras.layers.lora import dense_or_lora

# The faster core on CPU, measured with `benchmarks/attention.py`, which
# prints both cores' ratios in every run. On JAX CPU, XLA runs
# `jax.nn.dot_product_attention` as the same einsums but with a
# time-major layout, which measured 10-20% slower.
DEFAULT_ATTENTION_CORE = {
    "tensorflow": "einsum",
    "jax": "einsum",
    "torch": "dot_product_attention",
}
ATTENTION_CORES = ("einsum", "dot_product_attention")


def default_attention_core():
    """The attention core for the active backend and device.

    On a JAX GPU or TPU the fused kernel (cuDNN / splash flash attention) is
    the fast path; everywhere else it is `DEFAULT_ATTENTION_CORE[backend]`.
    """
    backend = keras.backend.backend()
    if backend == "jax" and _jax_has_accelerator():
        return "dot_product_attention"
    return DEFAULT_ATTENTION_CORE[backend]


@functools.cache
def _jax_has_accelerator():
    return not keras.distribution.list_devices()[0].lower().startswith("cpu")


def einsum_attention(query, key, value, mask, scale, dropout_layer=None, training=None):
    """Grouped scaled dot-product attention with a float32 softmax.

    Args:
        query: `(batch, T, num_heads, key_dim)`.
        key: `(batch, S, num_kv_heads, key_dim)`.
        value: `(batch, S, num_kv_heads, value_dim)`.
        mask: Optional boolean mask broadcastable to `(batch, num_heads, T, S)`.
        scale: Python float multiplied into the logits.
        dropout_layer: Optional dropout applied to the probabilities.
        training: Passed to `dropout_layer`.

    Returns:
        `(output, probabilities)`: output `(batch, T, num_heads, value_dim)`
        and the attention probabilities `(batch, num_heads, T, S)` before
        dropout.
    """
    batch, query_length, num_heads, key_dim = dynamic_shape(query)
    key_length, num_kv_heads = ops.shape(key)[1], key.shape[2]
    group_size = num_heads // num_kv_heads
    # Query heads k*G .. k*G+G-1 share kv head k. Head-major layout lets each
    # kv head serve its G query heads as G*T rows of one matmul, so K and V
    # are never repeated.
    query = ops.transpose(query * ops.cast(scale, query.dtype), (0, 2, 1, 3))
    query = ops.reshape(query, (batch, num_kv_heads, group_size * query_length, key_dim))
    key = ops.transpose(key, (0, 2, 3, 1))
    value = ops.transpose(value, (0, 2, 1, 3))
    logits = ops.matmul(query, key)
    logits = ops.reshape(logits, (batch, num_heads, query_length, key_length))
    logits = ops.cast(logits, "float32")
    if mask is not None:
        logits = ops.where(mask, logits, MASKED_LOGIT)
    probabilities = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
    dropped = probabilities
    if dropout_layer is not None:
        dropped = dropout_layer(probabilities, training=training)
    dropped = ops.reshape(dropped, (batch, num_kv_heads, group_size * query_length, key_length))
    output = ops.matmul(dropped, value)
    output = ops.reshape(output, (batch, num_heads, query_length, value.shape[-1]))
    return ops.transpose(output, (0, 2, 1, 3)), probabilities


def check_num_kv_heads(num_kv_heads, num_heads):
    if num_kv_heads is None:
        return num_heads
    _validation.check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            "Argument `num_kv_heads` must divide `num_heads` (each key/value "
            f"head serves num_heads // num_kv_heads query heads). "
            f"Received: num_kv_heads={num_kv_heads}, num_heads={num_heads}"
        )
    return num_kv_heads


@keras.saving.register_keras_serializable(package="hlkeras")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention: a faster drop-in for `keras.layers.MultiHeadAttention`.

    It takes the call signature of `keras.layers.MultiHeadAttention`, so
    existing code switches by changing the import, and adds:
    - grouped-query attention: `num_kv_heads < num_heads` query heads share
      each key/value head (Ainslie et al., 2023); `num_kv_heads=1` is
      multi-query attention;
    - rotary position embeddings on queries and keys (`rope=True`);
    - self-attention (`value is query`, `key` omitted or the same tensor)
      fuses the query, key and value projections into one matmul. The
      projections stay three named `Dense` sublayers (`query_dense`,
      `key_dense`, `value_dense`), so self- and cross-attention use the same
      weights.

    The inputs are sequences `(batch, length, features)`. Keras padding masks
    (e.g. from `Embedding(mask_zero=True)`) are honoured exactly as Keras
    does: no query attends to a padded key, and the output carries the
    query's mask.

    Args:
        num_heads: Positive int, number of query heads.
        key_dim: Positive int, size of each query and key head.
        num_kv_heads: Positive int dividing `num_heads`, number of key/value
            heads. Defaults to `num_heads` (standard multi-head attention).
        value_dim: Positive int, size of each value head. Defaults to
            `key_dim`.
        output_dim: Positive int, the output feature size. Defaults to the
            query's feature size.
        dropout: Float in [0, 1), dropout on the attention probabilities.
        use_bias: Whether the projections have biases.
        causal: Whether every call masks the future (query `t` sees keys
            `<= t`). A call can also ask for it with `use_causal_mask=True`.
        rope: Whether to apply rotary position embeddings to the projected
            queries and keys. Needs an even `key_dim`.
        rope_max_wavelength: Positive int, the longest rotary wavelength.
        seed: Optional int seed for the attention dropout.
        attention_core: `"einsum"`, `"dot_product_attention"` or `None` (the
            faster one measured for the backend, `default_attention_core()`).
            Attention dropout, `return_attention_scores=True` and
            `value_dim != key_dim` always use the einsum core.
        lora_rank: Optional positive int. When set, the query, key, value
            and output projections are `hlkeras.layers.LoRADense` (frozen
            base, trainable rank-`lora_rank` adapter) and the fused QKV
            matmul is not used. Usually set by `hlkeras.lora.apply_lora`.
        lora_alpha: Optional number > 0, the adapters' strength (`scale =
            lora_alpha / lora_rank`). Defaults to `lora_rank`.
        lora_dropout: Float in [0, 1), dropout on the adapters' inputs.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        query: Tensor `(batch, T, query_features)`.
        value: Tensor `(batch, S, value_features)`.
        key: Optional tensor `(batch, S, key_features)`; defaults to `value`.
        query_mask, value_mask, key_mask: Optional boolean padding masks
            `(batch, T)` / `(batch, S)`. Keras fills them from the inputs'
            Keras masks; you rarely pass them yourself.
        attention_mask: Optional boolean mask, `True` where a query may attend
            to a key, broadcastable to `(batch, num_heads, T, S)`: shape
            `(batch, T, S)`, `(T, S)` or rank 4.
        return_attention_scores: If `True`, also return the attention
            probabilities `(batch, num_heads, T, S)`.
        training: Python boolean, enables attention dropout.
        use_causal_mask: Whether this call masks the future (in addition to
            `causal`).

    Returns:
        The attention output `(batch, T, output_dim)`, and the attention
        probabilities if `return_attention_scores=True`.

    Example:

    >>> tokens = keras.Input(shape=(None, 32))
    >>> attention = MultiHeadAttention(8, 4, num_kv_heads=2, rope=True)
    >>> keras.Model(tokens, attention(tokens, tokens)).output_shape
    (None, None, 32)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        *,
        num_kv_heads=None,
        value_dim=None,
        output_dim=None,
        dropout=0.0,
        use_bias=True,
        causal=False,
        rope=False,
        rope_max_wavelength=10000,
        seed=None,
        lora_rank=None,
        lora_alpha=None,
        lora_dropout=0.0,
        attention_core=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.attention_core = (
            None
            if attention_core is None
            else _validation.check_choice("attention_core", attention_core, ATTENTION_CORES)
        )
        self.num_heads = _validation.check_positive_int("num_heads", num_heads)
        self.key_dim = _validation.check_positive_int("key_dim", key_dim)
        self.num_kv_heads = check_num_kv_heads(num_kv_heads, num_heads)
        self.value_dim = (
            self.key_dim
            if value_dim is None
            else _validation.check_positive_int("value_dim", value_dim)
        )
        self.output_dim = (
            None if output_dim is None else _validation.check_positive_int("output_dim", output_dim)
        )
        self.dropout = _validation.check_rate("dropout", dropout)
        self.use_bias = bool(use_bias)
        self.causal = bool(causal)
        self.rope = bool(rope)
        if self.rope and key_dim % 2:
            raise ValueError(
                "With `rope=True`, argument `key_dim` must be even (rotary "
                "embeddings rotate pairs of features). "
                f"Received: key_dim={key_dim}"
            )
        self.rope_max_wavelength = _validation.check_positive_int(
            "rope_max_wavelength", rope_max_wavelength
        )
        self.seed = seed
        check_lora_arguments(lora_rank, lora_alpha, lora_dropout)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.supports_masking = True

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            _validation.check_sequence_shape(name, shape)
        if tuple(value_shape[:-1]) != tuple(key_shape[:-1]):
            raise ValueError(
                "Arguments `value` and `key` must have the same batch and "
                f"sequence sizes. Received: value.shape={tuple(value_shape)}, "
                f"key.shape={tuple(key_shape)}"
            )
        self.query_dense = self._projection(self.num_heads * self.key_dim, "query")
        self.key_dense = self._projection(self.num_kv_heads * self.key_dim, "key")
        self.value_dense = self._projection(self.num_kv_heads * self.value_dim, "value")
        self.output_dense = self._projection(self.output_dim or query_shape[-1], "attention_output")
        self.attention_dropout = keras.layers.Dropout(
            self.dropout, seed=self.seed, dtype=self.dtype_policy
        )
        self.query_dense.build(query_shape)
        self.key_dense.build(key_shape)
        self.value_dense.build(value_shape)
        self.output_dense.build(tuple(query_shape[:-1]) + (self.num_heads * self.value_dim,))

    def _projection(self, units, name):
        """Every projection is made here: a `Dense`, whose `kernel` and
        `bias` `call` reads directly, or a `LoRADense` (with `lora_rank`),
        which `call` calls so that its adapter applies."""
        return dense_or_lora(self, units, name, use_bias=self.use_bias)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        is_self_attention = value is query and (key is None or key is value)
        key = value if key is None else key
        self._check_call_features(query, value, key)
        # With adapters each projection runs its own LoRADense, unfused.
        if is_self_attention and self.lora_rank is None:
            query_heads, key_heads, value_heads = self._project_self(query)
        else:
            query_heads, key_heads, value_heads = self._project_cross(query, key, value, training)
        if self.rope:
            query_heads = rotary_embedding(query_heads, self.rope_max_wavelength)
            key_heads = rotary_embedding(key_heads, self.rope_max_wavelength)

        is_causal = self.causal or use_causal_mask
        logits_shape = (query.shape[0], self.num_heads, query.shape[1], value.shape[1])
        explicit_mask = and_masks(
            padding_mask(query_mask, value_mask, key_mask),
            None if attention_mask is None else attention_mask_to_4d(attention_mask, logits_shape),
        )
        use_dropout = bool(training) and self.dropout > 0.0
        if (
            return_attention_scores
            or use_dropout
            # JAX's fused kernel needs value heads as wide as key heads.
            or self.value_dim != self.key_dim
            or (self.attention_core or default_attention_core()) == "einsum"
        ):
            if is_causal:
                explicit_mask = and_masks(
                    explicit_mask,
                    causal_mask(ops.shape(query)[1], ops.shape(value)[1]),
                )
            attended, scores = einsum_attention(
                query_heads,
                key_heads,
                value_heads,
                explicit_mask,
                1.0 / math.sqrt(self.key_dim),
                self.attention_dropout if use_dropout else None,
                training,
            )
        else:
            attended = self._fused_kernel_attention(
                query_heads, key_heads, value_heads, explicit_mask, is_causal
            )
            scores = None
        attended = ops.reshape(
            attended,
            dynamic_shape(query)[:2] + (self.num_heads * self.value_dim,),
        )
        output = self._apply_dense(self.output_dense, attended, training)
        if return_attention_scores:
            return output, scores
        return output

    def _fused_kernel_attention(self, query, key, value, mask, is_causal):
        if is_causal and mask is not None:
            # Backends differ in how they combine `is_causal` with a mask;
            # one explicit mask means the same thing everywhere.
            mask = ops.logical_and(mask, causal_mask(ops.shape(query)[1], ops.shape(key)[1]))
            is_causal = False
        if self.num_kv_heads == 1 and self.num_heads > 1:
            # Backends repeat kv heads only when there are several of them.
            key = ops.repeat(key, self.num_heads, axis=2)
            value = ops.repeat(value, self.num_heads, axis=2)
        return ops.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            scale=1.0 / math.sqrt(self.key_dim),
            is_causal=is_causal,
        )

    def _project_self(self, inputs):
        """Q, K and V heads of one input from a single fused matmul."""
        projections = (self.query_dense, self.key_dense, self.value_dense)
        kernel = ops.concatenate([self._kernel_of(dense) for dense in projections], axis=-1)
        fused = ops.matmul(inputs, kernel)
        if self.use_bias:
            fused = fused + ops.concatenate(
                [self._bias_of(dense) for dense in projections], axis=-1
            )
        query_size = self.num_heads * self.key_dim
        key_size = self.num_kv_heads * self.key_dim
        # One split, not three slices: torch's slice backward writes each
        # gradient into a zero tensor of the full fused width.
        query, key, value = ops.split(fused, [query_size, query_size + key_size], axis=-1)
        return (
            self._split_heads(query, self.num_heads, self.key_dim),
            self._split_heads(key, self.num_kv_heads, self.key_dim),
            self._split_heads(value, self.num_kv_heads, self.value_dim),
        )

    def _project_cross(self, query, key, value, training=None):
        return (
            self._split_heads(
                self._apply_dense(self.query_dense, query, training),
                self.num_heads,
                self.key_dim,
            ),
            self._split_heads(
                self._apply_dense(self.key_dense, key, training),
                self.num_kv_heads,
                self.key_dim,
            ),
            self._split_heads(
                self._apply_dense(self.value_dense, value, training),
                self.num_kv_heads,
                self.value_dim,
            ),
        )

    def _apply_dense(self, dense, inputs, training=None):
        if isinstance(dense, LoRADense):
            return dense(inputs, training=training)
        outputs = ops.matmul(inputs, self._kernel_of(dense))
        if self.use_bias:
            outputs = outputs + self._bias_of(dense)
        return outputs

    def _kernel_of(self, dense):
        return ops.cast(dense.kernel, self.compute_dtype)

    def _bias_of(self, dense):
        return ops.cast(dense.bias, self.compute_dtype)

    @staticmethod
    def _split_heads(x, heads, head_dim):
        return ops.reshape(x, dynamic_shape(x)[:2] + (heads, head_dim))

    def _check_call_features(self, query, value, key):
        built_features = {
            "query": self.query_dense.kernel.shape[0],
            "value": self.value_dense.kernel.shape[0],
            "key": self.key_dense.kernel.shape[0],
        }
        for name, tensor in (("query", query), ("value", value), ("key", key)):
            _validation.check_sequence_shape(name, tensor.shape)
            if tensor.shape[-1] != built_features[name]:
                raise ValueError(
                    f"Argument `{name}` has {tensor.shape[-1]} features but "
                    f"this layer's `{name}` projection was built for "
                    f"{built_features[name]}; a built layer cannot project "
                    f"other sizes. Received: {name}.shape={tuple(tensor.shape)}"
                )
        if (
            value.shape[1] is not None
            and key.shape[1] is not None
            and (value.shape[1] != key.shape[1])
        ):
            raise ValueError(
                "Arguments `value` and `key` must have the same sequence "
                f"length. Received: value.shape={tuple(value.shape)}, "
                f"key.shape={tuple(key.shape)}"
            )

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        return tuple(query_shape[:-1]) + (self.output_dim or query_shape[-1],)

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        output = keras.KerasTensor(
            self.compute_output_shape(query.shape, value.shape),
            dtype=self.compute_dtype,
        )
        if not return_attention_scores:
            return output
        scores_shape = (query.shape[0], self.num_heads, query.shape[1], value.shape[1])
        return output, keras.KerasTensor(scores_shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "num_kv_heads": self.num_kv_heads,
                "value_dim": self.value_dim,
                "output_dim": self.output_dim,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "causal": self.causal,
                "rope": self.rope,
                "rope_max_wavelength": self.rope_max_wavelength,
                "seed": self.seed,
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "attention_core": self.attention_core,
            }
        )
        return config
