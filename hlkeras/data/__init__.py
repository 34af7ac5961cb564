"""Data for hlkeras: TFDS datasets and the embedded `digits` (`tfds`), a
user's own files (`files`: image folders, CSV tables, `.npz` arrays, CSVs of
texts), the tf.data pipelines that feed `model.fit` on every backend
(`pipeline`), texts as token ids (`texts`), and the arrays that calibrate and
verify an export (`arrays`).

The names below load their submodule on first use: `hlkeras.data.tables`,
`.texts` and `.settings` need no TensorFlow, the others import it.

Example:

>>> train_ds, val_ds, test_ds, info = hlkeras.data.load("digits")
>>> info.input_shape, info.num_classes
((8, 8, 1), 10)
"""

import importlib

_NAMES = {
    "tables": ("DatasetError", "MISSING_VALUES_HINT"),
    "settings": ("DATA_FILE_DEFAULTS",),
    "pipeline": (
        "DatasetInfo",
        "Examples",
        "MAX_SHUFFLE_BUFFER",
        "augmenter",
        "evenly_divisible_batches",
        "to_numpy",
    ),
    "tfds": ("EMBEDDED_DATASETS", "Digits", "load", "prepare", "representative_samples"),
    "images": ("COLOR_MODES", "IMAGE_EXTENSIONS", "SPLIT_FOLDERS", "read_image", "read_images"),
    "files": ("load_path", "read_path"),
    "sources": ("load_for", "load_source"),
}
_SUBMODULE_OF = {name: module for module, names in _NAMES.items() for name in names}
_SUBMODULES = (*_NAMES, "arrays", "texts")
__all__ = sorted(_SUBMODULE_OF)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"hlkeras.data.{name}")
    if name in _SUBMODULE_OF:
        module = importlib.import_module(f"hlkeras.data.{_SUBMODULE_OF[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'hlkeras.data' has no attribute {name!r}")
