"""Gradual magnitude pruning during `fit`: tfmot's polynomial schedule and
the `Pruning` callback."""

import keras
from keras import ops

from hlkeras import _validation
from hlkeras.prune.masks import check_scope
from hlkeras.prune.masks import check_sparsity
from hlkeras.prune.masks import check_target
from hlkeras.prune.masks import keep_masks
from hlkeras.prune.masks import prunable_weights

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
        self.step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.weights = prunable_weights(self.model, self.targets, pattern=self.pattern)
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
        masks = keep_masks(self.weights, values, self.sparsity_at(step), self.scope, self.pattern)
        for variable, keep in zip(self.masks, masks):
            # A weight pruned before stays pruned: its |w| is 0, the smallest.
            variable.assign(keep.astype(variable.dtype))
