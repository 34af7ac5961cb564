"""The pre-LayerNorm `TransformerBlock` and its dense `FeedForward` sublayer
(the layout of KerasHub's `TransformerEncoder` with `normalize_first=True`)."""

import keras

from hlkeras import _validation
from hlkeras.layers.attention import MultiHeadAttention
from hlkeras.layers.attention import check_num_kv_heads
from hlkeras.layers.lora_dense import check_lora_arguments
from hlkeras.layers.lora_dense import dense_or_lora
from hlkeras.layers.moe import MixtureOfExperts
from hlkeras.layers.residual import DropPath
from hlkeras.layers.weight_options import WeightOptions


@keras.saving.register_keras_serializable(package="hlkeras")
class FeedForward(keras.layers.Layer):
    """The position-wise MLP of a Transformer: `Dense(ffn_units, activation)`,
    dropout, then `Dense` back to the input width.

    Args:
        ffn_units: Positive int, the hidden width.
        activation: Name of a Keras activation for the hidden layer.
        dropout: Float in [0, 1), dropout on the hidden activations.
        lora_rank: Optional positive int. When set, both projections are
            `hlkeras.layers.LoRADense` with rank-`lora_rank` adapters.
            Usually set by `hlkeras.lora.apply_lora`.
        lora_alpha: Optional number > 0, the adapters' strength. Defaults to
            `lora_rank`.
        lora_dropout: Float in [0, 1), dropout on the adapters' inputs.
        lora_dora: With `lora_rank`, weight-decomposed adapters (DoRA,
            `LoRADense(dora=True)`). Set by `apply_lora(..., dora=True)`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`,
            and the Keras weight arguments `kernel_initializer`,
            `bias_initializer`, `kernel_regularizer`, `bias_regularizer`,
            `kernel_constraint`, `bias_constraint` (for every kernel and bias
            of the layer; an initializer left unset keeps the layer's
            default) and `activity_regularizer`.

    Call arguments:
        inputs: Tensor `(batch, ..., d)`.
        training: Python boolean, enables dropout.

    Example:

    >>> tuple(FeedForward(64)(keras.ops.ones((2, 5, 16))).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        ffn_units,
        *,
        activation="gelu",
        dropout=0.0,
        lora_rank=None,
        lora_alpha=None,
        lora_dropout=0.0,
        lora_dora=False,
        **kwargs,
    ):
        weight_options = WeightOptions.pop(kwargs)
        super().__init__(**kwargs)
        self.weight_options = weight_options
        self.ffn_units = _validation.check_positive_int("ffn_units", ffn_units)
        self.activation = _validation.check_activation("activation", activation)
        self.dropout = _validation.check_rate("dropout", dropout)
        check_lora_arguments(lora_rank, lora_alpha, lora_dropout)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_dora = bool(lora_dora)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = _validation.check_feature_dim("FeedForward", input_shape)
        policy = self.dtype_policy
        self.hidden_dense = dense_or_lora(
            self,
            self.ffn_units,
            "hidden_dense",
            self.activation,
            kernel_initializer=_validation.kernel_initializer_for(self.activation),
        )
        self.hidden_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.output_dense = dense_or_lora(self, input_dim, "output_dense")
        self.hidden_dense.build(input_shape)
        self.output_dense.build(tuple(input_shape[:-1]) + (self.ffn_units,))

    def call(self, inputs, training=None):
        hidden = self.hidden_dropout(
            self.hidden_dense(inputs, training=training), training=training
        )
        return self.output_dense(hidden, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "ffn_units": self.ffn_units,
                "activation": self.activation,
                "dropout": self.dropout,
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "lora_dora": self.lora_dora,
                **self.weight_options.get_config(),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="hlkeras")
class TransformerBlock(keras.layers.Layer):
    """Pre-LayerNorm Transformer block for sequences `(batch, length, d)`.

    Computes `x = x + drop_path(dropout(MHA(LN(x))))`, then
    `x = x + drop_path(dropout(FFN(LN(x))))` (Xiong et al., 2020), with
    self-attention from `hlkeras.layers.MultiHeadAttention` and the
    `FeedForward` MLP. Padding masks propagate to the attention and to the
    output.

    Args:
        num_heads: Positive int, number of attention heads.
        ffn_units: Positive int, hidden width of the feed-forward network.
        key_dim: Positive int, size of each attention head. Defaults to
            `d // num_heads`, which then must divide exactly.
        num_kv_heads: Positive int dividing `num_heads`, for grouped-query
            attention. Defaults to `num_heads`.
        dropout: Float in [0, 1): attention-probability dropout, FFN hidden
            dropout and dropout on both branch outputs.
        drop_path: Float in [0, 1), stochastic-depth rate of both branches.
        causal: Whether the attention masks the future.
        rope: Whether the attention rotates queries and keys by their
            positions (rotary position embeddings), so the block needs no
            position embedding and takes any length.
        activation: Name of a Keras activation for the FFN.
        num_experts: Int >= 0. With `num_experts > 0` the FFN is a sparse
            `MixtureOfExperts` with `num_experts` experts of hidden width
            `ffn_units`; its auxiliary losses reach `model.losses`.
        top_k: Positive int <= `num_experts`, experts per token when
            `num_experts > 0`.
        capacity_factor: Expert capacity factor of the `MixtureOfExperts`
            (`None`: dropless).
        lora_rank: Optional positive int. When set, the attention's Q, K, V
            and output projections and both `FeedForward` projections are
            `hlkeras.layers.LoRADense` with rank-`lora_rank` adapters, and
            the LayerNorms are frozen, so only the adapters train. With
            `num_experts > 0` the FFN is a `MixtureOfExperts(lora_rank=...)`
            instead: per-expert adapters, the router frozen. Usually set by
            `hlkeras.lora.apply_lora`.
        lora_alpha: Optional number > 0, the adapters' strength. Defaults to
            `lora_rank`.
        lora_dropout: Float in [0, 1), dropout on the adapters' inputs.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`,
            and the Keras weight arguments `kernel_initializer`,
            `bias_initializer`, `kernel_regularizer`, `bias_regularizer`,
            `kernel_constraint`, `bias_constraint` (for every kernel and bias
            of the layer; an initializer left unset keeps the layer's
            default) and `activity_regularizer`.

    Call arguments:
        inputs: Tensor `(batch, length, d)`, optionally with a Keras padding
            mask.
        training: Python boolean, enables dropout and drop path.

    Example:

    >>> tokens = keras.Input(shape=(None, 32))
    >>> block = TransformerBlock(4, 64, dropout=0.1, causal=True)
    >>> keras.Model(tokens, block(tokens)).output_shape
    (None, None, 32)
    """

    def __init__(
        self,
        num_heads,
        ffn_units,
        *,
        key_dim=None,
        num_kv_heads=None,
        dropout=0.0,
        drop_path=0.0,
        causal=False,
        rope=False,
        activation="gelu",
        num_experts=0,
        top_k=2,
        capacity_factor=1.25,
        lora_rank=None,
        lora_alpha=None,
        lora_dropout=0.0,
        **kwargs,
    ):
        weight_options = WeightOptions.pop(kwargs)
        super().__init__(**kwargs)
        self.weight_options = weight_options
        self.num_heads = _validation.check_positive_int("num_heads", num_heads)
        self.ffn_units = _validation.check_positive_int("ffn_units", ffn_units)
        self.key_dim = (
            None if key_dim is None else _validation.check_positive_int("key_dim", key_dim)
        )
        self.num_kv_heads = check_num_kv_heads(num_kv_heads, num_heads)
        self.dropout = _validation.check_rate("dropout", dropout)
        self.drop_path = _validation.check_rate("drop_path", drop_path)
        self.causal = bool(causal)
        self.rope = bool(rope)
        self.activation = _validation.check_activation("activation", activation)
        if not _validation.is_int(num_experts) or num_experts < 0:
            raise ValueError(
                "Argument `num_experts` must be an integer >= 0 (0 means a "
                f"dense FFN). Received: num_experts={num_experts!r}"
            )
        self.num_experts = num_experts
        self.top_k = _validation.check_positive_int("top_k", top_k)
        self.capacity_factor = capacity_factor
        check_lora_arguments(lora_rank, lora_alpha, lora_dropout)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        if num_experts:
            # Built now so that MoE argument errors surface at construction.
            self._build_ffn()
        self.supports_masking = True

    def build(self, input_shape):
        _validation.check_sequence_shape("inputs", input_shape)
        model_dim = input_shape[-1]
        key_dim = self.key_dim
        if key_dim is None:
            if model_dim % self.num_heads:
                raise ValueError(
                    "Argument `num_heads` must divide the input feature size "
                    "when `key_dim` is not given (key_dim = d // num_heads). "
                    f"Received: num_heads={self.num_heads}, input feature "
                    f"size d={model_dim}"
                )
            key_dim = model_dim // self.num_heads
        policy = self.dtype_policy
        # With adapters only they train (the LoRA protocol): norms frozen.
        norms_train = self.lora_rank is None
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=1e-5, dtype=policy, trainable=norms_train, name="attention_norm"
        )
        self.attention = MultiHeadAttention(
            self.num_heads,
            key_dim,
            num_kv_heads=self.num_kv_heads,
            dropout=self.dropout,
            causal=self.causal,
            rope=self.rope,
            dtype=policy,
            name="attention",
            # Keras' LoRA on the attention projections has no dropout.
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            **self.weight_options.given(),
        )
        self.ffn_norm = keras.layers.LayerNormalization(
            epsilon=1e-5, dtype=policy, trainable=norms_train, name="ffn_norm"
        )
        self.ffn = self._build_ffn()
        self.attention_output_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.ffn_output_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.attention_drop_path = DropPath(self.drop_path, dtype=policy)
        self.ffn_drop_path = DropPath(self.drop_path, dtype=policy)
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ffn_norm.build(input_shape)
        self.ffn.build(input_shape)

    def _lora_arguments(self):
        return {
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
        }

    def _build_ffn(self):
        """The feed-forward sublayer `(..., d) -> (..., d)`: a dense
        `FeedForward`, or a sparse `MixtureOfExperts` when `num_experts > 0`."""
        if self.num_experts:
            return MixtureOfExperts(
                self.num_experts,
                self.ffn_units,
                top_k=self.top_k,
                capacity_factor=self.capacity_factor,
                activation=self.activation,
                dropout=self.dropout,
                dtype=self.dtype_policy,
                # The block's name prefixes the routing metrics, so each
                # MoE layer of a model shows its own in the `fit` logs.
                name=f"{self.name}_moe",
                # Its experts take per-expert adapters (no adapter dropout).
                lora_rank=self.lora_rank,
                lora_alpha=self.lora_alpha,
                **self.weight_options.given(),
            )
        return FeedForward(
            self.ffn_units,
            activation=self.activation,
            dropout=self.dropout,
            dtype=self.dtype_policy,
            name="ffn",
            **self._lora_arguments(),
            **self.weight_options.given(),
        )

    def call(self, inputs, training=None, mask=None):
        normed = self.attention_norm(inputs)
        branch = self.attention(
            normed,
            normed,
            query_mask=mask,
            value_mask=mask,
            training=training,
        )
        branch = self.attention_output_dropout(branch, training=training)
        x = inputs + self.attention_drop_path(branch, training=training)
        branch = self.ffn(self.ffn_norm(x), training=training)
        branch = self.ffn_output_dropout(branch, training=training)
        return x + self.ffn_drop_path(branch, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "ffn_units": self.ffn_units,
                "key_dim": self.key_dim,
                "num_kv_heads": self.num_kv_heads,
                "dropout": self.dropout,
                "drop_path": self.drop_path,
                "causal": self.causal,
                "rope": self.rope,
                "activation": self.activation,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "capacity_factor": self.capacity_factor,
                **self._lora_arguments(),
                **self.weight_options.get_config(),
            }
        )
        return config
