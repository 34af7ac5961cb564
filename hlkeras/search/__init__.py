"""Hyperparameter search over the hlkeras model builders with KerasTuner.

- `space`: the default space of each architecture (`SEARCH_SPACES`) and the
  notation a user narrows it with (a dict, or a TOML/JSON file).
- `hypermodel`: `SpecHyperModel`, KerasTuner's `hp` -> a `hlkeras.models`
  spec compiled with the training recipe.
- `tuners`: resumable tuners with per-trial records (`make_tuner`), the
  directory fingerprint (`check_search_dir`), `run_trials`.
- `reports`: `trials.csv`, `trials.png`, `best_spec.json`, the leaderboard.
- `run`: `run_search`, the whole search as `hlkeras tune` runs it, and
  `retrain_best`.
- `workers`: a chief and N worker processes on this machine.

Example:

>>> from hlkeras import search
>>> sorted(search.SEARCH_SPACES)
['mlp', 'resnet', 'text', 'vit']
"""

from hlkeras.search.budget import DeviceBudget
from hlkeras.search.hypermodel import SpecHyperModel
from hlkeras.search.hypermodel import trial_pruning
from hlkeras.search.outcome import BEST_MODEL
from hlkeras.search.outcome import BEST_TFLITE
from hlkeras.search.outcome import RETRAIN_DIR
from hlkeras.search.outcome import SearchError
from hlkeras.search.outcome import SearchOutcome
from hlkeras.search.reports import BEST_SPEC_JSON
from hlkeras.search.reports import BEST_TRIAL_JSON
from hlkeras.search.reports import PARETO_PNG
from hlkeras.search.reports import TRIALS_CSV
from hlkeras.search.reports import TRIALS_PNG
from hlkeras.search.reports import best_values
from hlkeras.search.reports import leaderboard
from hlkeras.search.reports import plot_trials
from hlkeras.search.reports import ranked
from hlkeras.search.reports import read_trials_csv
from hlkeras.search.reports import trial_rows
from hlkeras.search.reports import write_reports
from hlkeras.search.reports import write_trials_csv
from hlkeras.search.run import OBJECTIVES
from hlkeras.search.run import SEARCH_DEFAULTS
from hlkeras.search.run import retrain_best
from hlkeras.search.run import run_search
from hlkeras.search.space import SEARCH_SPACES
from hlkeras.search.space import TRAINING_KEYS
from hlkeras.search.space import declare
from hlkeras.search.space import load_space
from hlkeras.search.space import parse_entry
from hlkeras.search.space import resolve_space
from hlkeras.search.space import space_arch
from hlkeras.search.space import tunable_keys
from hlkeras.search.tuners import MAX_CONSECUTIVE_FAILED_TRIALS
from hlkeras.search.tuners import SEARCH_CONFIG_JSON
from hlkeras.search.tuners import SEARCH_PROJECT
from hlkeras.search.tuners import TRIAL_ERROR_FILE
from hlkeras.search.tuners import TRIAL_TUNER_FILE
from hlkeras.search.tuners import TUNERS
from hlkeras.search.tuners import BayesianTuner
from hlkeras.search.tuners import HyperbandTuner
from hlkeras.search.tuners import RandomSearchTuner
from hlkeras.search.tuners import check_search_dir
from hlkeras.search.tuners import make_tuner
from hlkeras.search.tuners import run_trials
from hlkeras.search.tuners import search_config

__all__ = [
    "BEST_MODEL",
    "BEST_TFLITE",
    "BEST_SPEC_JSON",
    "BEST_TRIAL_JSON",
    "BayesianTuner",
    "DeviceBudget",
    "HyperbandTuner",
    "MAX_CONSECUTIVE_FAILED_TRIALS",
    "OBJECTIVES",
    "PARETO_PNG",
    "RETRAIN_DIR",
    "RandomSearchTuner",
    "SEARCH_CONFIG_JSON",
    "SEARCH_DEFAULTS",
    "SEARCH_PROJECT",
    "SEARCH_SPACES",
    "SearchError",
    "SearchOutcome",
    "SpecHyperModel",
    "TRAINING_KEYS",
    "TRIALS_CSV",
    "TRIALS_PNG",
    "TRIAL_ERROR_FILE",
    "TRIAL_TUNER_FILE",
    "TUNERS",
    "best_values",
    "check_search_dir",
    "declare",
    "leaderboard",
    "load_space",
    "make_tuner",
    "parse_entry",
    "plot_trials",
    "ranked",
    "read_trials_csv",
    "resolve_space",
    "retrain_best",
    "trial_pruning",
    "run_search",
    "run_trials",
    "search_config",
    "space_arch",
    "trial_rows",
    "tunable_keys",
    "write_reports",
    "write_trials_csv",
]
