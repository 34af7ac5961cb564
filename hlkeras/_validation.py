"""The one argument-check module of hlkeras: layers, models, LoRA and
export check their arguments here.

Every check raises an error that names the argument, the value it got and
what is allowed, so a user mistake never surfaces later as a shape error
deep inside a backend. The error class is a parameter (`ValueError` by
default; e.g. `hlkeras.export.ExportError`, which the CLI prints as one line).
"""

import keras


class HlkerasWarning(UserWarning):
    """A warning hlkeras itself raises about the user's model or arguments
    (the CLI prints each as one line)."""


# Activations whose variance-preserving init is He (Kaiming), not Glorot.
RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "swish", "selu"})


def is_int(value):
    """An int that is not a bool (`True` is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """An int or float that is not a bool (`True` is an int in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name, value, error=ValueError):
    if not is_int(value) or value < 1:
        raise error(f"Argument `{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def check_rate(name, value, error=ValueError):
    if not is_number(value) or not (0.0 <= value < 1.0):
        raise error(f"Argument `{name}` must be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


def check_non_negative(name, value, error=ValueError):
    if not is_number(value) or not value >= 0:  # `not >=` refuses NaN too
        raise error(f"Argument `{name}` must be a number >= 0. Received: {name}={value!r}")
    return float(value)


def check_choice(name, value, allowed, error=ValueError):
    if value not in allowed:
        raise error(
            f"Argument `{name}` must be one of {sorted(allowed, key=str)}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_flag_choice(flag, value, allowed, error=ValueError):
    """`check_choice` worded for a command-line flag or a setting named as
    one (`--tuner must be one of random, hyperband, got 'grid'`)."""
    if value not in allowed:
        raise error(f"{flag} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def check_activation(name, value):
    """Returns the activation's serializable name after checking it exists."""
    try:
        keras.activations.get(value)
    except (ValueError, TypeError):
        raise ValueError(
            f"Argument `{name}` must name a Keras activation such as 'relu', "
            f"'gelu' or 'silu'. Received: {name}={value!r}"
        ) from None
    return value


# The Keras-standard weight arguments, by the last word of their name.
WEIGHT_OPTION_KINDS = {
    "initializer": (keras.initializers, "'glorot_uniform' or 'zeros'"),
    "regularizer": (keras.regularizers, "'l2'"),
    "constraint": (keras.constraints, "'max_norm' or 'non_neg'"),
}


def check_weight_option(name, identifier):
    """Resolves an initializer, regularizer or constraint argument (its kind is
    the last word of `name`, e.g. `kernel_regularizer`), so that a bad name
    fails at construction and names the argument."""
    kind = name.rsplit("_", 1)[-1]
    module, examples = WEIGHT_OPTION_KINDS[kind]
    try:
        return module.get(identifier)
    except (ValueError, TypeError):
        raise ValueError(
            f"Argument `{name}` must be a Keras {kind}: a name such as "
            f"{examples}, a config dict or an instance. Received: {name}={identifier!r}"
        ) from None


def kernel_initializer_for(activation):
    """He-normal for the relu family, Glorot-uniform (Keras' default) otherwise."""
    return "he_normal" if activation in RELU_FAMILY else "glorot_uniform"


def check_min_rank(layer_name, input_shape, min_rank):
    if len(input_shape) < min_rank:
        raise ValueError(
            f"{layer_name} expects inputs of rank >= {min_rank}, i.e. shape "
            f"(batch, ..., features). Received input_shape={tuple(input_shape)}"
        )


def check_feature_dim(layer_name, input_shape):
    if input_shape[-1] is None:
        raise ValueError(
            f"{layer_name} needs a known last (feature) dimension. "
            f"Received input_shape={tuple(input_shape)}"
        )
    return input_shape[-1]


def check_sequence_shape(name, shape):
    """`shape` is `(batch, length, features)` with known features."""
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            f"Argument `{name}` must be a sequence of shape (batch, length, "
            f"features) with known features. Received: {name}.shape="
            f"{tuple(shape)}"
        )


def first_non_finite(array):
    """`(index, what)` of the first NaN or infinity of a float array, in C
    order (`index` a tuple of ints, `what` "a NaN", "inf" or "-inf"), or
    None when every value is finite (or the array is not floating point).

    One vectorized `np.isfinite` pass; the position is only searched for
    once a non-finite value is known to be there.
    """
    import numpy as np

    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    index = np.unravel_index(int(np.argmin(finite, axis=None)), array.shape)
    value = array[index]
    what = "a NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return tuple(int(i) for i in index), what


def first_line(error):
    """The first line of an exception's message (its type's name when the
    message is empty), for a one-line error about a file a library refused."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def few(names, limit=12):
    """`names` joined for an error message, at most `limit` of them."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
