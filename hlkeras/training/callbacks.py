"""The callbacks of a resumable run directory: learning-rate and MoE routing
logging, the history CSV, the best checkpoint and the backup, each file
written atomically.

A run directory holds `best.keras` (best checkpoint), `history.csv` (one row
per finished epoch, kept across resumes), `backup/` (the state a killed run
resumes from) and `curves.png`.
"""

import math
import os

import keras
import numpy as np
from keras import ops

from hlkeras import _compat
from hlkeras._files import atomic_write_json
from hlkeras._files import partial_path
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import moe_ops
from hlkeras.training.history import read_history_rows
from hlkeras.training.history import write_history_rows

BEST_CHECKPOINT = "best.keras"
HISTORY_CSV = "history.csv"
BACKUP_DIR = "backup"
CURVES_PNG = "curves.png"


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
            summary = moe_ops.routing_summary(*(now - then for now, then in zip(totals, start)))
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
    `checkpoint_of`, a function of the trained model, picks the part that is
    saved instead (a `hlkeras.distill.Distiller`'s student).
    """

    def __init__(self, filepath, checkpoint_of=None, **kwargs):
        self.final_path = filepath
        self.checkpoint_of = checkpoint_of
        super().__init__(partial_path(filepath, ".keras"), save_best_only=True, **kwargs)

    @property
    def model(self):
        # Read through Keras' property first: on JAX it syncs the trained
        # state into the variables, the checkpointed part's too.
        trained = super().model
        return trained if self.checkpoint_of is None else self.checkpoint_of(trained)

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
        partial_weights = partial_path(self._weights_path, ".weights.h5")
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
    checkpoint_of=None,
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
        checkpoint_of: See `AtomicModelCheckpoint`.
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
            checkpoint_of=checkpoint_of,
            verbose=0,
        ),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience),
        AtomicBackupAndRestore(os.path.join(run_dir, BACKUP_DIR)),
    ] + ([keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"))] if tensorboard else [])
