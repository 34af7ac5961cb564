"""`LoRADense`: a frozen `Dense` plus a trainable low-rank adapter (LoRA).

Keras' own `Dense.enable_lora` rebuilds the full kernel `W + scale * A @ B`
on every forward pass, which costs O(d_in * units * rank) per step and makes
the backward pass go through a full-size kernel gradient. `LoRADense` keeps
the adapter factored, `x @ W + scale * (x @ A) @ B`, so a training step costs
only the frozen matmul plus two thin ones (Hu et al., 2021).

With `dora=True` it is DoRA (Liu et al., 2024): the adapted kernel
`V = W + scale * A @ B` is split into a direction `V / ||V||_c` (column
norms, one per output unit) and a trainable magnitude `m`, so the layer
computes `(x @ W + scale * (x @ A) @ B) * m / ||V||_c`. `||V||_c` is
computed from `W`, `A`, `B` without forming `A @ B` (see
`LoRADense.direction_norm`).
"""

import math

import keras
import numpy as np
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

    With `dora=True` (DoRA, Liu et al. 2024) the output is
    `activation((x @ kernel + scale * (dropout(x) @ A) @ B) * m / ||V||_c + bias)`
    with `V = kernel + scale * A @ B` and `||V||_c` its per-output-unit column
    norm. The magnitude `m` (`units`, trainable) starts at `||kernel||_c`, so
    a fresh adapter still changes nothing. As in the paper (section 4.3) and
    peft, `||V||_c` is treated as a constant in the backward pass: the
    gradient reaches `m`, `A` and `B` through the numerator only. The norm
    costs `O(d_in * units * rank)` per step (one `kernel^T @ A` product),
    the same order as the two thin adapter matmuls for one `d_in`-row batch,
    and no `(d_in, units)` temporary.
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
        dora: Weight-decomposed LoRA: also train a magnitude per output
            unit (see above). With adapter dropout the dropped inputs reach
            only the adapter path, as without DoRA.
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
        dora=False,
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
        self.dora = bool(dora)
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
        self.lora_magnitude = self.kernel_norm_squared = None
        if self.dora:
            self.lora_magnitude = self.add_weight(
                name="lora_magnitude",
                shape=(self.units,),
                initializer=lambda shape, dtype: ops.cast(
                    ops.sqrt(self._kernel_norm_squared()), dtype
                ),
            )
            # The frozen kernel's squared column norms, kept so that a step
            # does not read the whole kernel a second time to recompute them.
            self.kernel_norm_squared = self.add_weight(
                name="lora_kernel_norm_squared",
                shape=(self.units,),
                trainable=False,
                initializer=lambda shape, dtype: ops.cast(self._kernel_norm_squared(), dtype),
            )

    def _kernel_norm_squared(self):
        return ops.sum(ops.square(ops.convert_to_tensor(self.kernel)), axis=0)

    def reset_magnitude(self):
        """Sets the DoRA magnitude to the kernel's column norms (and the kept
        squared norms to match the kernel), so the layer computes
        `x @ kernel` again while `B` is zero. `apply_lora` calls it after
        copying a trained kernel in; call it after assigning a kernel."""
        norm_squared = self._kernel_norm_squared()
        self.kernel_norm_squared.assign(norm_squared)
        self.lora_magnitude.assign(ops.sqrt(norm_squared))

    @property
    def adapter_weights(self):
        """The adapter variables `[A, B]` (with DoRA also the magnitude and
        the kept kernel norms): what `fit` updates and adapter files hold."""
        if self.dora:
            return [
                self.lora_kernel_a,
                self.lora_kernel_b,
                self.lora_magnitude,
                self.kernel_norm_squared,
            ]
        return [self.lora_kernel_a, self.lora_kernel_b]

    def direction_norm(self, a_t_kernel=None):
        """`||kernel + scale * A @ B||` per output unit, without forming `A @ B`:
        `||V_j||^2 = ||W_j||^2 + 2 s (A^T W)_j . B_j + s^2 B_j^T (A^T A) B_j`.

        Args:
            a_t_kernel: `A^T @ kernel`, `(rank, units)`, when the caller has
                it already (`call` gets it from the same matmul as
                `x @ kernel`).
        """
        a, b = self.lora_kernel_a, self.lora_kernel_b
        if a_t_kernel is None:
            a_t_kernel = ops.matmul(ops.transpose(a), self.kernel)
        cross = ops.sum(a_t_kernel * b, axis=0)
        quadratic = ops.sum(ops.matmul(ops.matmul(ops.transpose(a), a), b) * b, axis=0)
        squared = self.kernel_norm_squared + 2 * self.scale * cross
        return ops.sqrt(squared + self.scale**2 * quadratic)

    def _kernel_products(self, inputs):
        """`(inputs @ kernel, A^T @ kernel)` from one matmul: A's `rank`
        columns ride along with the input rows, so the kernel is read once per
        step (at small batches, reading it is what a step costs)."""
        flat = ops.reshape(inputs, (-1, ops.shape(inputs)[-1]))
        # No gradient flows into the norm, so none through these rows.
        a_t = ops.stop_gradient(ops.transpose(self.lora_kernel_a))
        products = ops.matmul(
            ops.concatenate([flat, ops.cast(a_t, flat.dtype)], axis=0), self.kernel
        )
        base = ops.reshape(products[: -self.rank], (*ops.shape(inputs)[:-1], self.units))
        return base, products[-self.rank :]

    def call(self, inputs, training=None):
        adapter_inputs = inputs
        if self.dropout > 0.0:
            adapter_inputs = self.adapter_dropout(inputs, training=training)
        # Scale the thin (..., rank) activation, not the (..., units) one.
        low_rank = ops.matmul(adapter_inputs, self.lora_kernel_a) * self.scale
        if self.dora:
            base, a_t_kernel = self._kernel_products(inputs)
        else:
            base = ops.matmul(inputs, self.kernel)
        outputs = ops.add(base, ops.matmul(low_rank, self.lora_kernel_b))
        if self.dora:
            # The norm is a constant for the gradient (DoRA section 4.3).
            norm = ops.stop_gradient(self.direction_norm(a_t_kernel))
            outputs = outputs * (self.lora_magnitude / norm)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation_fn is not None:
            outputs = self.activation_fn(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def merged_kernel(self):
        """The NumPy kernel of the equivalent `Dense`: `V = W + scale * A @ B`,
        with DoRA `V * m / ||V||_c`."""
        kernel = ops.convert_to_numpy(self.kernel).astype("float64")
        a = ops.convert_to_numpy(self.lora_kernel_a).astype("float64")
        b = ops.convert_to_numpy(self.lora_kernel_b).astype("float64")
        # Summed in float64 so the merge adds no rounding beyond the final cast.
        merged = kernel + self.scale * (a @ b)
        if self.dora:
            magnitude = ops.convert_to_numpy(self.lora_magnitude).astype("float64")
            merged = merged * (magnitude / np.linalg.norm(merged, axis=0))
        return merged.astype(self.kernel.dtype)

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
                "dora": self.dora,
                **self.weight_options.get_config(),
            }
        )
        return config


def dense_or_lora(layer, units, name, activation=None, use_bias=True, kernel_initializer=None):
    """A `Dense` projection of `layer`, or a `LoRADense` when its `lora_rank`
    is set (DoRA when the layer has `lora_dora=True`), with the layer's
    weight arguments (`layer.weight_options`; `kernel_initializer` is the
    layer's default). Both create `kernel` then
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
        dora=getattr(layer, "lora_dora", False),
        **common,
    )
