"""`LoRADense`: a frozen `Dense` plus a trainable low-rank adapter (LoRA).

Keras' own `Dense.enable_lora` rebuilds the full kernel `W + scale * A @ B`
on every forward pass, which costs O(d_in * units * rank) per step and makes
the backward pass go through a full-size kernel gradient. `LoRADense` keeps
the adapter factored, `x @ W + scale * (x @ A) @ B`, so a training step costs
only the frozen matmul plus two thin ones (Hu et al., 2021).
"""

import math

import keras
from keras import ops

from hlkeras import _validation
from hlkeras.layers.weight_options import WeightOptions


def check_alpha(alpha, name="alpha", rank_name="rank"):
    """`alpha` is None (meaning `rank`) or a number > 0."""
    if alpha is None:
        return None
    if not _validation.is_number(alpha) or not alpha > 0:
        raise ValueError(
            f"Argument `{name}` must be a number > 0, or None to use `{rank_name}`. "
            f"Received: {name}={alpha!r}"
        )
    return alpha


def check_lora_arguments(lora_rank, lora_alpha, lora_dropout):
    """Checks the `lora_rank` / `lora_alpha` / `lora_dropout` arguments of a
    layer that follows the LoRA protocol (see ARCHITECTURE.md)."""
    if lora_rank is not None:
        _validation.check_positive_int("lora_rank", lora_rank)
    check_alpha(lora_alpha, name="lora_alpha", rank_name="lora_rank")
    _validation.check_rate("lora_dropout", lora_dropout)


def lora_scale(rank, alpha=None, rslora=False):
    """The adapter's output scale: `alpha / rank`, or `alpha / sqrt(rank)`
    with rank-stabilized LoRA (Kalajdzievski, 2023). `alpha` defaults to `rank`."""
    alpha = rank if alpha is None else alpha
    return alpha / (math.sqrt(rank) if rslora else rank)


@keras.saving.register_keras_serializable(package="hlkeras")
class LoRADense(keras.layers.Layer):
    """Densely-connected layer with a frozen base and a low-rank adapter.

    Computes `activation(x @ kernel + bias + scale * (dropout(x) @ A) @ B)`.
    `kernel` and `bias` are frozen (non-trainable); only the adapter
    `A` (`d_in x rank`, Kaiming-uniform) and `B` (`rank x units`, zeros) train.
    Because `B` starts at zero, a fresh adapter leaves the outputs unchanged.
    The product `A @ B` is never formed in the forward pass, so a training
    step costs the frozen matmul plus two thin `rank`-wide ones.

    `scale` is `alpha / rank`, or `alpha / sqrt(rank)` with `rslora=True`.
    Usually a `LoRADense` is made from a trained `Dense` by
    `hlkeras.lora.apply_lora`, which copies the trained kernel and bias in;
    `merged()` turns it back into a plain `keras.layers.Dense`.

    Args:
        units: Positive int, the output feature size.
        rank: Positive int, the adapter rank. At build it must be
            `<= min(d_in, units)`.
        alpha: Number > 0, the adapter strength. Defaults to `rank`, i.e.
            `scale = 1` (or `sqrt(rank)` with `rslora=True`).
        dropout: Float in [0, 1), dropout on the adapter's input only.
        activation: Name of a Keras activation, or None for linear.
        use_bias: Whether the (frozen) base has a bias.
        rslora: Scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`,
            and the Keras weight arguments `kernel_initializer`,
            `bias_initializer`, `kernel_regularizer`, `bias_regularizer`,
            `kernel_constraint`, `bias_constraint` (the adapters `A` and `B`
            take `kernel_regularizer` too, as in Keras' LoRA) and
            `activity_regularizer`.

    Call arguments:
        inputs: Tensor of shape `(batch, ..., d_in)`.
        training: Python boolean, enables the adapter dropout.

    Example:

    >>> layer = LoRADense(4, rank=2)
    >>> x = keras.ops.ones((3, 5))
    >>> y = layer(x)
    >>> [w.name for w in layer.trainable_weights]
    ['lora_kernel_a', 'lora_kernel_b']
    >>> dense = layer.merged()
    >>> bool(keras.ops.all(keras.ops.abs(dense(x) - y) < 1e-6))
    True
    """

    def __init__(
        self,
        units,
        *,
        rank=8,
        alpha=None,
        dropout=0.0,
        activation=None,
        use_bias=True,
        rslora=False,
        **kwargs,
    ):
        weight_options = WeightOptions.pop(kwargs)
        super().__init__(**kwargs)
        self.weight_options = weight_options
        self.units = _validation.check_positive_int("units", units)
        self.rank = _validation.check_positive_int("rank", rank)
        self.alpha = check_alpha(alpha)
        self.dropout = _validation.check_rate("dropout", dropout)
        self.activation = activation
        self.activation_fn = keras.activations.get(
            _validation.check_activation("activation", activation)
        )
        self.use_bias = bool(use_bias)
        self.rslora = bool(rslora)
        self.scale = lora_scale(self.rank, self.alpha, self.rslora)
        self.adapter_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.supports_masking = True

    def build(self, input_shape):
        _validation.check_min_rank("LoRADense", input_shape, 2)
        input_dim = _validation.check_feature_dim("LoRADense", input_shape)
        if self.rank > min(input_dim, self.units):
            raise ValueError(
                f"LoRADense '{self.name}': argument `rank` must be <= "
                f"min(d_in, units) = min({input_dim}, {self.units}); a larger "
                f"rank adds weights but no expressive power. "
                f"Received: rank={self.rank}"
            )
        # The base is created frozen: `layer.trainable = True` only flips
        # variables created trainable, so it can never unfreeze the base.
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            trainable=False,
            **self.weight_options.weight("kernel", "glorot_uniform"),
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                trainable=False,
                **self.weight_options.weight("bias", "zeros"),
            )
        adapter_regularizer = self.weight_options.weight("kernel", None)["regularizer"]
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a",
            shape=(input_dim, self.rank),
            initializer="he_uniform",
            regularizer=adapter_regularizer,
        )
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b",
            shape=(self.rank, self.units),
            initializer="zeros",
            regularizer=adapter_regularizer,
        )

    @property
    def adapter_weights(self):
        """The adapter variables `[A, B]`: all that `fit` updates."""
        return [self.lora_kernel_a, self.lora_kernel_b]

    def call(self, inputs, training=None):
        adapter_inputs = inputs
        if self.dropout > 0.0:
            adapter_inputs = self.adapter_dropout(inputs, training=training)
        # Scale the thin (..., rank) activation, not the (..., units) one.
        low_rank = ops.matmul(adapter_inputs, self.lora_kernel_a) * self.scale
        outputs = ops.add(ops.matmul(inputs, self.kernel), ops.matmul(low_rank, self.lora_kernel_b))
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation_fn is not None:
            outputs = self.activation_fn(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def merged_kernel(self):
        """The NumPy kernel `W + scale * A @ B` of the equivalent `Dense`."""
        kernel = ops.convert_to_numpy(self.kernel).astype("float64")
        a = ops.convert_to_numpy(self.lora_kernel_a).astype("float64")
        b = ops.convert_to_numpy(self.lora_kernel_b).astype("float64")
        # Summed in float64 so the merge adds no rounding beyond the final cast.
        return (kernel + self.scale * (a @ b)).astype(self.kernel.dtype)

    def merged(self):
        """Returns a plain built `keras.layers.Dense` with the merged kernel.

        It has the same name, dtype policy, activation and bias, and gives
        the same outputs as this layer at inference.
        """
        if not self.built:
            raise ValueError(
                f"LoRADense '{self.name}' must be built before `merged()`: "
                "call it on an input first."
            )
        dense = keras.layers.Dense(
            self.units,
            activation=self.activation,
            use_bias=self.use_bias,
            dtype=self.dtype_policy,
            name=self.name,
            **self.weight_options.sublayer(),
        )
        dense.build((None, self.kernel.shape[0]))
        values = [self.merged_kernel()]
        if self.bias is not None:
            values.append(ops.convert_to_numpy(self.bias))
        dense.set_weights(values)
        return dense

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "rank": self.rank,
                "alpha": self.alpha,
                "dropout": self.dropout,
                "activation": self.activation,
                "use_bias": self.use_bias,
                "rslora": self.rslora,
                **self.weight_options.get_config(),
            }
        )
        return config


def dense_or_lora(layer, units, name, activation=None, use_bias=True, kernel_initializer=None):
    """A `Dense` projection of `layer`, or a `LoRADense` when its `lora_rank`
    is set, with the layer's weight arguments (`layer.weight_options`;
    `kernel_initializer` is the layer's default). Both create `kernel` then
    `bias` first, so `hlkeras.lora` can line up the plain and adapted weights
    (the LoRA protocol)."""
    common = {
        "activation": activation,
        "use_bias": use_bias,
        "dtype": layer.dtype_policy,
        "name": name,
        **layer.weight_options.sublayer(kernel_initializer or "glorot_uniform"),
    }
    if layer.lora_rank is None:
        return keras.layers.Dense(units, **common)
    return LoRADense(
        units,
        rank=layer.lora_rank,
        alpha=layer.lora_alpha,
        dropout=layer.lora_dropout,
        **common,
    )
