"""The training recipe: a warmup + cosine learning rate, AdamW compilation,
and `compile_and_fit`, which fits with the callbacks of a resumable run
directory (`hlkeras.training.callbacks`) and plots its curves.
"""

import dataclasses
import math
import os
import time

import keras
from keras import ops

from hlkeras import _validation
from hlkeras.training.callbacks import BEST_CHECKPOINT
from hlkeras.training.callbacks import CURVES_PNG
from hlkeras.training.callbacks import HISTORY_CSV
from hlkeras.training.callbacks import make_callbacks
from hlkeras.training.history import best_value
from hlkeras.training.history import first_nan_epoch
from hlkeras.training.history import plot_history
from hlkeras.training.history import read_history_rows


def new_run_dir(root="runs"):
    """Creates and returns `root/<YYYYmmdd-HHMMSS>` (with a suffix if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, stamp)
    suffix = 1
    while os.path.exists(path):
        path = os.path.join(root, f"{stamp}-{suffix}")
        suffix += 1
    os.makedirs(path)
    return path


# --- Learning rate ----------------------------------------------------------


@keras.saving.register_keras_serializable(package="hlkeras")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak_learning_rate`, then cosine decay.

    For step `s` (0-based), with `W = warmup_steps` and `T = total_steps`:
    `peak * (s + 1) / W` while `s < W`; then
    `final + (peak - final) * (1 + cos(pi * p)) / 2` with
    `p = min(1, (s - W) / max(1, T - W))`. Warmup avoids the large early
    updates that destabilize AdamW from a random start.

    Args:
        peak_learning_rate: Positive float, the rate after warmup.
        total_steps: Positive int, the number of optimizer steps of the run.
        warmup_steps: Int in [0, total_steps].
        final_learning_rate: Float >= 0, the rate at `total_steps`.

    Example:

    >>> schedule = WarmupCosine(1e-3, total_steps=100, warmup_steps=10)
    >>> round(float(schedule(9)), 6)
    0.001
    """

    def __init__(self, peak_learning_rate, total_steps, warmup_steps=0, final_learning_rate=0.0):
        if not _validation.is_number(peak_learning_rate) or not peak_learning_rate > 0:
            raise ValueError(
                "Argument `peak_learning_rate` must be a positive float. "
                f"Received: peak_learning_rate={peak_learning_rate!r}"
            )
        _validation.check_positive_int("total_steps", total_steps)
        if not _validation.is_int(warmup_steps) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"Argument `warmup_steps` must be an integer in [0, total_steps={total_steps}]. "
                f"Received: warmup_steps={warmup_steps!r}"
            )
        if not _validation.is_number(final_learning_rate) or final_learning_rate < 0:
            raise ValueError(
                "Argument `final_learning_rate` must be a float >= 0. "
                f"Received: final_learning_rate={final_learning_rate!r}"
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.final_learning_rate = float(final_learning_rate)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.peak_learning_rate
        warmup = float(self.warmup_steps)
        warmup_rate = peak * (step + 1.0) / max(warmup, 1.0)
        progress = ops.clip(
            (step - warmup) / max(float(self.total_steps - self.warmup_steps), 1.0), 0.0, 1.0
        )
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        decayed_rate = self.final_learning_rate + (peak - self.final_learning_rate) * cosine
        return ops.where(step < warmup, warmup_rate, decayed_rate)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "final_learning_rate": self.final_learning_rate,
        }


def compile_model(
    model,
    *,
    learning_rate=1e-3,
    weight_decay=1e-4,
    clipnorm=None,
    total_steps=None,
    warmup_steps=0,
    jit_compile="auto",
):
    """Compiles a classifier with AdamW, sparse categorical crossentropy and
    accuracy.

    Args:
        model: A `keras.Model` whose output is class probabilities.
        learning_rate: Positive float; the peak rate when `total_steps` is set.
        weight_decay: Float >= 0, AdamW's decoupled weight decay.
        clipnorm: Optional positive float, clips each gradient's norm.
        total_steps: Optional int; when set, the rate follows `WarmupCosine`
            over that many steps, otherwise it is constant.
        warmup_steps: Int, warmup steps of the schedule.
        jit_compile: Passed to `model.compile`. With `"auto"` Keras compiles
            on JAX, on TF only when a GPU/TPU is present, never on torch.

    Returns:
        The same model, compiled.

    Example:

    >>> model = compile_model(hlkeras.models.mlp((8, 8, 1), 10), total_steps=100)
    >>> type(model.optimizer).__name__
    'AdamW'
    """
    if not _validation.is_number(learning_rate) or not learning_rate > 0:
        raise ValueError(
            "Argument `learning_rate` must be a positive float. "
            f"Received: learning_rate={learning_rate!r}"
        )
    if clipnorm is not None and not clipnorm > 0:
        raise ValueError(
            f"Argument `clipnorm` must be None or a positive float. Received: clipnorm={clipnorm!r}"
        )
    rate = learning_rate
    if total_steps is not None:
        rate = WarmupCosine(learning_rate, total_steps, warmup_steps=warmup_steps)
    optimizer = keras.optimizers.AdamW(
        learning_rate=rate, weight_decay=weight_decay, clipnorm=clipnorm
    )
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


@dataclasses.dataclass
class FitResult:
    """What `compile_and_fit` returns.

    `rows` is the run's whole history (including epochs before a resume),
    `nan_epoch` the epoch whose loss became NaN (training stopped there) or
    None, `best_path` the best checkpoint (None if no epoch was saved), and
    `seconds` the wall time of this `fit` call.
    """

    rows: list
    nan_epoch: object
    best_path: object
    seconds: float


def compile_and_fit(
    model,
    train_ds,
    val_ds,
    *,
    run_dir,
    epochs,
    learning_rate=1e-3,
    weight_decay=1e-4,
    clipnorm=None,
    warmup_epochs=1,
    patience=10,
    tensorboard=False,
    jit_compile="auto",
    verbose="auto",
    extra_callbacks=(),
    checkpoint_of=None,
):
    """Compiles `model` (AdamW, warmup + cosine over the whole run) and fits
    it with the run-directory callbacks; resumes from `run_dir/backup` if a
    previous run there was killed.

    Args:
        model: A functional classifier (`hlkeras.models.build`).
        train_ds, val_ds: Batched datasets with a known number of batches
            (`hlkeras.data.load`); `val_ds` may be None.
        run_dir: Existing directory for the checkpoint, history and backup.
        epochs: Positive int, the total epochs of the run.
        learning_rate, weight_decay, clipnorm: See `compile_model`.
        warmup_epochs: Epochs of linear warmup (capped at `epochs`).
        patience: `EarlyStopping` patience in epochs.
        tensorboard: Whether to log to `run_dir/logs`.
        jit_compile: See `compile_model`.
        verbose: Passed to `model.fit` (Keras' own progress bar).
        extra_callbacks: More callbacks, run after the built-in ones.
        checkpoint_of: A function of `model` giving the model `best.keras`
            holds (default: `model`; a `hlkeras.distill.Distiller`'s student).

    Returns:
        A `FitResult`, written to disk as `history.csv` and `curves.png` too.
    """
    _validation.check_positive_int("epochs", epochs)
    steps_per_epoch = int(train_ds.cardinality())
    if steps_per_epoch < 1:
        raise ValueError(
            "`train_ds` must be a batched dataset with a known, non-zero number "
            f"of batches. Its cardinality is {steps_per_epoch}."
        )
    compile_model(
        model,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        clipnorm=clipnorm,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=steps_per_epoch * min(warmup_epochs, epochs),
        jit_compile=jit_compile,
    )
    monitor = "val_loss" if val_ds is not None else "loss"
    history_path = os.path.join(run_dir, HISTORY_CSV)
    callbacks = make_callbacks(
        run_dir,
        monitor=monitor,
        patience=patience,
        tensorboard=tensorboard,
        best_so_far=best_value(read_history_rows(history_path), monitor),
        checkpoint_of=checkpoint_of,
    ) + list(extra_callbacks)
    start = time.perf_counter()
    # The datasets come shuffled (`hlkeras.data`); `shuffle=False` only
    # silences Keras' warning that it cannot shuffle a tf.data.Dataset.
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,
    )
    seconds = time.perf_counter() - start
    rows = read_history_rows(history_path)
    if rows:
        plot_history(rows, os.path.join(run_dir, CURVES_PNG))
    best_path = os.path.join(run_dir, BEST_CHECKPOINT)
    return FitResult(
        rows=rows,
        nan_epoch=first_nan_epoch(rows),
        best_path=best_path if os.path.exists(best_path) else None,
        seconds=seconds,
    )


def nan_message(result, monitor="val_loss"):
    """The one-line explanation of a run stopped by a NaN loss."""
    message = f"the loss became NaN in epoch {result.nan_epoch + 1}; training stopped."
    best = best_value(result.rows, monitor)
    if result.best_path and best is not None:
        message += f" The best checkpoint ({monitor}={best:.4g}) is kept at {result.best_path}."
    else:
        message += " No epoch finished with a finite loss, so there is no checkpoint."
    return message + " Try a lower --lr, or --clipnorm."
