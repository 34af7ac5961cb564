"""The training recipe: a warmup + cosine learning rate, AdamW compilation,
the callbacks of a resumable run directory, and its curves plot.

A run directory holds `best.keras` (best checkpoint), `history.csv` (one row
per finished epoch, kept across resumes), `backup/` (the state a killed run
resumes from) and `curves.png`. Every file is written to a temporary name and
renamed into place, so a killed process never leaves a half-written file.
"""

import csv
import dataclasses
import json
import math
import os
import time

import keras
import numpy as np
from keras import ops

from hlkeras import _compat
from hlkeras import _validation
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import moe

BEST_CHECKPOINT = "best.keras"
HISTORY_CSV = "history.csv"
BACKUP_DIR = "backup"
CURVES_PNG = "curves.png"


# --- Atomic files ---------------------------------------------------------


def _partial_path(path, suffix=""):
    """A temporary sibling of `path`; `suffix` keeps an extension Keras needs."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.partial-{os.getpid()}{suffix}")


def atomic_write_bytes(path, data):
    partial = _partial_path(path)
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_figure_atomic(figure, path):
    """Saves a matplotlib `figure` as a PNG through a temporary file and a rename."""
    partial = _partial_path(path, ".png")
    figure.savefig(partial, dpi=100)
    os.replace(partial, path)


def save_model_atomic(model, path):
    """`model.save(path)` through a temporary `.keras` file and a rename."""
    partial = _partial_path(path, ".keras")
    model.save(partial)
    os.replace(partial, path)


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


# --- Callbacks --------------------------------------------------------------


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current `learning_rate` to each epoch's logs, so
    the history file and the curves plot show the schedule."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            rate = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(ops.convert_to_numpy(rate))


class RoutingStatistics(keras.callbacks.Callback):
    """Logs each epoch's routing statistics of the `MixtureOfExperts` layers.

    It adds two aggregates over all MoE layers (nested ones included) to the
    epoch logs, measured over that epoch's training steps, so the progress
    bar and `History` show them: `moe_dropped_fraction` (the mean over layers
    of the fraction of token-to-expert assignments dropped by capacity) and
    `moe_max_expert_load` (the largest layer's busiest expert's load over the
    mean). Per layer, `<layer name>_dropped_fraction` and
    `<layer name>_max_expert_load` are kept in `per_layer` for the epoch
    (`HistoryCSV` writes them to `history.csv`), and each epoch's per-expert
    loads (`(E,)` shares of the assignments) in `expert_load[layer_name]`.
    Validation adds nothing. It reads the totals the layers keep as state, so
    it works on every backend, JAX's stateless `fit` included.

    Put it before callbacks that read those logs (it mutates the logs dict
    Keras passes along).

    Example:

    ```python
    model.fit(x, y, epochs=3, callbacks=[RoutingStatistics()])
    ```
    """

    def on_train_begin(self, logs=None):
        self.moe_layers = [
            layer for layer in _compat.sublayers(self.model) if isinstance(layer, MixtureOfExperts)
        ]
        self.expert_load = {layer.name: [] for layer in self.moe_layers}
        self.per_layer = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self._routing_totals()

    def on_epoch_end(self, epoch, logs=None):
        epoch_end = self._routing_totals()
        self.per_layer = {}
        dropped, max_loads = [], []
        for layer in self.moe_layers:
            totals, start = epoch_end[layer.name], self.epoch_start[layer.name]
            summary = moe.routing_summary(*(now - then for now, then in zip(totals, start)))
            self.expert_load[layer.name].append(summary["expert_load"])
            if summary["calls"] > 0:
                self.per_layer[f"{layer.name}_dropped_fraction"] = summary["dropped_fraction"]
                self.per_layer[f"{layer.name}_max_expert_load"] = summary["max_expert_load"]
                dropped.append(summary["dropped_fraction"])
                max_loads.append(summary["max_expert_load"])
        if logs is not None and dropped:
            logs["moe_dropped_fraction"] = float(np.mean(dropped))
            logs["moe_max_expert_load"] = float(np.max(max_loads))

    def _routing_totals(self):
        """`{layer name: (calls, dropped total, load totals)}` as NumPy."""
        self.model  # On JAX, reading `self.model` syncs the training state.
        return {
            layer.name: tuple(
                np.array(ops.convert_to_numpy(variable), dtype="float64")
                for variable in (
                    layer.routing_calls,
                    layer.routing_dropped_total,
                    layer.routing_load_total,
                )
            )
            for layer in self.moe_layers
        }


class HistoryCSV(keras.callbacks.Callback):
    """One CSV row per finished epoch, rewritten atomically every epoch.

    Unlike `keras.callbacks.CSVLogger`, which appends, it drops rows at or
    after the epoch a resumed run restarts from, so a run killed between
    writing a row and writing its backup never records an epoch twice.
    `extra_columns`, a callable returning a dict, adds columns the progress
    bar should not show (e.g. `RoutingStatistics.per_layer`).
    """

    def __init__(self, path, extra_columns=None):
        super().__init__()
        self.path = path
        self.rows = []
        self.extra_columns = extra_columns or dict

    def on_train_begin(self, logs=None):
        self.rows = read_history_rows(self.path)

    def on_epoch_begin(self, epoch, logs=None):
        self.rows = [row for row in self.rows if int(row["epoch"]) < epoch]

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **scalar_logs({**(logs or {}), **self.extra_columns()})})
        write_history_rows(self.path, self.rows)


def scalar_logs(logs):
    """Flattens epoch logs to scalars: a vector metric such as the MoE
    per-expert load becomes one column per entry (`name_0`, `name_1`, ...)."""
    scalars = {}
    for name, value in logs.items():
        values = np.ravel(np.asarray(value, dtype="float64"))
        if values.size == 1:
            scalars[name] = float(values[0])
        else:
            scalars.update({f"{name}_{i}": float(v) for i, v in enumerate(values)})
    return scalars


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint(save_best_only=True)` that writes a temporary file and
    renames it, so a kill during the save keeps the previous best intact.

    An epoch whose loss or monitored value is NaN or infinite is never saved
    (Keras' own callback saves the first epoch whatever its value).
    """

    def __init__(self, filepath, **kwargs):
        self.final_path = filepath
        super().__init__(_partial_path(filepath, ".keras"), save_best_only=True, **kwargs)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        values = [logs.get("loss", 0.0), logs.get(self.monitor, 0.0)]
        if not all(math.isfinite(float(v)) for v in values):
            return
        super().on_epoch_end(epoch, logs)
        if os.path.exists(self.filepath):
            os.replace(self.filepath, self.final_path)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose weights and epoch counter are each written to
    a temporary file and renamed. (Keras writes them in place, so a SIGKILL
    during the write would leave a backup that fails to load.)"""

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        partial_weights = _partial_path(self._weights_path, ".weights.h5")
        self.model.save_weights(partial_weights, overwrite=True)
        os.replace(partial_weights, self._weights_path)
        # The counter goes last: a kill between the two renames only means
        # the newest epoch is trained once more.
        atomic_write_json(
            self._training_metadata_path,
            {"epoch": self._current_epoch, "batch": self._last_batch_seen},
        )


def make_callbacks(
    run_dir,
    *,
    monitor="val_loss",
    patience=10,
    tensorboard=False,
    best_so_far=None,
):
    """The callbacks of a resumable run in `run_dir`.

    In order: learning-rate and MoE routing logging, `TerminateOnNaN`, the
    history CSV, the best checkpoint (`best.keras`, by `monitor`),
    `EarlyStopping`, and the backup a killed run resumes from; `TensorBoard`
    (logs in `run_dir/logs`) when asked. The history row is written before the backup, so a finished
    epoch is always in the history.

    Args:
        run_dir: The run directory.
        monitor: The logged metric that decides the best epoch (minimized
            for losses, maximized otherwise).
        patience: Positive int, epochs without improvement before stopping.
        tensorboard: Whether to add a `TensorBoard` callback.
        best_so_far: The best `monitor` value of the run before a resume, so
            the checkpoint is only replaced by a better epoch.
    """
    routing = RoutingStatistics()
    return [
        LearningRateLogger(),
        routing,
        keras.callbacks.TerminateOnNaN(),
        HistoryCSV(os.path.join(run_dir, HISTORY_CSV), extra_columns=lambda: routing.per_layer),
        AtomicModelCheckpoint(
            os.path.join(run_dir, BEST_CHECKPOINT),
            monitor=monitor,
            initial_value_threshold=best_so_far,
            verbose=0,
        ),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience),
        AtomicBackupAndRestore(os.path.join(run_dir, BACKUP_DIR)),
    ] + ([keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"))] if tensorboard else [])


# --- History ----------------------------------------------------------------


def read_history_rows(path):
    """The rows of a history CSV as dicts of floats (`epoch` as int); [] if absent."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
        for row in rows
    ]


def write_history_rows(path, rows):
    keys = ["epoch"] + sorted({k for row in rows for k in row} - {"epoch"})
    lines = [",".join(keys)]
    for row in rows:
        lines.append(",".join(repr(row[k]) if k in row else "" for k in keys))
    atomic_write_text(path, "\n".join(lines) + "\n")


def history_columns(rows):
    """Rows → `{metric: [value per epoch]}` (NaN where an epoch lacks it)."""
    keys = sorted({k for row in rows for k in row})
    return {k: [row.get(k, float("nan")) for row in rows] for k in keys}


def first_nan_epoch(rows):
    """The first epoch whose loss is NaN or infinite, or None."""
    for row in rows:
        if not math.isfinite(row.get("loss", 0.0)):
            return int(row["epoch"])
    return None


def monitor_mode(monitor):
    """`"min"` for a loss, else `"max"` (the `mode` of Keras callbacks and
    the direction of a KerasTuner objective)."""
    return "min" if "loss" in monitor else "max"


def best_value(rows, monitor):
    """The best finite `monitor` value in `rows` (min for losses), or None."""
    values = [row[monitor] for row in rows if monitor in row and math.isfinite(row[monitor])]
    if not values:
        return None
    return min(values) if monitor_mode(monitor) == "min" else max(values)


def plot_history(rows, path):
    """Writes a PNG with the loss, accuracy and learning-rate curves.

    Args:
        rows: History rows (`read_history_rows`), or a `{metric: values}`
            dict such as `keras.callbacks.History.history`.
        path: The PNG file to write (atomically).
    """
    # The object-oriented Agg API leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = rows if isinstance(rows, dict) else history_columns(rows)
    num_epochs = max(len(v) for v in columns.values())
    epochs = columns.get("epoch", list(range(num_epochs)))
    epochs = [e + 1 for e in epochs]
    panels = [("loss", "loss"), ("accuracy", "accuracy"), ("learning_rate", "learning rate")]
    panels = [p for p in panels if p[0] in columns]
    figure = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    for i, (metric, title) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        axes.plot(epochs, columns[metric], marker=".", label="train")
        if f"val_{metric}" in columns:
            axes.plot(epochs, columns[f"val_{metric}"], marker=".", label="validation")
            axes.legend()
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    save_figure_atomic(figure, path)


# --- The recipe ---------------------------------------------------------------


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
