"""A hyperparameter search on digits with the Python API (what `hlkeras tune`
does, in one call), to copy and adapt. Run from the project root:

    python tuning/search_digits.py tuning/digits_mlp.toml runs/search-digits-mlp

Results (trials.csv, trials.png, best_spec.json, best.keras) go to the
directory given as the second argument; run it again to continue the search
(a directory holding a different search is refused). Optional third and
fourth arguments: the trial cap (default 60) and epochs per full trial
(default 27).
"""

import sys

from hlkeras import search

space_file = sys.argv[1] if len(sys.argv) > 1 else "tuning/digits_mlp.toml"
directory = sys.argv[2] if len(sys.argv) > 2 else "runs/search-digits"
max_trials = int(sys.argv[3]) if len(sys.argv) > 3 else 60
max_epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 27

outcome = search.run_search(
    space=space_file,
    dataset="digits",
    tuner="hyperband",
    max_trials=max_trials,
    max_epochs=max_epochs,
    directory=directory,
)
if outcome.error:
    sys.exit(f"search_digits: {outcome.error}")
print(f"best model: {outcome.best_path} (val_accuracy {outcome.best_val_accuracy:.4f})")
