"""Small, fast access to the embedded digits arrays for tests that need real
data without a tf.data pipeline (the pipeline itself is `hlkeras.data`)."""

import os

import numpy as np

import hlkeras

DIGITS_PATH = os.path.join(os.path.dirname(hlkeras.__file__), "datasets", "digits.npz")


def load_digits_arrays():
    """Returns `(images, labels)`: float32 (1797, 8, 8, 1) in [0, 1], int32 (1797,)."""
    with np.load(DIGITS_PATH) as data:
        images = data["images"].astype("float32")[..., None] / 16.0
        labels = data["labels"].astype("int32")
    return images, labels


def digits_mlp_search_config(max_epochs):
    """The fingerprint (`hlkeras.search.search_config`) of a random search
    over the mlp on digits, as the directory tests record it."""
    from hlkeras import search

    return search.search_config(
        arch="mlp",
        dataset="digits",
        tuner="random",
        objective="val_accuracy",
        max_epochs=max_epochs,
        space=search.resolve_space("mlp"),
    )
