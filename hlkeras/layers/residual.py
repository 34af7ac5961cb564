"""Residual building blocks: `ResidualBlock` (vectors), `ConvResidualBlock`
(NHWC images) and `DropPath` (stochastic depth on a residual branch)."""

import math

import keras
from keras import ops

from hlkeras import _validation
from hlkeras.layers.lora_dense import check_lora_arguments
from hlkeras.layers.lora_dense import dense_or_lora
from hlkeras.layers.weight_options import WeightOptions

NORMS = ("layer", "batch", None)


@keras.saving.register_keras_serializable(package="hlkeras")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample.

    In training, each sample's branch output is zeroed with probability `rate`
    and the survivors are scaled by `1 / (1 - rate)`, so the expected output is
    unchanged. At inference the layer is the identity. Use it on the branch
    only, before the residual addition (Huang et al., 2016).

    Args:
        rate: Float in [0, 1). Probability of dropping a sample's branch.
        seed: Optional integer seed for the drop mask.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: Tensor of shape `(batch, ...)`: the residual branch.
        training: Python boolean. Drops only when `True`.

    Example:

    >>> x = keras.ops.ones((4, 3))
    >>> drop = DropPath(0.5, seed=1)
    >>> bool(keras.ops.all(drop(x, training=False) == x))
    True
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _validation.check_rate("rate", rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        self.built = True

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep_prob = 1.0 - self.rate
        # One draw per sample, broadcast over every other axis.
        mask_shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        uniform = keras.random.uniform(mask_shape, seed=self.seed_generator, dtype="float32")
        keep_mask = ops.cast(uniform < keep_prob, inputs.dtype)
        return inputs * keep_mask / ops.cast(keep_prob, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config


def _make_norm(norm, dtype, name, trainable=True):
    if norm == "layer":
        return keras.layers.LayerNormalization(
            epsilon=1e-5, dtype=dtype, name=name, trainable=trainable
        )
    if norm == "batch":
        return keras.layers.BatchNormalization(dtype=dtype, name=name, trainable=trainable)
    return None


@keras.saving.register_keras_serializable(package="hlkeras")
class ResidualBlock(keras.layers.Layer):
    """Pre-norm MLP residual block for inputs `(..., d)`.

    Computes `shortcut(x) + drop_path(dense_2(dropout(act(dense_1(norm(x))))))`.
    The shortcut is the identity when `d == units` and a learned linear
    projection (no bias) otherwise. `dense_1` uses He-normal initialization for
    relu-family activations and Glorot-uniform otherwise.

    Args:
        units: Positive int, the output feature size.
        hidden_units: Positive int, the width of the inner layer. Defaults to
            `units`.
        activation: Name of a Keras activation for the inner layer.
        norm: `"layer"`, `"batch"` or `None`: the normalization applied to the
            branch input (pre-norm).
        dropout: Float in [0, 1), dropout on the inner activations.
        drop_path: Float in [0, 1), stochastic-depth rate of the branch.
        lora_rank: Optional positive int. When set, `hidden_dense` and
            `output_dense` are `hlkeras.layers.LoRADense` with
            rank-`lora_rank` adapters, and the norm and the shortcut
            projection are frozen, so only the adapters train (a frozen
            `BatchNormalization` runs in inference mode, as Keras' transfer
            learning guide recommends). Usually set by
            `hlkeras.lora.apply_lora`.
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
        inputs: Tensor of shape `(batch, ..., d)`.
        training: Python boolean, enables dropout and drop path.

    Example:

    >>> inputs = keras.Input(shape=(16,))
    >>> outputs = ResidualBlock(32, hidden_units=64, dropout=0.1)(inputs)
    >>> keras.Model(inputs, outputs).output_shape
    (None, 32)
    """

    def __init__(
        self,
        units,
        *,
        hidden_units=None,
        activation="relu",
        norm="layer",
        dropout=0.0,
        drop_path=0.0,
        lora_rank=None,
        lora_alpha=None,
        lora_dropout=0.0,
        lora_dora=False,
        **kwargs,
    ):
        weight_options = WeightOptions.pop(kwargs)
        super().__init__(**kwargs)
        self.weight_options = weight_options
        check_lora_arguments(lora_rank, lora_alpha, lora_dropout)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_dora = bool(lora_dora)
        self.units = _validation.check_positive_int("units", units)
        self.hidden_units = (
            None
            if hidden_units is None
            else _validation.check_positive_int("hidden_units", hidden_units)
        )
        self.activation = _validation.check_activation("activation", activation)
        self.norm = _validation.check_choice("norm", norm, NORMS)
        self.dropout = _validation.check_rate("dropout", dropout)
        self.drop_path = _validation.check_rate("drop_path", drop_path)
        self.supports_masking = True

    def build(self, input_shape):
        _validation.check_min_rank("ResidualBlock", input_shape, 2)
        input_dim = _validation.check_feature_dim("ResidualBlock", input_shape)
        policy = self.dtype_policy
        # With adapters only they train (the LoRA protocol).
        base_trains = self.lora_rank is None
        self.branch_norm = _make_norm(self.norm, policy, "branch_norm", trainable=base_trains)
        self.hidden_dense = dense_or_lora(
            self,
            self.hidden_units or self.units,
            "hidden_dense",
            activation=self.activation,
            kernel_initializer=_validation.kernel_initializer_for(self.activation),
        )
        self.hidden_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.output_dense = dense_or_lora(self, self.units, "output_dense")
        self.branch_drop_path = DropPath(self.drop_path, dtype=policy)
        self.shortcut = None
        if input_dim != self.units:
            self.shortcut = keras.layers.Dense(
                self.units,
                use_bias=False,
                dtype=policy,
                name="shortcut",
                trainable=base_trains,
                **self.weight_options.sublayer(),
            )
            self.shortcut.build(input_shape)
        if self.branch_norm is not None:
            self.branch_norm.build(input_shape)
        self.hidden_dense.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.hidden_dense.units,)
        self.output_dense.build(hidden_shape)

    def call(self, inputs, training=None):
        branch = inputs
        if self.branch_norm is not None:
            branch = self.branch_norm(branch, training=training)
        branch = self.hidden_dense(branch, training=training)  # adapter dropout
        branch = self.hidden_dropout(branch, training=training)
        branch = self.output_dense(branch, training=training)
        branch = self.branch_drop_path(branch, training=training)
        shortcut = inputs if self.shortcut is None else self.shortcut(inputs)
        return shortcut + branch

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "hidden_units": self.hidden_units,
                "activation": self.activation,
                "norm": self.norm,
                "dropout": self.dropout,
                "drop_path": self.drop_path,
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "lora_dora": self.lora_dora,
                **self.weight_options.get_config(),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="hlkeras")
class ConvResidualBlock(keras.layers.Layer):
    """ResNet block for NHWC images, with BatchNorm.

    The basic block is `conv3x3 → BN → act → conv3x3 → BN`; the bottleneck
    block is `conv1x1 → BN → act → conv3x3 → BN → act → conv1x1 → BN` with an
    inner width of `filters // 4` (the basic block's is `filters`; both can
    be set with `inner_filters`, which is how structured pruning narrows a
    block). The output is
    `act(shortcut(x) + drop_path(branch(x)))`, where the shortcut is the
    identity, or a strided 1x1 convolution with BatchNorm when the spatial size
    or the channel count changes (He et al., 2016). The output always has
    `filters` channels.

    Args:
        filters: Positive int, output channels. With `bottleneck=True` and
            no `inner_filters` it must be divisible by 4.
        strides: Positive int, the stride of the 3x3 convolution (and of the
            projection shortcut).
        bottleneck: Whether to use the 1x1-3x3-1x1 bottleneck branch.
        activation: Name of a Keras activation.
        drop_path: Float in [0, 1), stochastic-depth rate of the branch.
        inner_filters: Positive int, the channels between the branch's
            convolutions. Defaults to `filters` (basic) or `filters // 4`
            (bottleneck).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`,
            and the Keras weight arguments `kernel_initializer`,
            `bias_initializer`, `kernel_regularizer`, `bias_regularizer`,
            `kernel_constraint`, `bias_constraint` (for every kernel and bias
            of the layer; an initializer left unset keeps the layer's
            default) and `activity_regularizer`.

    Call arguments:
        inputs: Tensor of shape `(batch, height, width, channels)`.
        training: Python boolean, for BatchNorm statistics and drop path.

    Example:

    >>> inputs = keras.Input(shape=(8, 8, 3))
    >>> outputs = ConvResidualBlock(16, strides=2)(inputs)
    >>> keras.Model(inputs, outputs).output_shape
    (None, 4, 4, 16)
    """

    def __init__(
        self,
        filters,
        *,
        strides=1,
        bottleneck=False,
        activation="relu",
        drop_path=0.0,
        inner_filters=None,
        **kwargs,
    ):
        weight_options = WeightOptions.pop(kwargs)
        super().__init__(**kwargs)
        self.weight_options = weight_options
        self.filters = _validation.check_positive_int("filters", filters)
        self.strides = _validation.check_positive_int("strides", strides)
        self.inner_filters = (
            None
            if inner_filters is None
            else _validation.check_positive_int("inner_filters", inner_filters)
        )
        if bottleneck and inner_filters is None and filters % 4:
            raise ValueError(
                "With `bottleneck=True`, argument `filters` must be divisible "
                f"by 4 (the inner width is filters // 4). Received: filters={filters}"
            )
        self.bottleneck = bool(bottleneck)
        self.activation = _validation.check_activation("activation", activation)
        self.drop_path = _validation.check_rate("drop_path", drop_path)

    def _conv(self, filters, kernel_size, strides, name):
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            dtype=self.dtype_policy,
            name=name,
            **self.weight_options.sublayer(_validation.kernel_initializer_for(self.activation)),
        )

    def _batch_norm(self, name):
        return keras.layers.BatchNormalization(dtype=self.dtype_policy, name=name)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "ConvResidualBlock expects 4D NHWC inputs "
                "(batch, height, width, channels). "
                f"Received input_shape={tuple(input_shape)}"
            )
        in_channels = _validation.check_feature_dim("ConvResidualBlock", input_shape)
        if self.bottleneck:
            inner = self.inner_filters or self.filters // 4
            convs = [
                self._conv(inner, 1, 1, "conv_reduce"),
                self._conv(inner, 3, self.strides, "conv_spatial"),
                self._conv(self.filters, 1, 1, "conv_expand"),
            ]
        else:
            convs = [
                self._conv(self.inner_filters or self.filters, 3, self.strides, "conv_1"),
                self._conv(self.filters, 3, 1, "conv_2"),
            ]
        self.branch_convs = convs
        self.branch_norms = [self._batch_norm(f"bn_{i + 1}") for i in range(len(convs))]
        self.activation_fn = keras.layers.Activation(
            self.activation, dtype=self.dtype_policy, name="activation"
        )
        self.branch_drop_path = DropPath(self.drop_path, dtype=self.dtype_policy)
        self.shortcut_conv = self.shortcut_norm = None
        if self.strides != 1 or in_channels != self.filters:
            self.shortcut_conv = self._conv(self.filters, 1, self.strides, "shortcut")
            self.shortcut_norm = self._batch_norm("shortcut_bn")
            self.shortcut_conv.build(input_shape)
            self.shortcut_norm.build(self.compute_output_shape(input_shape))
        shape = tuple(input_shape)
        for conv, norm in zip(self.branch_convs, self.branch_norms):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            norm.build(shape)

    def call(self, inputs, training=None):
        branch = inputs
        last = len(self.branch_convs) - 1
        for i, (conv, norm) in enumerate(zip(self.branch_convs, self.branch_norms)):
            branch = norm(conv(branch), training=training)
            if i < last:
                branch = self.activation_fn(branch)
        branch = self.branch_drop_path(branch, training=training)
        shortcut = inputs
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_norm(self.shortcut_conv(inputs), training=training)
        return self.activation_fn(shortcut + branch)

    def compute_output_shape(self, input_shape):
        def strided(size):
            return None if size is None else math.ceil(size / self.strides)

        batch, height, width, _ = input_shape
        return (batch, strided(height), strided(width), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "strides": self.strides,
                "bottleneck": self.bottleneck,
                "activation": self.activation,
                "drop_path": self.drop_path,
                "inner_filters": self.inner_filters,
                **self.weight_options.get_config(),
            }
        )
        return config
