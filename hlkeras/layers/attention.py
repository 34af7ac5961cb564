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

from hlkeras import _compat
from hlkeras import _validation
from hlkeras.layers.attention_ops import attention_mask_to_4d
from hlkeras.layers.attention_ops import dynamic_shape
from hlkeras.layers.attention_ops import masked_softmax
from hlkeras.layers.attention_ops import rotary_embedding
from hlkeras.layers.lora_dense import check_lora_arguments

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
    query = ops.transpose(ops.multiply(query, ops.cast(scale, query.dtype)), (0, 2, 1, 3))
    query = ops.reshape(query, (batch, num_kv_heads, group_size * query_length, key_dim))
    key = ops.transpose(key, (0, 2, 3, 1))
    value = ops.transpose(value, (0, 2, 1, 3))
    logits = ops.matmul(query, key)
    logits = ops.reshape(logits, (batch, num_heads, query_length, key_length))
    logits = ops.cast(logits, "float32")
    probabilities = ops.cast(masked_softmax(logits, mask, empty_rows="uniform"), value.dtype)
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


def check_value_and_key_shapes(value_shape, key_shape):
    """`value` and `key` agree on every axis but the features (unknown sizes
    agree with anything), at build and on every call of a built layer."""
    value_axes, key_axes = tuple(value_shape)[1:-1], tuple(key_shape)[1:-1]
    if len(value_axes) != len(key_axes) or any(
        v is not None and k is not None and v != k for v, k in zip(value_axes, key_axes)
    ):
        raise ValueError(
            "All dimensions of `value` and `key`, except the last one, must be "
            f"equal. Received: value_shape={tuple(value_shape)} and "
            f"key_shape={tuple(key_shape)}"
        )


@keras.saving.register_keras_serializable(package="hlkeras")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention: `keras.layers.MultiHeadAttention` plus GQA, RoPE
    and a faster core.

    A subclass of `keras.layers.MultiHeadAttention` with its constructor
    arguments, defaults, call signature, weights (names, shapes, order) and
    overridable methods (`_compute_attention`, `_compute_attention_mask`,
    `_build_attention`, ...), so existing code switches by changing the import,
    `set_weights(keras_layer.get_weights())` gives the same outputs, and
    `model.quantize("int8")` and `query_dense.enable_lora(r)` work as on the
    Keras layer. On top of it:
    - grouped-query attention: `num_kv_heads < num_heads` query heads share
      each key/value head (Ainslie et al., 2023); `num_kv_heads=1` is
      multi-query attention. The weights are laid out like
      `keras.layers.GroupQueryAttention`'s, so its weights load too;
    - rotary position embeddings on queries and keys (`rope=True`);
    - self-attention (`value is query`, `key` omitted or the same tensor)
      fuses the query, key and value projections into one matmul;
    - the attention core measured fastest on the backend
      (`default_attention_core()`), which shares key/value heads without
      copying them;
    - `causal=True`, a causal mask on every call;
    - `lora_rank`: Keras' own LoRA (`EinsumDense.enable_lora`) on the query,
      key, value and output projections, every other weight frozen (the
      LoRA protocol of `hlkeras.lora`).

    Args:
        num_heads: Positive int, number of query heads.
        key_dim: Positive int, size of each query and key head.
        value_dim: Positive int, size of each value head. Defaults to
            `key_dim`.
        dropout: Float in [0, 1), dropout on the attention probabilities.
        use_bias: Whether the projections have biases.
        output_shape: Optional int or tuple, the output's trailing shape.
            Defaults to the query's feature size.
        attention_axes: Optional int or tuple, the axes attention runs over.
            Defaults to all axes but batch, heads and features.
        sliding_window: Optional positive int: each query attends only to keys
            within `sliding_window - 1` positions.
        flash_attention: `None` (Keras' global setting), `True` or `False`;
            `True` always uses `keras.ops.dot_product_attention` with flash.
        kernel_initializer, bias_initializer: Initializers of the projections.
        kernel_regularizer, bias_regularizer, activity_regularizer:
            Regularizers of the projections' weights and outputs.
        kernel_constraint, bias_constraint: Constraints of the projections.
        use_gate: Whether a sigmoid gate from the query scales the attention
            output (gated attention).
        seed: Optional int seed for the attention dropout.
        num_kv_heads: Positive int dividing `num_heads`, number of key/value
            heads. Defaults to `num_heads` (standard multi-head attention).
        causal: Whether every call masks the future (query `t` sees keys
            `<= t`). A call can also ask for it with `use_causal_mask=True`.
        rope: Whether to rotate the projected queries and keys by their
            position (rotary embeddings). Needs an even `key_dim` and inputs
            `(batch, length, features)`.
        rope_max_wavelength: Positive int, the longest rotary wavelength.
        attention_core: `"einsum"`, `"dot_product_attention"` or `None` (the
            faster one measured for the backend, `default_attention_core()`).
            Attention dropout in training, `return_attention_scores=True` and
            `value_dim != key_dim` always use the einsum core.
        lora_rank: Optional positive int, the rank of LoRA adapters on the
            four projections. Usually set by `hlkeras.lora.apply_lora`.
        lora_alpha: Optional number > 0, the adapters' strength (`scale =
            lora_alpha / lora_rank`). Defaults to `lora_rank`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        query: Tensor `(batch, T, query_features)`.
        value: Tensor `(batch, S, value_features)`.
        key: Optional tensor `(batch, S, key_features)`; defaults to `value`.
        query_mask, value_mask, key_mask: Optional boolean padding masks
            `(batch, T)` / `(batch, S)`. Keras fills them from the inputs'
            Keras masks; you rarely pass them yourself.
        attention_mask: Optional boolean mask, `True` where a query may attend
            to a key: `(batch, T, S)`, broadcastable over batch and heads.
        return_attention_scores: If `True`, also return the attention
            probabilities `(batch, num_heads, T, S)`.
        training: Python boolean, enables attention dropout.
        use_causal_mask: Whether this call masks the future (in addition to
            `causal`).

    Returns:
        The attention output `(batch, T, *output_shape)`, and the attention
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
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        flash_attention=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        use_gate=False,
        seed=None,
        *,
        num_kv_heads=None,
        causal=False,
        rope=False,
        rope_max_wavelength=10000,
        attention_core=None,
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        weight_options = {
            name: _validation.check_weight_option(name, value)
            for name, value in (
                ("kernel_initializer", kernel_initializer),
                ("bias_initializer", bias_initializer),
                ("kernel_regularizer", kernel_regularizer),
                ("bias_regularizer", bias_regularizer),
                ("activity_regularizer", activity_regularizer),
                ("kernel_constraint", kernel_constraint),
                ("bias_constraint", bias_constraint),
            )
        }
        super().__init__(
            num_heads,
            key_dim,
            value_dim=value_dim,
            dropout=_validation.check_rate("dropout", dropout),
            use_bias=use_bias,
            output_shape=output_shape,
            attention_axes=attention_axes,
            sliding_window=sliding_window,
            flash_attention=flash_attention,
            use_gate=use_gate,
            seed=seed,
            **weight_options,
            **kwargs,
        )
        self.num_kv_heads = check_num_kv_heads(num_kv_heads, num_heads)
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
        self.attention_core = (
            None
            if attention_core is None
            else _validation.check_choice("attention_core", attention_core, ATTENTION_CORES)
        )
        check_lora_arguments(lora_rank, lora_alpha, 0.0)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha

    def build(self, query_shape, value_shape, key_shape=None):
        """Keras' build, with `num_kv_heads` key and value heads."""
        key_shape = value_shape if key_shape is None else key_shape
        check_value_and_key_shapes(value_shape, key_shape)
        for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            if len(shape) < 3 or shape[-1] is None:
                raise ValueError(
                    f"Argument `{name}` must have a shape (batch, length, "
                    "features), or more axes before the features, with known "
                    f"features. Received: {name}.shape={tuple(shape)}"
                )
        self._built_features = {
            "query": query_shape[-1],
            "value": value_shape[-1],
            "key": key_shape[-1],
        }
        if self.rope and len(query_shape) != 3:
            raise ValueError(
                "With `rope=True`, the inputs must be sequences (batch, "
                f"length, features). Received: query_shape={tuple(query_shape)}"
            )
        # The same creation order as Keras: query, key, gate, value, output.
        self._query_dense = self._heads_projection(
            query_shape, self.num_heads, self.key_dim, "query"
        )
        self._key_dense = self._heads_projection(key_shape, self.num_kv_heads, self.key_dim, "key")
        if self._use_gate:
            self._gate_dense = self._heads_projection(
                query_shape, self.num_heads, self.value_dim, "gate", activation="sigmoid"
            )
        self._value_dense = self._heads_projection(
            value_shape, self.num_kv_heads, self.value_dim, "value"
        )
        self._build_attention(len(query_shape) + 1)
        self._output_dense = self._make_output_dense(
            query_shape, self._get_common_kwargs_for_sublayer(), "attention_output"
        )
        self._output_dense.build(tuple(query_shape[:-1]) + (self.num_heads, self.value_dim))
        if self.lora_rank is not None:
            self._enable_lora_adapters()

    def _heads_projection(self, input_shape, heads, head_dim, name, activation=None):
        """`EinsumDense` from `(..., features)` to `(..., heads, head_dim)`,
        Keras' projection equation (`abc,cde->abde` for sequences)."""
        letters = "abcdefghijklmnopqrstuvwxyz"
        rank = len(input_shape)
        free, bound, new = letters[: rank - 1], letters[rank - 1], letters[rank : rank + 2]
        dense = keras.layers.EinsumDense(
            f"{free}{bound},{bound}{new}->{free}{new}",
            output_shape=[None] * (rank - 2) + [heads, head_dim],
            bias_axes=new if self._use_bias else None,
            activation=activation,
            name=name,
            **self._get_common_kwargs_for_sublayer(),
        )
        dense.build(input_shape)
        return dense

    def _enable_lora_adapters(self):
        """Keras' LoRA on the four projections; every other weight frozen,
        so that only the adapters train (the LoRA protocol)."""
        projections = (self._query_dense, self._key_dense, self._value_dense, self._output_dense)
        for dense in projections:
            dense.enable_lora(self.lora_rank, lora_alpha=self.lora_alpha)
        adapters = {id(w) for d in projections for w in (d.lora_kernel_a, d.lora_kernel_b)}
        for variable in self.weights:
            if id(variable) not in adapters:
                variable.trainable = False

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
        """Keras' `call` (the same masks, hooks and fast causal path) with
        the fused self-attention projection and rotary embeddings."""
        is_self_attention = value is query and (key is None or key is value)
        key = value if key is None else key
        use_causal_mask = use_causal_mask or self.causal
        self._check_call_inputs(query, value, key, attention_mask)
        if query_mask is None:
            query_mask = _compat.get_keras_mask(query)
        for tensor in (query, value, key):
            # Keras clears the inputs' masks: the layer handles them itself.
            _compat.set_keras_mask(tensor, None)
        causal_only = (
            use_causal_mask
            and query_mask is None
            and value_mask is None
            and key_mask is None
            and attention_mask is None
            and self._sliding_window is None
            # A subclass's own `_compute_attention` may not know the flag.
            and type(self)._compute_attention is MultiHeadAttention._compute_attention
        )
        if causal_only:
            attention_mask = None
        else:
            attention_mask = self._compute_attention_mask(
                query,
                value,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                use_causal_mask=use_causal_mask,
            )
        gate = self._gate_dense(query) if self._use_gate else None
        query, key, value = self._project(query, key, value, is_self_attention)
        if self.rope:
            query = rotary_embedding(query, self.rope_max_wavelength)
            key = rotary_embedding(key, self.rope_max_wavelength)
        attention_output, attention_scores = self._compute_attention(
            query,
            key,
            value,
            attention_mask,
            training,
            return_attention_scores,
            **({"use_causal_mask": True} if causal_only else {}),
        )
        if gate is not None:
            attention_output = ops.multiply(attention_output, gate)
        attention_output = self._output_dense(attention_output)
        if query_mask is not None:
            _compat.set_keras_mask(attention_output, query_mask)
        if return_attention_scores:
            return attention_output, attention_scores
        return attention_output

    def _check_call_inputs(self, query, value, key, attention_mask):
        """What Keras would only report from deep inside a backend."""
        for name, tensor in (("query", query), ("value", value), ("key", key)):
            if tensor.shape[-1] != self._built_features[name]:
                raise ValueError(
                    f"Argument `{name}` has {tensor.shape[-1]} features but "
                    f"this layer's `{name}` projection was built for "
                    f"{self._built_features[name]}; a built layer cannot "
                    f"project other sizes. Received: {name}.shape={tuple(tensor.shape)}"
                )
        check_value_and_key_shapes(value.shape, key.shape)
        if attention_mask is not None and len(query.shape) == 3:
            attention_mask_to_4d(
                attention_mask, (query.shape[0], self.num_heads, query.shape[1], value.shape[1])
            )

    def _project(self, query, key, value, is_self_attention):
        """The query, key and value heads: one fused matmul for self-attention
        with float kernels, else each `EinsumDense` (which also runs
        quantized kernels)."""
        projections = (self._query_dense, self._key_dense, self._value_dense)
        if is_self_attention and all(dense.quantization_mode is None for dense in projections):
            return self._project_fused(query, projections)
        return tuple(dense(x) for dense, x in zip(projections, (query, key, value)))

    def _project_fused(self, inputs, projections):
        # `dense.kernel` is the merged kernel when LoRA is enabled, so the
        # adapters train through this path too.
        kernels = [ops.cast(dense.kernel, self.compute_dtype) for dense in projections]
        fused = ops.matmul(
            inputs,
            ops.concatenate([ops.reshape(k, (k.shape[0], -1)) for k in kernels], axis=-1),
        )
        if self._use_bias:
            fused = fused + ops.concatenate(
                [ops.reshape(ops.cast(d.bias, self.compute_dtype), (-1,)) for d in projections],
                axis=0,
            )
        widths = [math.prod(k.shape[1:]) for k in kernels]
        # One split, not three slices: torch's slice backward writes each
        # gradient into a zero tensor of the full fused width.
        parts = ops.split(fused, [widths[0], widths[0] + widths[1]], axis=-1)
        leading = dynamic_shape(inputs)[:-1]
        return tuple(
            ops.reshape(part, leading + tuple(kernel.shape[1:]))
            for part, kernel in zip(parts, kernels)
        )

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        """Keras' override point, on projected heads `(B, T, N, H)`; `key`
        and `value` may have `num_kv_heads` heads."""
        if len(query.shape) != 4:
            # Attention over several axes: Keras' einsum formulation, which
            # needs as many key/value heads as query heads.
            return super()._compute_attention(
                query,
                self._repeat_kv_heads(key),
                self._repeat_kv_heads(value),
                attention_mask,
                training,
                return_attention_scores,
                use_causal_mask,
            )
        if self._flash_attention and return_attention_scores:
            raise ValueError(
                "Returning attention scores is not supported when flash "
                "attention is enabled. Please disable flash attention to access"
                " attention scores."
            )
        use_dropout = self._dropout > 0.0 and bool(training)
        fused = not (return_attention_scores or use_dropout or self.value_dim != self.key_dim) and (
            self._flash_attention or self._core() == "dot_product_attention"
        )
        if use_causal_mask and (attention_mask is not None or not fused):
            causal = self._compute_causal_mask(query, key)
            attention_mask = (
                causal
                if attention_mask is None
                else ops.logical_and(ops.cast(attention_mask, "bool"), causal)
            )
            use_causal_mask = False
        mask = None
        if attention_mask is not None:
            logits_shape = (query.shape[0], self.num_heads, query.shape[1], key.shape[1])
            mask = attention_mask_to_4d(attention_mask, logits_shape)
        if fused:
            return self._fused_kernel_attention(query, key, value, mask, use_causal_mask), None
        return einsum_attention(
            query,
            key,
            value,
            mask,
            self._inverse_sqrt_key_dim,
            self._dropout_layer if use_dropout else None,
            training,
        )

    def _core(self):
        return self.attention_core or default_attention_core()

    def _repeat_kv_heads(self, heads):
        repeats = self.num_heads // self.num_kv_heads
        return heads if repeats == 1 else ops.repeat(heads, repeats, axis=-2)

    def _fused_kernel_attention(self, query, key, value, mask, is_causal):
        if self.num_kv_heads == 1 and self.num_heads > 1:
            # Backends repeat kv heads only when there are several of them.
            key, value = self._repeat_kv_heads(key), self._repeat_kv_heads(value)
        return ops.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            scale=self._inverse_sqrt_key_dim,
            is_causal=is_causal,
            flash_attention=self._flash_attention,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_kv_heads": self.num_kv_heads,
                "causal": self.causal,
                "rope": self.rope,
                "rope_max_wavelength": self.rope_max_wavelength,
                "attention_core": self.attention_core,
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
            }
        )
        return config
