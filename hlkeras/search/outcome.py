"""What a search produces and how it fails: the best-model file names,
`SearchError` and `SearchOutcome`, shared by `run_search` (`search.run`) and
the chief/worker processes (`search.workers`), which read an outcome back
from the files a chief wrote."""

import dataclasses
import os

from hlkeras import training

BEST_MODEL = "best.keras"
BEST_TFLITE = "best.tflite"
BEST_EXPORT_DIR = "export"  # the export of best.keras behind best.tflite, with its report
RETRAIN_DIR = "retrain"


class SearchError(ValueError):
    """A user mistake about a search (its settings, space or directory), in one line."""


@dataclasses.dataclass
class SearchOutcome:
    """What `run_search` did.

    Attributes:
        directory: The search directory.
        rows: One dict per trial (as in `trials.csv`); None in a worker.
        best_values: The best trial's hyperparameters; None when no trial
            completed (then `error` says so) or in a worker.
        best_spec: The `hlkeras.models` spec of the best trial.
        best_path: The retrained best model (`DIR/best.keras`).
        best_val_accuracy: The retrained model's best validation accuracy.
        best_tflite: With a device budget, `DIR/best.tflite`, the retrained
            best model exported and verified (its report in `DIR/export/`).
        error: Why the search produced no best model, else None.
    """

    directory: str
    rows: list = None
    best_values: dict = None
    best_spec: dict = None
    best_path: str = None
    best_val_accuracy: float = None
    best_tflite: str = None
    error: str = None


def retrained_val_accuracy(directory):
    """The best validation accuracy of the retraining in `directory`, or None."""
    path = os.path.join(directory, RETRAIN_DIR, training.HISTORY_CSV)
    if not os.path.exists(path):
        return None
    return training.best_value(training.read_history_rows(path), "val_accuracy")
