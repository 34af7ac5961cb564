"""The Keras weight arguments every hlkeras layer with weights takes:
`kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
`bias_regularizer`, `kernel_constraint`, `bias_constraint` (and
`activity_regularizer`, which the base `keras.layers.Layer` applies).

A layer takes them through `**kwargs` and hands them to `WeightOptions.pop`,
which checks them up front (an unknown name fails at construction and names
the argument), so the seven constructors do not repeat the same six
parameters. Each sublayer gets its own initializer instance, as KerasHub's
`clone_initializer` does: a shared stateless initializer would give two
kernels of one shape the same values.
"""

import keras

from hlkeras import _validation

PARTS = ("initializer", "regularizer", "constraint")
# The six arguments of a `keras.layers.Dense` (and of most hlkeras layers).
KERNEL_AND_BIAS_ARGUMENTS = tuple(f"{kind}_{part}" for kind in ("kernel", "bias") for part in PARTS)
SERIALIZERS = {
    "initializer": keras.initializers.serialize,
    "regularizer": keras.regularizers.serialize,
    "constraint": keras.constraints.serialize,
}


def clone_initializer(initializer):
    """A fresh instance with the same config (KerasHub's `clone_initializer`)."""
    if isinstance(initializer, keras.initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


class WeightOptions:
    """The checked initializer, regularizer and constraint of each kind of
    weight of one layer (`kernel`, `bias`; `embeddings` for
    `PositionEmbedding`).

    An initializer left at `None` keeps the layer's own default for that
    weight (for example He-normal after a relu-family activation), so the
    layers' defaults are unchanged.
    """

    def __init__(self, options):
        self.options = {
            name: None if value is None else _validation.check_weight_option(name, value)
            for name, value in options.items()
        }

    @classmethod
    def pop(cls, kwargs, kinds=("kernel", "bias")):
        """Takes this layer's weight arguments out of its `**kwargs`; checks
        the `activity_regularizer` left there for the base layer too."""
        names = [f"{kind}_{part}" for kind in kinds for part in PARTS]
        if kwargs.get("activity_regularizer") is not None:
            _validation.check_weight_option("activity_regularizer", kwargs["activity_regularizer"])
        return cls({name: kwargs.pop(name, None) for name in names})

    def _get(self, kind, part):
        return self.options[f"{kind}_{part}"]

    def weight(self, kind, initializer):
        """`add_weight` keyword arguments for a weight of `kind`; `initializer`
        is the layer's default."""
        return {
            "initializer": clone_initializer(self._get(kind, "initializer") or initializer),
            "regularizer": self._get(kind, "regularizer"),
            "constraint": self._get(kind, "constraint"),
        }

    def sublayer(self, kernel_initializer="glorot_uniform"):
        """Keyword arguments for a `Dense`, `EinsumDense` or `Conv2D` sublayer;
        `kernel_initializer` is the layer's default for its kernel."""
        kernel = self.weight("kernel", kernel_initializer)
        bias = self.weight("bias", "zeros")
        return {
            "kernel_initializer": kernel["initializer"],
            "kernel_regularizer": kernel["regularizer"],
            "kernel_constraint": kernel["constraint"],
            "bias_initializer": bias["initializer"],
            "bias_regularizer": bias["regularizer"],
            "bias_constraint": bias["constraint"],
        }

    def given(self):
        """The arguments the user set, for an hlkeras sublayer that has its
        own defaults for the rest (`TransformerBlock` -> its attention, FFN)."""
        return {
            name: clone_initializer(value)
            for name, value in self.options.items()
            if value is not None
        }

    def get_config(self):
        """The serialized arguments, `None` where not given."""
        return {
            name: None if value is None else SERIALIZERS[name.rsplit("_", 1)[-1]](value)
            for name, value in self.options.items()
        }
