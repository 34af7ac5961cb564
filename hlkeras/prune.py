"""Pruning for Keras 3 on every backend: weight sparsity, one-shot magnitude
pruning (per layer, global, or an m:n pattern such as 2:4), gradual
pruning during `fit` with tfmot's polynomial schedule, and structured
pruning (`structured`: whole hidden units out, a smaller model).

A pruned model here is a plain Keras model whose pruned weights are exactly
zero: no wrapper layers, so it saves, loads (`safe_mode=True`), fine-tunes,
takes LoRA adapters and exports like the model it came from. The `Pruning`
callback keeps its masks in non-trainable `keras.Variable`s and multiplies
them into the kernels after every optimizer step (on JAX, after the
callback synced the stateless training state), so a pruned weight is zero
whenever a step ends. The zeros are the masks' saved form: a `.keras` file
or a resumed run (`BackupAndRestore`) holds them, and `Pruning` rebuilds its
masks from them when training begins.

What is pruned (the *prunable weights*): the kernels of `Dense`,
`EinsumDense`, `Conv1D/2D/3D` and `LoRADense` layers, at any depth inside
hlkeras layers and nested models, and the two expert kernels of every
`MixtureOfExperts`. Biases, norms, embeddings and MoE routers are left
alone. Layers are chosen by path, as in `hlkeras.lora`: `targets=None` (or
`"all-linear"`) takes every layer holding a prunable weight except the
head (the model's last `Dense`); a glob or a list of globs matches whole
layer paths (`"backbone/block_*"`).

Example:

>>> model = hlkeras.models.mlp((8, 8, 1), 10, depth=1, width=32)
>>> pruned = magnitude(model, 0.75)
>>> round(sparsity(pruned), 2), round(sparsity(model), 2)
(0.75, 0.0)
"""

import dataclasses
import math
import re

import keras
import numpy as np
from keras import ops

from hlkeras import _compat
from hlkeras import _validation
from hlkeras import lora
from hlkeras.layers import FeedForward
from hlkeras.layers import LoRADense
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import ResidualBlock
from hlkeras.layers.moe import FloatRouter

ALL_LINEAR = lora.ALL_LINEAR
SCOPES = ("layer", "global")
CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
KERNEL_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, LoRADense) + CONV_LAYERS
MOE_KERNELS = ("expert_hidden_kernel", "expert_output_kernel")
# The layers whose hidden units `structured` removes, by their config key.
HIDDEN_UNITS_KEY = {ResidualBlock: "hidden_units", FeedForward: "ffn_units"}
CRITERIA = {"l2": 2, "l1": 1}


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


def prunable_weights(model, targets=None):
    """The `PrunableWeight`s of the layers `targets` selects, in model order.

    Raises:
        ValueError: when `targets` selects nothing, naming the layers that
            hold prunable weights.
    """
    prunable = [(path, layer) for path, layer in lora.leaf_layers(model) if _kernels_of(layer)]
    paths = _selected_paths(model, prunable, targets)
    return [
        PrunableWeight(path, variable, axis)
        for path, layer in prunable
        if path in paths
        for variable, axis in _kernels_of(layer)
    ]


def _head_path(model):
    dense = [
        path for path, layer in lora.leaf_layers(model) if isinstance(layer, keras.layers.Dense)
    ]
    return dense[-1] if dense else None


def _matched_paths(model, targets):
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
    matched = _matched_paths(model, targets)
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


def _smallest(magnitudes, count):
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
            ~_smallest(np.abs(v).ravel(), math.floor(target_sparsity * v.size)).reshape(v.shape)
            for v in values
        ]
    magnitudes = np.concatenate([np.abs(v).ravel() for v in values])
    pruned = _smallest(magnitudes, math.floor(target_sparsity * magnitudes.size))
    splits = np.cumsum([v.size for v in values])[:-1]
    return [~p.reshape(v.shape) for p, v in zip(np.split(pruned, splits), values)]


def pattern_mask(value, m, n, input_axis):
    """The keep-mask of `value` that keeps the `m` largest |w| of every `n`
    consecutive weights along `input_axis` (ties to the earlier weight)."""
    if value.shape[input_axis] % n:
        raise ValueError(
            f"pattern '{m}:{n}' needs the input axis of every pruned weight to be a "
            f"multiple of {n}; a weight of shape {value.shape} has "
            f"{value.shape[input_axis]} inputs (axis {input_axis})"
        )
    moved = np.moveaxis(np.abs(value), input_axis, -1)
    groups = moved.reshape(-1, n)
    position = np.broadcast_to(np.arange(n), groups.shape)
    # Rank within each group: largest first, earlier first on ties.
    order = np.lexsort((position, -groups), axis=-1)
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[:, :m], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, input_axis)


def _masks(weights, values, target_sparsity, scope, pattern):
    if pattern is not None:
        m, n = pattern
        return [pattern_mask(v, m, n, w.input_axis) for w, v in zip(weights, values)]
    return magnitude_masks(values, target_sparsity, scope)


def _check_scope(scope):
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
            `1 - m/n` (`sparsity` may then be left out).

    Returns:
        The pruned copy.
    """
    sparsity, pattern = _check_target(sparsity, pattern)
    _check_scope(scope)
    pruned = lora.copy_model(model)
    weights = prunable_weights(pruned, targets)
    values = [ops.convert_to_numpy(w.variable) for w in weights]
    for weight, value, keep in zip(
        weights, values, _masks(weights, values, sparsity, scope, pattern)
    ):
        weight.variable.assign(np.where(keep, value, 0).astype(value.dtype))
    return pruned


def _check_target(sparsity, pattern):
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


# --------------------------------------------------------------------------
# Structured: whole hidden units out, a smaller model


def structured(model, ratio, *, targets=None, criterion="l2"):
    """A new, smaller plain model: `model` with the `ratio` least salient
    hidden units of each selected `ResidualBlock` and `FeedForward` removed.

    A hidden unit `j` is column `j` of the block's `hidden_dense` (and its
    bias) and row `j` of its `output_dense`. Its saliency is the product of
    the norms of the two, so a unit whose incoming or outgoing weights are
    all zero ranks first (ties to the lower index) and removing it changes
    no output. The smaller model has the same graph and layer paths, each
    block's config narrowed (`hidden_units`, `ffn_units`), and the surviving
    weights copied. `model` itself is not changed.

    Args:
        model: A functional or Sequential `keras.Model`.
        ratio: The fraction in [0, 1) of each block's hidden units to remove
            (rounded down, at least one unit kept).
        targets: Which blocks, as in `hlkeras.lora` (default: all).
        criterion: `"l2"` or `"l1"`: the norm of the saliency.

    Returns:
        The smaller model.
    """
    ratio = check_sparsity(ratio, "ratio")
    order = CRITERIA[_validation.check_choice("criterion", criterion, tuple(CRITERIA))]
    kept = {
        path: _kept_units(layer, ratio, order) for path, layer in _structured_blocks(model, targets)
    }

    def narrowed(path, layer):
        config = layer.get_config()
        if path in kept:
            config[HIDDEN_UNITS_KEY[type(layer)]] = len(kept[path])
        return type(layer).from_config(config)

    smaller = lora.clone_by_path(model, narrowed)
    paths = dict(lora.leaf_layers(smaller))
    for path, layer in lora.leaf_layers(model):
        for source, target in zip(layer.weights, paths[path].weights):
            value = ops.convert_to_numpy(source)
            for axis in np.flatnonzero(np.array(value.shape) != np.array(target.shape)):
                value = np.take(value, kept[path], axis=axis)
            target.assign(value)
    return smaller


def _structured_blocks(model, targets):
    blocks = [(p, layer) for p, layer in lora.leaf_layers(model) if type(layer) in HIDDEN_UNITS_KEY]
    if not blocks:
        raise ValueError(
            f"structured pruning found nothing to prune in model '{model.name}': it removes "
            f"hidden units of {', '.join(c.__name__ for c in HIDDEN_UNITS_KEY)} layers, and "
            f"the model's layers are {_validation.few([p for p, _ in lora.leaf_layers(model)])}"
        )
    matched = _matched_paths(model, targets)
    if matched is None:
        return blocks
    selected = [(p, layer) for p, layer in blocks if p in matched]
    if not selected:
        raise ValueError(
            f"Argument `targets` selected no {' or '.join(c.__name__ for c in HIDDEN_UNITS_KEY)} "
            f"layer. Those in model '{model.name}': {_validation.few([p for p, _ in blocks])}. "
            f"Received: targets={targets!r}"
        )
    return selected


def _kept_units(layer, ratio, order):
    """The sorted indices of the hidden units of `layer` that stay."""
    hidden = ops.convert_to_numpy(layer.hidden_dense.kernel)
    incoming = np.concatenate([hidden, ops.convert_to_numpy(layer.hidden_dense.bias)[None]])
    outgoing = ops.convert_to_numpy(layer.output_dense.kernel)
    saliency = np.linalg.norm(incoming, order, axis=0) * np.linalg.norm(outgoing, order, axis=1)
    # Rounded down, and the ratio is below 1: at least one unit stays.
    return np.flatnonzero(~_smallest(saliency, math.floor(ratio * saliency.size)))


# --------------------------------------------------------------------------
# Gradual pruning during fit


def polynomial_sparsity(step, *, initial_sparsity, final_sparsity, begin_step, end_step):
    """tfmot's `PolynomialDecay` (power 3): the sparsity at optimizer step
    `step`, `s_f + (s_i - s_f) * (1 - p)^3` with
    `p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`."""
    progress = min(1.0, max(0.0, (step - begin_step) / max(1, end_step - begin_step)))
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


class Pruning(keras.callbacks.Callback):
    """Gradual magnitude pruning during `fit`, on every backend.

    Every `frequency` optimizer steps from `begin_step` to `end_step` the
    masks are recomputed: the smallest |w| of the masked weights are zeroed
    until the sparsity follows `polynomial_sparsity` from
    `initial_sparsity` to `final_sparsity`. After every step the masks are
    multiplied into the weights, so pruned weights stay exactly zero. The
    masks are non-trainable `keras.Variable`s of the callback; at
    `on_train_begin` they are rebuilt from the weights' zeros, which is how a
    pruned model saved to `.keras`, or a run resumed by `BackupAndRestore`
    (`hlkeras train --resume`), keeps its masks.

    Args:
        final_sparsity: Float in [0, 1), reached at `end_step`.
        initial_sparsity: Float in [0, 1), at `begin_step`.
        begin_step: The optimizer step (`model.optimizer.iterations`) where
            pruning starts.
        end_step: Where the schedule ends; default: the last step of this
            `fit` (`epochs * steps_per_epoch`).
        frequency: Steps between mask updates (tfmot's default: 100).
        scope: `"layer"` or `"global"`, as in `magnitude`.
        targets: Which layers, as in `hlkeras.lora`.
        pattern: `"m:n"`: prune to that pattern at `begin_step` instead, and
            keep it.

    Example:

    ```python
    model.fit(x, y, epochs=10, callbacks=[hlkeras.prune.Pruning(0.8, frequency=20)])
    hlkeras.prune.sparsity(model)  # 0.8
    ```
    """

    def __init__(
        self,
        final_sparsity,
        *,
        initial_sparsity=0.0,
        begin_step=0,
        end_step=None,
        frequency=100,
        scope="layer",
        targets=None,
        pattern=None,
    ):
        super().__init__()
        self.final_sparsity, self.pattern = _check_target(final_sparsity, pattern)
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        for name, value in (("begin_step", begin_step), ("frequency", frequency)):
            if not _validation.is_int(value) or value < (0 if name == "begin_step" else 1):
                allowed = "an integer >= 0" if name == "begin_step" else "a positive integer"
                raise ValueError(f"Argument `{name}` must be {allowed}. Received: {name}={value!r}")
        if end_step is not None and (not _validation.is_int(end_step) or end_step <= begin_step):
            raise ValueError(
                f"Argument `end_step` must be None or an integer > begin_step={begin_step}. "
                f"Received: end_step={end_step!r}"
            )
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.scope = _check_scope(scope)
        self.targets = targets

    def on_train_begin(self, logs=None):
        self.step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.weights = prunable_weights(self.model, self.targets)
        self.masks = [
            keras.Variable(
                ops.convert_to_numpy(w.variable) != 0,
                dtype=w.variable.dtype,
                trainable=False,
                name=f"pruning_mask_{i}",
            )
            for i, w in enumerate(self.weights)
        ]
        if self.end_step is None:
            steps = (self.params or {}).get("steps")
            if not steps:
                raise ValueError(
                    "Pruning needs `end_step` when fit does not know its steps per epoch "
                    "(a dataset of unknown length)"
                )
            self.end_step = max(self.begin_step + 1, steps * self.params["epochs"])

    def sparsity_at(self, step):
        """The scheduled sparsity at optimizer step `step`."""
        return polynomial_sparsity(
            step,
            initial_sparsity=self.initial_sparsity,
            final_sparsity=self.final_sparsity,
            begin_step=self.begin_step,
            end_step=self.end_step,
        )

    def on_train_batch_end(self, batch, logs=None):
        self.model  # noqa: B018 -- on JAX, reading `self.model` syncs the training state
        # Counted here, not read from `optimizer.iterations`: a read every
        # step waits for the device.
        self.step += 1
        if self._updates_masks_at(self.step):
            self._update_masks(self.step)
        for weight, mask in zip(self.weights, self.masks):
            weight.variable.assign(weight.variable * mask)

    def _updates_masks_at(self, step):
        if self.pattern is not None:
            return step == max(self.begin_step, 1)
        in_schedule = self.begin_step <= step <= self.end_step
        return in_schedule and (step - self.begin_step) % self.frequency == 0

    def _update_masks(self, step):
        values = [
            ops.convert_to_numpy(w.variable) * ops.convert_to_numpy(m)
            for w, m in zip(self.weights, self.masks)
        ]
        masks = _masks(self.weights, values, self.sparsity_at(step), self.scope, self.pattern)
        for variable, keep in zip(self.masks, masks):
            # A weight pruned before stays pruned: its |w| is 0, the smallest.
            variable.assign(keep.astype(variable.dtype))
