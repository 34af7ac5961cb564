"""Gradual magnitude pruning during `fit`: tfmot's polynomial schedule and
the `Pruning` callback."""

import math

import keras
import numpy as np
from keras import ops

from hlkeras import _validation
from hlkeras.prune.masks import check_scope
from hlkeras.prune.masks import check_sparsity
from hlkeras.prune.masks import check_target
from hlkeras.prune.masks import keep_masks
from hlkeras.prune.masks import prunable_weights

# --------------------------------------------------------------------------
# Gradual pruning during fit

MASK_NAME = "pruning_mask_"  # the masks' names in the optimizer while fit runs


def polynomial_sparsity(step, *, initial_sparsity, final_sparsity, begin_step, end_step):
    """tfmot's `PolynomialDecay` (power 3): the sparsity at optimizer step
    `step`, `s_f + (s_i - s_f) * (1 - p)^3` with
    `p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`."""
    progress = min(1.0, max(0.0, (step - begin_step) / max(1, end_step - begin_step)))
    return _polynomial(progress, initial_sparsity, final_sparsity)


def _polynomial(progress, initial_sparsity, final_sparsity):
    """The schedule at `progress` in [0, 1]: a float, or a tensor in the
    training step."""
    return final_sparsity + (initial_sparsity - final_sparsity) * (1 - progress) ** 3


class Pruning(keras.callbacks.Callback):
    """Gradual magnitude pruning during `fit`, on every backend.

    Every `frequency` optimizer steps from `begin_step` to `end_step` the
    masks are recomputed: the smallest |w| of the masked weights are zeroed
    until the sparsity follows `polynomial_sparsity` from
    `initial_sparsity` to `final_sparsity`.

    While `fit` runs, each mask is a non-trainable variable and its
    weight's constraint: the optimizer multiplies it in after every step,
    inside its compiled step, so pruned weights are exactly zero whenever a
    step ends, at no Python cost per step (on JAX the masks are optimizer
    variables, so that the stateless step carries them). With
    `scope="layer"` and no `pattern` the scheduled mask updates run there
    too, on TensorFlow and JAX; the global scope, a pattern, a frozen
    weight, or torch update them here, in NumPy, on the steps the schedule
    names. When training ends the weights' constraints are restored (and
    the masks leave the optimizer): the model and its optimizer save as
    they would without pruning, during `fit` too. The zeros are the masks'
    saved form: when the first batch begins the masks are rebuilt from the
    weights' zeros, which is how a pruned model saved to `.keras`, or a run
    resumed by `BackupAndRestore` (`hlkeras train --resume`, either order
    of the callbacks), keeps its masks.

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
            keep it (a weight whose number of inputs is not a multiple of
            `n` stays dense, as in `magnitude`).

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
        self.final_sparsity, self.pattern = check_target(final_sparsity, pattern)
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
        self.scope = check_scope(scope)
        self.targets = targets

    def on_train_begin(self, logs=None):
        self.started = False

    def on_train_batch_begin(self, batch, logs=None):
        # At the first batch, not at train begin: a `BackupAndRestore` after
        # this callback in the list restores the weights and the optimizer's
        # step at train begin, and the masks are built from what it restored.
        if not self.started:
            self._start()
            self.started = True

    def _start(self):
        optimizer = self.model.optimizer
        self.step = int(ops.convert_to_numpy(optimizer.iterations))
        self.weights = prunable_weights(self.model, self.targets, pattern=self.pattern)
        if self.end_step is None:
            steps = (self.params or {}).get("steps")
            if not steps:
                raise ValueError(
                    "Pruning needs `end_step` when fit does not know its steps per epoch "
                    "(a dataset of unknown length)"
                )
            self.end_step = max(self.begin_step + 1, steps * self.params["epochs"])
        trainable = {id(v) for v in self.model.trainable_variables}
        # Not on torch: its step runs eagerly anyway, and torch.topk of the
        # ~9.5k smallest of an mlp's 546k weights made an epoch 9.8x a plain
        # one (with frequency=1 over a 6-epoch fit); NumPy's partition costs
        # the same whatever the count.
        self.updates_in_step = (
            keras.backend.backend() != "torch"
            and self.scope == "layer"
            and self.pattern is None
            and all(id(w.variable) in trainable for w in self.weights)
        )
        self.masks = []
        for index, weight in enumerate(self.weights):
            value = ops.convert_to_numpy(weight.variable)
            mask = _new_mask(optimizer, value != 0, weight.variable.dtype, f"{MASK_NAME}{index}")
            self.masks.append(mask)
            previous = _unmasked_constraint(optimizer, weight.variable.constraint)
            update = _ScheduledMask(self, optimizer, value) if self.updates_in_step else None
            weight.variable.constraint = _MaskAfterStep(mask, previous, update)
        if keras.backend.backend() == "jax":
            _hide_masks_from_saving(optimizer)
        # A step traced before this fit has no masks in it.
        self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        if not self.started:
            return
        for weight in self.weights:
            weight.variable.constraint = weight.variable.constraint.previous
        for mask in self.masks:
            self.model.optimizer._tracker.untrack(mask)
        self.model.make_train_function(force=True)

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
        # Counted here, not read from `optimizer.iterations`: a read every
        # step waits for the device.
        self.step += 1
        if not self.updates_in_step and self._updates_masks_at(self.step):
            self._update_masks(self.step)

    def _updates_masks_at(self, step):
        if self.pattern is not None:
            return step == max(self.begin_step, 1)
        in_schedule = self.begin_step <= step <= self.end_step
        return in_schedule and (step - self.begin_step) % self.frequency == 0

    def _update_masks(self, step):
        self.model  # noqa: B018 -- on JAX, reading `self.model` syncs the training state
        values = [
            ops.convert_to_numpy(w.variable) * ops.convert_to_numpy(m)
            for w, m in zip(self.weights, self.masks)
        ]
        masks = keep_masks(self.weights, values, self.sparsity_at(step), self.scope, self.pattern)
        for weight, variable, keep, value in zip(self.weights, self.masks, masks, values):
            # A weight pruned before stays pruned: its |w| is 0, the smallest.
            variable.assign(keep.astype(variable.dtype))
            weight.variable.assign(np.where(keep, value, 0).astype(value.dtype))


class _MaskAfterStep(keras.constraints.Constraint):
    """The constraint `Pruning` gives each pruned weight while `fit` runs:
    the weight's own constraint (`previous`) first, then its mask, after
    `update` (a `_ScheduledMask`, when the step updates masks itself)."""

    def __init__(self, mask, previous, update=None):
        self.mask, self.previous, self.update = mask, previous, update

    def __call__(self, weight):
        if self.previous is not None:
            weight = self.previous(weight)
        mask = self.mask.value
        if self.update is not None:
            mask = self.update(weight, mask)
            self.mask.assign(mask)
        return weight * ops.cast(mask, weight.dtype)


class _ScheduledMask:
    """The mask update of `Pruning(scope="layer")` inside the training step,
    in `keras.ops`: on the steps the schedule names, the smallest |w| of the
    kept weights are pruned until the weight has `floor(s_t * size)` zeros.

    `ops.top_k` needs a static count, so at most `bound` weights are pruned
    per update: the most one update of this schedule prunes (the first,
    where the polynomial is steepest), or the catch-up of a model with fewer
    zeros than the schedule's sparsity when this `fit` begins. (A sort of
    every weight each step would cost more than the step: a 546k-weight mlp
    took 5.6x its step.) The schedule is computed in float32 here; its count
    can differ by one weight from `polynomial_sparsity`'s (float64) between
    the ends."""

    def __init__(self, pruning, optimizer, value):
        # The optimizer, not `pruning.model`: on JAX reading a callback's
        # model syncs the training state, which must not happen in a step.
        self.pruning, self.optimizer, self.size = pruning, optimizer, value.size
        next_update = _next_update_step(pruning, pruning.step + 1)
        catch_up = math.floor(pruning.sparsity_at(next_update) * value.size)
        catch_up -= int(np.sum(value == 0))
        first = pruning.sparsity_at(pruning.begin_step + pruning.frequency)
        steepest = math.ceil((first - pruning.sparsity_at(pruning.begin_step)) * value.size)
        self.bound = min(value.size, max(catch_up, steepest) + 2)

    def __call__(self, weight, mask):
        p = self.pruning
        # The step this update ends: the optimizer counts it after constraints.
        step = ops.cast(self.optimizer.iterations, "int32") + 1
        offset = step - p.begin_step
        is_update = ops.logical_and(
            ops.logical_and(offset >= 0, step <= p.end_step), ops.mod(offset, p.frequency) == 0
        )
        return ops.cond(is_update, lambda: self._pruned(weight, mask, step), lambda: mask)

    def _pruned(self, weight, mask, step):
        p = self.pruning
        progress = ops.clip(
            ops.cast(step - p.begin_step, "float32") / max(1, p.end_step - p.begin_step), 0, 1
        )
        scheduled = _polynomial(progress, p.initial_sparsity, p.final_sparsity)
        kept = ops.reshape(mask, (-1,))
        zeros = self.size - ops.sum(ops.cast(kept, "int32"))
        count = ops.clip(ops.cast(ops.floor(scheduled * self.size), "int32") - zeros, 0, self.bound)
        magnitude = ops.where(kept > 0, ops.abs(ops.reshape(weight, (-1,))), float("inf"))
        # The `bound` smallest kept |w|, smallest first (ties: lower index).
        _, smallest = ops.top_k(-ops.cast(magnitude, "float32"), self.bound)
        pruned_now = ops.cast(ops.arange(self.bound) < count, mask.dtype)
        pruned = ops.scatter(ops.expand_dims(smallest, -1), pruned_now, (self.size,))
        return ops.reshape(kept * (1 - pruned), mask.shape)


def _next_update_step(pruning, step):
    """The first step at or after `step` where the schedule updates masks
    (`end_step` when none is left)."""
    step = max(step, pruning.begin_step)
    step += -(step - pruning.begin_step) % pruning.frequency
    return min(step, pruning.end_step)


def _new_mask(optimizer, keep, dtype, name):
    """A mask variable the optimizer's step reads. On JAX it must be an
    optimizer variable: the stateless step carries only the variables of
    its state, and would read any other as a constant of its first trace.
    TensorFlow's and torch's steps read a variable wherever it is; there it
    stays out of the optimizer (TensorFlow's tracked lists refuse to save
    once an item was removed)."""
    if keras.backend.backend() != "jax":
        return keras.Variable(keep, dtype=dtype, trainable=False, name=name)
    mask = optimizer.add_variable(keep.shape, dtype=dtype, name=name)
    mask.assign(keep.astype(mask.dtype))
    return mask


def _unmasked_constraint(optimizer, constraint):
    """`constraint` without a `_MaskAfterStep` a `fit` interrupted before its
    `on_train_end` left behind (its mask leaves `optimizer` too, on JAX)."""
    while isinstance(constraint, _MaskAfterStep):
        optimizer._tracker.untrack(constraint.mask)
        constraint = constraint.previous
    return constraint


def _hide_masks_from_saving(optimizer):
    """Makes `optimizer` save and load its state without the pruning masks,
    so a checkpoint written during `fit` (`ModelCheckpoint`,
    `BackupAndRestore`) loads into a model compiled as usual. Keras has no
    way to remove an optimizer variable or keep one out of its saved state:
    this wraps the instance's `save_own_variables`/`load_own_variables`,
    once, to run on a `_StoreWithoutMasks`."""
    if getattr(optimizer, "_hides_pruning_masks", False):
        return

    def without_masks(method):
        return lambda store: method(_StoreWithoutMasks(store, optimizer.variables))

    optimizer.save_own_variables = without_masks(optimizer.save_own_variables)
    optimizer.load_own_variables = without_masks(optimizer.load_own_variables)
    optimizer._hides_pruning_masks = True


class _StoreWithoutMasks:
    """An optimizer's weights store as its own `save_own_variables` and
    `load_own_variables` see it, numbered by the optimizer's variables
    (masks included), holding entries for the others only: Keras' own
    methods run unchanged, and a mask loads as itself."""

    def __init__(self, store, variables):
        self.store = store
        self.masks = {str(i): v for i, v in enumerate(variables) if v.name.startswith(MASK_NAME)}
        others = [str(i) for i in range(len(variables)) if str(i) not in self.masks]
        self.stored_key = {key: str(index) for index, key in enumerate(others)}
        self.count = len(variables)

    def keys(self):
        stored = list(self.store.keys())
        # Keras refuses a store of another size: it is, if the others' part is.
        return (
            [str(i) for i in range(self.count)] if len(stored) == len(self.stored_key) else stored
        )

    def __setitem__(self, key, value):
        if key in self.stored_key:
            self.store[self.stored_key[key]] = value

    def __getitem__(self, key):
        if key in self.masks:
            return self.masks[key].value
        return self.store[self.stored_key[key]]
