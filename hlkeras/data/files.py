"""A user's own files (`load_path`): a folder of class subfolders of
images, a CSV table, a `.npz` of arrays, or a CSV of texts, split and fed
through the same pipelines as a TFDS dataset."""

import os

import numpy as np
import tensorflow as tf

from hlkeras import _validation
from hlkeras.data import texts
from hlkeras.data.images import read_image_folder
from hlkeras.data.pipeline import DatasetInfo
from hlkeras.data.pipeline import Examples
from hlkeras.data.pipeline import as_features
from hlkeras.data.pipeline import augmenter
from hlkeras.data.pipeline import check_loading_arguments
from hlkeras.data.pipeline import make_pipeline
from hlkeras.data.pipeline import scale_images
from hlkeras.data.pipeline import split_counts
from hlkeras.data.pipeline import text_datasets
from hlkeras.data.tables import DatasetError
from hlkeras.data.tables import check_finite_array
from hlkeras.data.tables import csv_features
from hlkeras.data.tables import labels_to_ids
from hlkeras.data.tables import read_csv_rows
from hlkeras.data.tables import read_npz


def load_path(
    path,
    *,
    batch_size=64,
    validation_split=0.1,
    test_split=0.2,
    seed=0,
    image_size=None,
    color_mode=None,
    label="label",
    augment=False,
    text_column=None,
    max_length=None,
    vocab_size=20_000,
    tokenizer=None,
):
    """Loads a user's own classification data as batched `tf.data` pipelines,
    like `load` does a TFDS dataset.

    What `path` is decides how it is read:
    - a folder of class subfolders of images (png, jpg, bmp, gif): images,
      resized to `image_size` (default: the first image's size) in
      `color_mode` (default: the first image's). A folder holding `train/`
      (and optionally `val/`, `test/`) class folders gives the splits;
    - a `.csv` file: the `label` column and numeric feature columns;
    - a `.npz` file: arrays `x` and `y`, optionally `x_test` and `y_test`;
    - a `.csv` file with `text_column` given: texts and their `label`,
      tokenized (`hlkeras.data.texts.Tokenizer`, fitted on the training split
      with `vocab_size` ids and `max_length`, or the given `tokenizer`) into
      int32 token ids.

    Splits the files do not give are drawn from the training examples by a
    permutation of `seed`: `test_split` of them for test, then
    `validation_split` for validation. Images are scaled to [0, 1] as TFDS
    images are; tables keep their values, and `info.feature_mean` /
    `info.feature_variance` (of the training split) let the model normalize.
    `augment` augments the training images (`augmenter`; tables never).

    Returns:
        `(train_ds, val_ds, test_ds, info)` as `load` returns them.

    Raises:
        DatasetError: naming the file, column or array that is wrong.
    """
    check_loading_arguments(batch_size, validation_split)
    _validation.check_rate("test_split", test_split, error=DatasetError)
    if text_column is not None:
        splits, class_names = _read_text_csv(path, text_column, label)
        kind = "text"
    else:
        splits, class_names, kind = read_path(
            path, image_size=image_size, color_mode=color_mode, label=label
        )
    splits = _draw_missing_splits(splits, validation_split, test_split, seed)
    if len(splits["train"].y) < 1:
        raise DatasetError(f"--data {path}: no training examples are left after the splits")
    if kind == "text":
        name = os.path.basename(os.path.normpath(path))
        return text_datasets(
            splits, class_names, name, batch_size, seed, tokenizer or (max_length, vocab_size)
        )
    # uint8 images are scaled to [0, 1] as TFDS images are; floats are kept.
    scale = scale_images if splits["train"].x.dtype == np.uint8 else as_features
    datasets = {}
    for name, examples in splits.items():
        if examples is None or not len(examples.y):
            datasets[name] = None
            continue
        dataset = tf.data.Dataset.from_tensor_slices((examples.x, examples.y))
        datasets[name] = make_pipeline(
            dataset,
            len(examples.y),
            batch_size,
            shuffle_seed=seed if name == "train" else None,
            scale=scale,
            augment=augmenter(seed) if augment and kind == "images" else None,
        )
    info = DatasetInfo(
        name=os.path.basename(os.path.normpath(path)),
        input_shape=tuple(splits["train"].x.shape[1:]),
        num_classes=len(class_names),
        class_names=tuple(class_names),
        **split_counts(splits),
        kind=kind,
        **_feature_statistics(splits["train"].x, kind),
    )
    return datasets["train"], datasets["val"], datasets["test"], info


def _read_text_csv(path, text_column, label):
    if os.path.splitext(os.fspath(path))[1].lower() != ".csv" or not os.path.isfile(path):
        raise DatasetError(f"--text-column needs --data to be a .csv file, got {path}")
    text_values, label_values = texts.read_text_csv(path, text_column, label)
    labels, class_names = labels_to_ids(label_values, f"--data {path}")
    examples = Examples(np.asarray(text_values, dtype=object), labels)
    return {"train": examples, "val": None, "test": None}, class_names


def read_path(path, *, image_size=None, color_mode=None, label="label"):
    """`(splits, class_names, kind)` of the files at `path` (see `load_path`);
    `splits` maps "train" / "val" / "test" to `Examples`, or None for a split
    the files do not give."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError(f"--data {path}: no such file or folder")
    if os.path.isdir(path):
        splits, class_names = read_image_folder(path, image_size, color_mode)
        return splits, class_names, "images"
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        examples, class_names = _read_csv(path, label)
        return {"train": examples, "val": None, "test": None}, class_names, "table"
    if extension == ".npz":
        return _read_npz(path)
    raise DatasetError(
        f"--data {path}: expected a folder of class subfolders of images, a .csv or a .npz file"
    )


def _draw_missing_splits(splits, validation_split, test_split, seed):
    """Draws the test and validation splits the files did not give from the
    training examples, by a permutation of `seed`."""
    train = splits["train"]
    order = np.random.default_rng(seed).permutation(len(train.y))
    taken = 0
    drawn = dict(splits)
    for name, fraction in (("test", test_split), ("val", validation_split)):
        if splits[name] is None and fraction:
            count = int(round(len(order) * fraction))
            ids = np.sort(order[taken : taken + count])
            drawn[name] = Examples(train.x[ids], train.y[ids])
            taken += count
    ids = np.sort(order[taken:])
    drawn["train"] = Examples(train.x[ids], train.y[ids])
    return drawn


def _feature_statistics(x, kind):
    if kind != "table":
        return {}
    return {
        "feature_mean": tuple(float(v) for v in x.mean(axis=0)),
        "feature_variance": tuple(float(v) for v in x.var(axis=0)),
    }


def _read_csv(path, label):
    rows = read_csv_rows(path, f"--data {path}")
    if not rows:
        raise DatasetError(f"--data {path}: the CSV file is empty")
    header, body = [name.strip() for name in rows[0][1]], rows[1:]
    if label not in header:
        raise DatasetError(
            f"--data {path}: no label column {label!r} (pass --label COL); the columns are {header}"
        )
    if not body:
        raise DatasetError(f"--data {path}: the CSV file has a header but no rows")
    label_index = header.index(label)
    feature_columns = [i for i in range(len(header)) if i != label_index]
    if not feature_columns:
        raise DatasetError(f"--data {path}: no feature columns besides {label!r}")
    features = csv_features(header, body, feature_columns, f"--data {path}")
    labels, class_names = labels_to_ids([row[label_index] for _, row in body], f"--data {path}")
    return Examples(features, labels), class_names


def _read_npz(path):
    arrays = read_npz(path, f"--data {path}")
    missing = [name for name in ("x", "y") if name not in arrays]
    if missing:
        raise DatasetError(
            f"--data {path}: needs arrays 'x' and 'y' (optionally 'x_test', 'y_test'); "
            f"found {sorted(arrays)}"
        )
    pairs = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in arrays else [])
    for x_name, y_name in pairs:
        if y_name not in arrays or len(arrays[x_name]) != len(arrays[y_name]):
            given = len(arrays[y_name]) if y_name in arrays else "no"
            raise DatasetError(
                f"--data {path}: len({x_name}) = {len(arrays[x_name])} but {given} {y_name}"
            )
    all_labels = np.concatenate([arrays["y"]] + ([arrays["y_test"]] if len(pairs) > 1 else []))
    ids, class_names = labels_to_ids(all_labels.tolist(), f"--data {path}")
    x = arrays["x"]
    kind = "table" if x.ndim == 2 else "images"
    if kind == "table" or x.dtype != np.uint8:
        # Checked as float32: a float64 beyond its range becomes inf here.
        x = x.astype("float32")
        check_finite_array(x, f"--data {path}", "x")
    if x.ndim == 3:
        x = x[..., None]  # (n, height, width) grayscale images
    splits = {"train": Examples(x[: len(arrays["y"])], ids[: len(arrays["y"])])}
    splits["val"] = None
    splits["test"] = None
    if len(pairs) > 1:
        x_test = arrays["x_test"].astype(x.dtype)
        check_finite_array(x_test, f"--data {path}", "x_test")
        splits["test"] = Examples(
            x_test[..., None] if x_test.ndim == 3 else x_test, ids[len(arrays["y"]) :]
        )
    return splits, class_names, kind
