"""Which weights pruning acts on, and their masks (NumPy: weights move
through NumPy copies, as in `hlkeras.lora`): per-layer and global top-k by
|w|, m:n patterns, and one-shot magnitude pruning."""

import dataclasses
import math
import re
import warnings

import keras
import numpy as np
from keras import ops

from hlkeras import _compat
from hlkeras import _validation
from hlkeras import lora
from hlkeras.layers import LoRADense
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers.moe import FloatRouter

ALL_LINEAR = lora.ALL_LINEAR
SCOPES = ("layer", "global")
CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
KERNEL_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, LoRADense) + CONV_LAYERS
MOE_KERNELS = ("expert_hidden_kernel", "expert_output_kernel")


@dataclasses.dataclass(frozen=True)
class PrunableWeight:
    """One weight that pruning acts on.

    Attributes:
        layer_path: The path of the selected layer holding it (`hlkeras.lora`
            paths: `"backbone/block_0"`).
        variable: The `keras.Variable`.
        input_axis: The axis of its inputs, along which an m:n pattern keeps
            `m` of every `n` consecutive weights (0 for `Dense`/`EinsumDense`,
            the input-channel axis of a convolution, 1 for `(E, in, out)`
            expert kernels).
    """

    layer_path: str
    variable: object
    input_axis: int


# --------------------------------------------------------------------------
# Which weights


def _own_weights(layer, names):
    return [v for v in layer.weights if v.path == f"{layer.path}/{v.name}" and v.name in names]


def _kernels_of(layer):
    """The prunable `(variable, input_axis)` pairs inside `layer`."""
    found = []
    for sublayer in _compat.sublayers(layer, include_self=True):
        # The router is a Dense too, but a few zeros there re-route tokens.
        if isinstance(sublayer, KERNEL_LAYERS) and not isinstance(sublayer, FloatRouter):
            axis = -2 if isinstance(sublayer, CONV_LAYERS) else 0
            found += [(v, axis) for v in _own_weights(sublayer, ("kernel",))]
        elif isinstance(sublayer, MixtureOfExperts):
            found += [(v, 1) for v in _own_weights(sublayer, MOE_KERNELS)]
    return [(v, axis % len(v.shape)) for v, axis in found if _is_float(v)]


def _is_float(variable):
    return "float" in str(variable.dtype)


def prunable_weights(model, targets=None, *, pattern=None):
    """The `PrunableWeight`s of the layers `targets` selects, in model order.

    With an m:n `pattern` (`"2:4"` or `(2, 4)`), only those whose input axis
    is a multiple of n; an `HlkerasWarning` names the others, which stay
    dense.

    Raises:
        ValueError: when `targets` selects nothing, naming the layers that
            hold prunable weights.
    """
    prunable = [(path, layer) for path, layer in lora.leaf_layers(model) if _kernels_of(layer)]
    paths = _selected_paths(model, prunable, targets)
    weights = [
        PrunableWeight(path, variable, axis)
        for path, layer in prunable
        if path in paths
        for variable, axis in _kernels_of(layer)
    ]
    return weights if pattern is None else _fitting_pattern(weights, pattern)


def _fitting_pattern(weights, pattern):
    """The weights an m:n pattern can prune. As NVIDIA's ASP does for 2:4, a
    weight with a number of inputs that is not a multiple of n (a grayscale
    stem convolution has 1) is left dense rather than the model refused."""
    m, n = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    fits = [w for w in weights if w.variable.shape[w.input_axis] % n == 0]
    skipped = [
        f"{w.variable.path} {tuple(w.variable.shape)}"
        for w in weights
        if w.variable.shape[w.input_axis] % n
    ]
    if not fits:
        raise ValueError(
            f"Argument `pattern`: '{m}:{n}' fits no selected weight: each needs a number of "
            f"inputs that is a multiple of {n}. Received weights: {', '.join(skipped)}"
        )
    if skipped:
        warnings.warn(
            f"pattern '{m}:{n}' leaves {len(skipped)} weight(s) dense, their number of inputs "
            f"not a multiple of {n}: {', '.join(skipped)}",
            _validation.HlkerasWarning,
            stacklevel=3,
        )
    return fits


def _head_path(model):
    dense = [
        path for path, layer in lora.leaf_layers(model) if isinstance(layer, keras.layers.Dense)
    ]
    return dense[-1] if dense else None


def matched_paths(model, targets):
    """The layer paths the glob(s) `targets` match (`None` for the default
    selection, `None` or `"all-linear"`)."""
    if targets is None or targets == ALL_LINEAR:
        return None
    if isinstance(targets, str) or (
        isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)
    ):
        patterns = [targets] if isinstance(targets, str) else list(targets)
        return set().union(*lora.check_patterns_match(model, patterns).values())
    raise ValueError(
        f"Argument `targets` must be None, {ALL_LINEAR!r}, a glob pattern or a list "
        f"of them. Received: targets={targets!r}"
    )


def _selected_paths(model, prunable, targets):
    paths = [path for path, _ in prunable]
    matched = matched_paths(model, targets)
    if matched is None:
        selected = [path for path in paths if path != _head_path(model)]
    else:
        selected = [path for path in paths if path in matched]
    if not selected:
        raise ValueError(
            "Argument `targets` selected no layer with prunable weights. Layers with "
            f"prunable weights in model '{model.name}': {_validation.few(paths)}. "
            f"Received: targets={targets!r}"
        )
    return selected


def sparsity(model, targets=None):
    """The fraction of exact zeros over the prunable weights `targets`
    selects (by default every prunable weight but the head's)."""
    values = [ops.convert_to_numpy(w.variable) for w in prunable_weights(model, targets)]
    return float(sum(np.sum(v == 0) for v in values) / sum(v.size for v in values))


# --------------------------------------------------------------------------
# Masks (NumPy: weights move through NumPy copies, as in hlkeras.lora)


def check_sparsity(value, name="sparsity"):
    if not _validation.is_number(value) or not 0 <= value < 1:
        raise ValueError(f"Argument `{name}` must be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


def parse_pattern(pattern):
    """`(m, n)` of an m:n pattern such as `"2:4"` (keep m of every n)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(
            "Argument `pattern` must be 'm:n' with integers 0 < m < n (keep the m "
            f"largest of every n consecutive input weights), such as '2:4'. "
            f"Received: pattern={pattern!r}"
        )
    return int(match[1]), int(match[2])


def smallest(magnitudes, count):
    """A boolean mask of the `count` smallest entries of 1-D `magnitudes`;
    ties go to the lower index, so the result never depends on the sort.
    (A partition, not a sort: `Pruning(frequency=1)` recomputes the masks
    every step, and a full sort of a 546k-weight mlp took 5.6x its step.)"""
    if count <= 0:
        return np.zeros(magnitudes.size, bool)
    threshold = np.partition(magnitudes, count - 1)[count - 1]
    pruned = magnitudes < threshold
    ties = np.flatnonzero(magnitudes == threshold)
    pruned[ties[: count - np.count_nonzero(pruned)]] = True
    return pruned


def magnitude_masks(values, target_sparsity, scope="layer"):
    """Keep-masks (True = kept) that zero the `target_sparsity` smallest |w|:
    of each array (`scope="layer"`) or of all of them together (`"global"`)."""
    if scope == "layer":
        return [
            ~smallest(np.abs(v).ravel(), math.floor(target_sparsity * v.size)).reshape(v.shape)
            for v in values
        ]
    magnitudes = np.concatenate([np.abs(v).ravel() for v in values])
    pruned = smallest(magnitudes, math.floor(target_sparsity * magnitudes.size))
    splits = np.cumsum([v.size for v in values])[:-1]
    return [~p.reshape(v.shape) for p, v in zip(np.split(pruned, splits), values)]


def pattern_mask(value, m, n, input_axis):
    """The keep-mask of `value` that keeps the `m` largest |w| of every `n`
    consecutive weights along `input_axis` (ties to the earlier weight)."""
    moved = np.moveaxis(np.abs(value), input_axis, -1)
    groups = moved.reshape(-1, n)
    position = np.broadcast_to(np.arange(n), groups.shape)
    # Rank within each group: largest first, earlier first on ties.
    order = np.lexsort((position, -groups), axis=-1)
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[:, :m], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, input_axis)


def keep_masks(weights, values, target_sparsity, scope, pattern):
    if pattern is not None:
        m, n = pattern
        return [pattern_mask(v, m, n, w.input_axis) for w, v in zip(weights, values)]
    return magnitude_masks(values, target_sparsity, scope)


def check_scope(scope):
    return _validation.check_choice("scope", scope, SCOPES)


# --------------------------------------------------------------------------
# One shot


def magnitude(model, sparsity=None, *, scope="layer", targets=None, pattern=None):
    """One-shot magnitude pruning: a copy of `model` whose smallest-|w|
    prunable weights are zero. `model` itself is not changed.

    Args:
        model: A functional or Sequential `keras.Model`.
        sparsity: The fraction in [0, 1) of each selected weight
            (`scope="layer"`) or of all of them (`"global"`) to zero.
        scope: `"layer"`: every weight array loses the same fraction;
            `"global"`: one threshold over all selected weights, so layers
            with smaller weights lose more.
        targets: Which layers, as in `hlkeras.lora` (default: all but the
            head).
        pattern: `"m:n"` (e.g. `"2:4"`): keep the `m` largest of every `n`
            consecutive input weights instead; it sets the sparsity to
            `1 - m/n` (`sparsity` may then be left out). A weight whose
            number of inputs is not a multiple of `n` stays dense (with an
            `HlkerasWarning`).

    Returns:
        The pruned copy.
    """
    sparsity, pattern = check_target(sparsity, pattern)
    check_scope(scope)
    pruned = lora.copy_model(model)
    weights = prunable_weights(pruned, targets, pattern=pattern)
    values = [ops.convert_to_numpy(w.variable) for w in weights]
    for weight, value, keep in zip(
        weights, values, keep_masks(weights, values, sparsity, scope, pattern)
    ):
        weight.variable.assign(np.where(keep, value, 0).astype(value.dtype))
    return pruned


def check_target(sparsity, pattern):
    """`(sparsity, (m, n) or None)`; a pattern decides the sparsity itself."""
    if pattern is None:
        if sparsity is None:
            raise ValueError("Argument `sparsity` is required without a `pattern`.")
        return check_sparsity(sparsity), None
    m, n = parse_pattern(pattern)
    if sparsity is not None and not math.isclose(sparsity, 1 - m / n):
        raise ValueError(
            f"Argument `pattern`: {pattern!r} keeps {m} of every {n} weights, a sparsity "
            f"of {1 - m / n:g}; it contradicts sparsity={sparsity!r} (leave it out)"
        )
    return 1 - m / n, (m, n)


def strip(model):
    """A plain copy of a pruned model, its zeros baked in, nothing of the
    pruning attached (the `Pruning` callback adds nothing to a model, so
    this is a copy: the file to export or to hand on)."""
    return lora.copy_model(model)
