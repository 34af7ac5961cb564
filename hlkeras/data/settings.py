"""How `--data PATH` is read: the settings `hlkeras train` and `hlkeras tune`
share, named as their flags, with their defaults. A module of its own so the
CLI and the settings tables get them without importing TensorFlow
(`hlkeras.data.load_for` passes them to `load_path`)."""

DATA_FILE_DEFAULTS = {
    "image_size": None,  # the first image's size
    "color_mode": None,  # the first image's
    "label": "label",
    "val_split": 0.1,
    "test_split": 0.2,
    "text_column": None,  # a CSV of texts: the column to classify
    "max_length": None,  # texts: the length covering 95% of the training texts
    "vocab_size": 20_000,  # texts: token ids, with padding and unknown words
}
