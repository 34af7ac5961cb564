"""Training: the recipe (warmup + cosine AdamW, `compile_and_fit`), the
callbacks of a resumable run directory, its history, a whole run
(`hlkeras.training.run`: what `hlkeras train` does) and `--distribute`
(`hlkeras.training.distribute`).

`import hlkeras.training` imports Keras but not TensorFlow; `run` and
`distribute` load when imported by name.
"""

from hlkeras.training.callbacks import BACKUP_DIR
from hlkeras.training.callbacks import BEST_CHECKPOINT
from hlkeras.training.callbacks import CURVES_PNG
from hlkeras.training.callbacks import HISTORY_CSV
from hlkeras.training.callbacks import AtomicBackupAndRestore
from hlkeras.training.callbacks import AtomicModelCheckpoint
from hlkeras.training.callbacks import HistoryCSV
from hlkeras.training.callbacks import LearningRateLogger
from hlkeras.training.callbacks import RoutingStatistics
from hlkeras.training.callbacks import make_callbacks
from hlkeras.training.callbacks import scalar_logs
from hlkeras.training.history import best_value
from hlkeras.training.history import first_nan_epoch
from hlkeras.training.history import history_columns
from hlkeras.training.history import monitor_mode
from hlkeras.training.history import plot_history
from hlkeras.training.history import read_history_rows
from hlkeras.training.history import write_history_rows
from hlkeras.training.recipe import FitResult
from hlkeras.training.recipe import WarmupCosine
from hlkeras.training.recipe import compile_and_fit
from hlkeras.training.recipe import compile_model
from hlkeras.training.recipe import nan_message
from hlkeras.training.recipe import new_run_dir

__all__ = [
    "AtomicBackupAndRestore",
    "AtomicModelCheckpoint",
    "BACKUP_DIR",
    "BEST_CHECKPOINT",
    "CURVES_PNG",
    "FitResult",
    "HISTORY_CSV",
    "HistoryCSV",
    "LearningRateLogger",
    "RoutingStatistics",
    "WarmupCosine",
    "best_value",
    "compile_and_fit",
    "compile_model",
    "first_nan_epoch",
    "history_columns",
    "make_callbacks",
    "monitor_mode",
    "nan_message",
    "new_run_dir",
    "plot_history",
    "read_history_rows",
    "scalar_logs",
    "write_history_rows",
]
