"""A hyperparameter search on digits with the Python API (what `hlkeras tune`
does), to copy and adapt. Run from the project root:

    python tuning/search_digits.py tuning/digits_mlp.toml runs/search-digits-mlp

Results (trials.csv, trials.png, best_spec.json, best.keras) go to the
directory given as the second argument; run it again to continue the search.
"""

import sys

from hlkeras import data
from hlkeras import hypermodels

space_file = sys.argv[1] if len(sys.argv) > 1 else "tuning/digits_mlp.toml"
directory = sys.argv[2] if len(sys.argv) > 2 else "runs/search-digits"
max_epochs = 27

overrides = hypermodels.load_space(space_file)
train_ds, val_ds, _, info = data.load("digits")
x_train, y_train = data.to_numpy(train_ds)
x_val, y_val = data.to_numpy(val_ds)
hypermodel = hypermodels.SpecHyperModel(
    hypermodels.space_arch(overrides),
    info.input_shape,
    info.num_classes,
    overrides,
    num_train=len(x_train),
    epochs=max_epochs,
)
tuner = hypermodels.make_tuner(
    "hyperband", hypermodel, directory=directory, max_trials=60, max_epochs=max_epochs
)
hypermodels.search(tuner, x_train, y_train, validation_data=(x_val, y_val), epochs=max_epochs)
rows, best = hypermodels.write_reports(tuner, hypermodel, directory)
print("\n".join(hypermodels.leaderboard(rows, hypermodel.space, "val_accuracy")))
train_ds, val_ds, _, _ = data.load("digits", batch_size=best["batch_size"])
hypermodels.retrain_best(hypermodel, best, train_ds, val_ds, directory, epochs=max_epochs)
print(f"best model: {directory}/{hypermodels.BEST_MODEL}")
