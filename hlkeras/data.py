"""Datasets for hlkeras: TFDS loading into `tf.data` pipelines that feed
`model.fit` on every Keras backend, the embedded default dataset `digits`,
and a user's own files (`load_path`: a folder of class subfolders of images,
a CSV table, or a `.npz` of arrays).

`digits` (1,797 8x8 handwritten digits, shipped in `hlkeras/datasets/`) is a
real TFDS builder registered when this module is imported, so it goes through
the same code path as `mnist`, `fashion_mnist` or `cifar10` in a user's TFDS
`data_dir`. This module needs TensorFlow itself (tf.data, TFDS).
"""

import dataclasses
import os
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from hlkeras import _validation
from hlkeras import texts
from hlkeras.tables import MISSING_VALUES_HINT
from hlkeras.tables import DatasetError
from hlkeras.tables import check_finite_array
from hlkeras.tables import csv_features
from hlkeras.tables import read_csv_rows

EMBEDDED_DATASETS = ("digits",)
# Kept as a full-size buffer for these small datasets; the cap bounds memory
# for a large one.
MAX_SHUFFLE_BUFFER = 60_000

_DIGITS_FILE = os.path.join(os.path.dirname(__file__), "datasets", "digits.npz")
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0
_DIGITS_MAX_PIXEL = 16


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a loaded image classification dataset.

    `num_train` and `num_val` count the examples after the validation split.
    """

    name: str
    input_shape: tuple
    num_classes: int
    class_names: tuple
    num_train: int
    num_val: int
    num_test: int
    # "images", "table" (a CSV, or a .npz of feature vectors) or "text"
    # (token ids); a table has the training split's per-feature mean and
    # variance for the model's Normalization layer, a text its vocabulary
    # (`hlkeras.texts.Tokenizer`; the max length is input_shape[0]).
    kind: str = "images"
    feature_mean: tuple = None
    feature_variance: tuple = None
    vocabulary: tuple = None

    def tokenizer(self):
        """The `hlkeras.texts.Tokenizer` of a text dataset."""
        return texts.Tokenizer(self.vocabulary, self.input_shape[0])

    def spec_entries(self):
        """The model spec entries the data decides: a table's normalization
        statistics, a text's vocabulary size."""
        if self.kind == "table":
            return {"feature_mean": self.feature_mean, "feature_variance": self.feature_variance}
        if self.kind == "text":
            return {"vocabulary_size": len(self.vocabulary) + texts.RESERVED_IDS}
        return {}


class Digits(tfds.core.GeneratorBasedBuilder):
    """The UCI handwritten digits (8x8, 10 classes), embedded in hlkeras.

    The source array has 4-bit gray levels 0..16; they are stored as uint8
    images scaled to 0..255 (`round(v * 255 / 16)`, one-to-one), so every image
    dataset is scaled to [0, 1] the same way. The 1,797 images are split once,
    by a fixed permutation, into 1,437 `train` and 360 `test` examples.
    """

    VERSION = tfds.core.Version("1.0.0")
    # Set explicitly: TFDS' own lookup of a builder's source file imports the
    # optional `importlib_resources` backport, which need not be installed.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "UCI digits from hlkeras/datasets/digits.npz."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=(
                "Optical Recognition of Handwritten Digits (Alpaydin and "
                "Kaynak, 1998), the 8x8 copy bundled with scikit-learn."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://doi.org/10.24432/C50P49",
            license="CC BY 4.0",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the file ships with hlkeras.
        images, labels = _read_digits_file()
        order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
        test_ids, train_ids = order[:_DIGITS_TEST_SIZE], order[_DIGITS_TEST_SIZE:]
        return {
            "train": self._generate_examples(images, labels, np.sort(train_ids)),
            "test": self._generate_examples(images, labels, np.sort(test_ids)),
        }

    def _generate_examples(self, images, labels, ids):
        for i in ids:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def _read_digits_file():
    with np.load(_DIGITS_FILE) as arrays:
        gray_levels = arrays["images"].astype("float64")
        labels = arrays["labels"].astype("int64")
    images = np.round(gray_levels * 255.0 / _DIGITS_MAX_PIXEL).astype("uint8")
    return images[..., None], labels


def _check_arguments(batch_size, validation_split):
    _validation.check_positive_int("batch_size", batch_size)
    _validation.check_rate("validation_split", validation_split)


def _not_found_error(name, data_dir):
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return DatasetError(
        f"dataset {name!r} is not prepared in {where}. Point --data-dir "
        f"(data_dir=) at a TFDS data directory that holds it, or download it "
        f"once with network access: `tfds build {name}` or "
        f"`tfds.load({name!r}, download=True)`. 'digits' is embedded and "
        "always available."
    )


def _builder(name, data_dir):
    """Returns a TFDS builder whose data is ready, or raises `DatasetError`."""
    if not isinstance(name, str) or not name:
        raise DatasetError(
            f"Argument `name` must be a dataset name such as 'digits' or "
            f"'mnist'. Received: name={name!r}"
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetError(
            f"unknown dataset {name!r}: use 'digits' (embedded) or the name of "
            "a TFDS image classification dataset such as 'mnist', "
            "'fashion_mnist' or 'cifar10' that is in your --data-dir."
        ) from None
    if name in EMBEDDED_DATASETS:
        # Writing the embedded file as TFDS records takes about a second,
        # once per data_dir; its progress bars would only be noise.
        if not builder.is_prepared():
            tfds.disable_progress_bar()
            builder.download_and_prepare()
    if builder.info.supervised_keys is None:
        raise DatasetError(
            f"dataset {name!r} has no (image, label) supervised keys; hlkeras "
            "trains image classifiers only."
        )
    return builder


def _read_split(builder, split, name, data_dir):
    try:
        return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError:
        # TFDS asserts when the data files are missing from data_dir.
        raise _not_found_error(name, data_dir) from None
    except ValueError as error:
        raise DatasetError(f"dataset {name!r} has no {split!r} split ({error}).") from None


def _count(ds):
    count = int(ds.cardinality())
    if count < 0:
        count = int(ds.reduce(0, lambda n, _: n + 1))
    return count


def _scale(images, labels):
    return tf.cast(images, tf.float32) / 255.0, tf.cast(labels, tf.int32)


def _as_float(features, labels):
    return tf.cast(features, tf.float32), tf.cast(labels, tf.int32)


def _as_ids(tokens, labels):
    return tf.cast(tokens, tf.int32), tf.cast(labels, tf.int32)


def augmenter(seed=0):
    """The image augmentation of training batches: a random shift of up to
    1/8 of each side (one pixel of an 8x8 digit), nearest-neighbour, filling
    with 0 (the background of digits). No flips: a flipped digit is another
    digit or none. Rotation and zoom are left out: on 8x8 digits their
    interpolation blurs the strokes; with shifts, rotations of 10 degrees and
    zooms of 10% (bilinear) the main job scored 91.4% on TensorFlow, with
    shifts alone 95.6-98.1% over five runs (about the spread without
    augmentation, 96.1-96.4%).

    These are Keras preprocessing layers run inside the tf.data pipeline,
    which works on every backend; they never enter the model, so the exported
    model is the model that was trained.

    Returns:
        A function of a batch of images. (Not a `keras.Sequential`: inside
        tf.data, only the preprocessing layers themselves switch to
        TensorFlow ops; a Sequential would run them on the JAX or torch
        backend and fail on the symbolic tf.Tensor.)
    """
    import keras

    layers = [
        keras.layers.RandomTranslation(
            0.125,
            0.125,
            fill_mode="constant",
            fill_value=0.0,
            interpolation="nearest",
            seed=seed,
        )
    ]

    def augment(images, training=True):
        for layer in layers:
            images = layer(images, training=training)
        return images

    return augment


def _pipeline(examples, count, batch_size, shuffle_seed, scale=_scale, augment=None):
    """uint8 examples → cached, float32 [0, 1] batches; shuffled for training.
    (`scale=_as_float` for examples that are already features; `augment`, a
    Keras layer applied to training batches.)

    The training pipeline drops its last partial batch: every step then has
    the same shape, so JAX and XLA compile the train step once, and the few
    dropped examples differ each epoch because the order is reshuffled.
    """
    ds = examples.cache()
    training = shuffle_seed is not None
    if training:
        ds = ds.shuffle(
            min(count, MAX_SHUFFLE_BUFFER), seed=shuffle_seed, reshuffle_each_iteration=True
        )
    # Scaling after batching is one vectorized op per batch.
    ds = ds.batch(batch_size, drop_remainder=training)
    ds = ds.map(scale, num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None and training:
        ds = ds.map(
            lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def evenly_divisible_batches(ds, num_examples, batch_size, divisor):
    """Rebatches `ds` so every batch is a multiple of `divisor` rows, as a
    data-parallel distribution needs (`hlkeras.distribute`).

    The batch is the multiple of `divisor` up to `batch_size` that leaves
    the fewest of the `num_examples` over (fewer than `divisor`, dropped).

    Returns:
        `(dataset, dropped)`.
    """
    candidates = range(divisor, max(batch_size, divisor) + 1, divisor)
    best = min(candidates, key=lambda size: (num_examples % size, -size))
    rebatched = ds.unbatch().batch(best, drop_remainder=True)
    # `unbatch` loses the cardinality; Keras needs it to end each epoch quietly.
    rebatched = rebatched.apply(tf.data.experimental.assert_cardinality(num_examples // best))
    return rebatched.prefetch(tf.data.AUTOTUNE), num_examples % best


def _split_train(train_examples, num_examples, validation_split):
    """The last `validation_split` of the (deterministically ordered) train split
    is the validation set, so it never depends on the shuffle seed."""
    num_val = int(round(num_examples * validation_split))
    num_train = num_examples - num_val
    return train_examples.take(num_train), train_examples.skip(num_train), num_train, num_val


def load(
    name="digits",
    *,
    batch_size=64,
    validation_split=0.1,
    data_dir=None,
    seed=0,
    augment=False,
    max_length=None,
    vocab_size=20_000,
    tokenizer=None,
):
    """Loads an image (or text) classification dataset as batched `tf.data`
    pipelines.

    Images come as float32 in [0, 1] with shape `(height, width, channels)`,
    labels as int32 class indices. The pipelines feed `model.fit` on the
    TensorFlow, JAX and torch backends alike.

    Args:
        name: `"digits"` (embedded, always available) or a TFDS image
            classification dataset prepared in `data_dir`, such as `"mnist"`,
            `"fashion_mnist"` or `"cifar10"`.
        batch_size: Positive int.
        validation_split: Float in [0, 1): the fraction at the end of the
            train split held out for validation. With 0, `val_ds` is `None`.
        data_dir: TFDS data directory; `None` means TFDS' default
            (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). `digits` is
            prepared there on first use.
        seed: Integer seed of the training set's shuffle order.
        augment: Whether to augment the training images (`augmenter`).
        max_length, vocab_size, tokenizer: For a TFDS text dataset (such
            as `"imdb_reviews"` or `"ag_news_subset"`): its texts are
            tokenized as `load_path` tokenizes a CSV's.

    Returns:
        `(train_ds, val_ds, test_ds, info)`, where `info` is a `DatasetInfo`.
        Only `train_ds` is shuffled (again every epoch), and only it drops
        its last partial batch.

    Raises:
        DatasetError: when the dataset is unknown or not in `data_dir`.

    Example:

    >>> train_ds, val_ds, test_ds, info = load("digits")
    >>> info.input_shape, info.num_classes
    ((8, 8, 1), 10)
    """
    _check_arguments(batch_size, validation_split)
    builder = _builder(name, data_dir)
    if _is_text(builder):
        splits, class_names = _read_tfds_texts(builder, name, data_dir, validation_split)
        tokenizer = tokenizer or (max_length, vocab_size)
        return _text_datasets(splits, class_names, name, batch_size, seed, tokenizer)
    train_examples = _read_split(builder, "train", name, data_dir)
    test_examples = _read_split(builder, "test", name, data_dir)
    if _has_float_inputs(builder):
        for split, examples in (("train", train_examples), ("test", test_examples)):
            _check_finite_examples(examples, f"dataset {name!r}", split)
    train_examples, val_examples, num_train, num_val = _split_train(
        train_examples, _count(train_examples), validation_split
    )
    num_test = _count(test_examples)
    train_ds = _pipeline(
        train_examples,
        num_train,
        batch_size,
        shuffle_seed=seed,
        augment=augmenter(seed) if augment else None,
    )
    val_ds = None
    if num_val:
        val_ds = _pipeline(val_examples, num_val, batch_size, shuffle_seed=None)
    test_ds = _pipeline(test_examples, num_test, batch_size, shuffle_seed=None)
    label = builder.info.features[builder.info.supervised_keys[1]]
    image = builder.info.features[builder.info.supervised_keys[0]]
    info = DatasetInfo(
        name=name,
        input_shape=tuple(image.shape),
        num_classes=int(label.num_classes),
        class_names=tuple(label.names),
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
    )
    return train_ds, val_ds, test_ds, info


def _has_float_inputs(builder):
    """Whether the dataset's inputs are floats (which can hold NaN); image
    datasets are usually uint8, which cannot."""
    feature = builder.info.features[builder.info.supervised_keys[0]]
    return tf.as_dtype(feature.dtype).is_floating


def _check_finite_examples(examples, where, split):
    """Refuses a NaN or infinity in the inputs of `(input, label)` examples,
    naming the first bad example: one tf.data pass, run only for float
    inputs (see `_has_float_inputs`)."""
    bad = examples.enumerate().filter(
        lambda index, example: tf.logical_not(tf.reduce_all(tf.math.is_finite(example[0])))
    )
    for index, _ in bad.take(1).as_numpy_iterator():
        raise DatasetError(
            f"{where}: {split} example {index} has a NaN or infinity in its inputs; "
            f"{MISSING_VALUES_HINT}"
        )


def _is_text(builder):
    feature = builder.info.features[builder.info.supervised_keys[0]]
    return isinstance(feature, tfds.features.Text)


def _read_tfds_texts(builder, name, data_dir, validation_split):
    """The train and test splits of a TFDS text dataset as `Examples` of
    texts; validation is the end of the train split, as for images."""
    label = builder.info.features[builder.info.supervised_keys[1]]
    splits = {}
    for split in ("train", "test"):
        texts, labels = [], []
        for text, value in tfds.as_numpy(_read_split(builder, split, name, data_dir)):
            texts.append(text.decode("utf-8"))
            labels.append(value)
        splits[split] = Examples(np.asarray(texts, dtype=object), np.asarray(labels, "int32"))
    train = splits["train"]
    num_val = int(round(len(train.y) * validation_split))
    num_train = len(train.y) - num_val
    splits["val"] = Examples(train.x[num_train:], train.y[num_train:]) if num_val else None
    splits["train"] = Examples(train.x[:num_train], train.y[:num_train])
    return splits, tuple(label.names)


def representative_samples(name="digits", count=200, data_dir=None):
    """Returns the first `count` training images as float32 `[0, 1]` NumPy
    array `(count, height, width, channels)`, e.g. for int8 calibration.

    The samples come from the training part (never validation or test), in
    the dataset's fixed order, so calibration is reproducible.
    """
    _validation.check_positive_int("count", count)
    builder = _builder(name, data_dir)
    if _is_text(builder):
        raise DatasetError(
            f"dataset {name!r} holds texts: a text model calibrates on them tokenized by "
            "its vocabulary.json (keep it beside the model)"
        )
    examples = _read_split(builder, "train", name, data_dir)
    images, _ = next(iter(examples.take(count).batch(count).map(_scale)))
    return images.numpy()


def to_numpy(ds):
    """Concatenates a batched `(images, labels)` dataset into two NumPy arrays."""
    images, labels = [], []
    for batch_images, batch_labels in ds.as_numpy_iterator():
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


# --- A user's own files -----------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
COLOR_MODES = ("grayscale", "rgb")
SPLIT_FOLDERS = ("train", "val", "test")


@dataclasses.dataclass
class Examples:
    """A split as arrays: `x` (uint8 images or float32 features), `y` (int class ids)."""

    x: np.ndarray
    y: np.ndarray


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
      tokenized (`hlkeras.texts.Tokenizer`, fitted on the training split
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
    _check_arguments(batch_size, validation_split)
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
        return _text_datasets(
            splits, class_names, name, batch_size, seed, tokenizer or (max_length, vocab_size)
        )
    # uint8 images are scaled to [0, 1] as TFDS images are; floats are kept.
    scale = _scale if splits["train"].x.dtype == np.uint8 else _as_float
    datasets = {}
    for name, examples in splits.items():
        if examples is None or not len(examples.y):
            datasets[name] = None
            continue
        dataset = tf.data.Dataset.from_tensor_slices((examples.x, examples.y))
        datasets[name] = _pipeline(
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
        **_split_counts(splits),
        kind=kind,
        **_feature_statistics(splits["train"].x, kind),
    )
    return datasets["train"], datasets["val"], datasets["test"], info


def _split_counts(splits):
    """`num_train`, `num_val`, `num_test` of `DatasetInfo` (0 for a missing split)."""
    return {
        f"num_{name}": 0 if examples is None else len(examples.y)
        for name, examples in splits.items()
    }


def _text_datasets(splits, class_names, name, batch_size, seed, tokenizer):
    """Pipelines of token ids from `splits` of texts. `tokenizer` is a
    `hlkeras.texts.Tokenizer`, or `(max_length, vocab_size)` to fit one on
    the training texts."""
    if not isinstance(tokenizer, texts.Tokenizer):
        max_length, vocab_size = tokenizer
        texts.check_max_length(max_length)
        _validation.check_positive_int("vocab_size", vocab_size)
        tokenizer = texts.Tokenizer.fit(
            splits["train"].x, max_tokens=vocab_size, max_length=max_length
        )
    datasets = {}
    for split, examples in splits.items():
        if examples is None or not len(examples.y):
            datasets[split] = None
            continue
        dataset = tf.data.Dataset.from_tensor_slices((tokenizer(examples.x), examples.y))
        shuffle_seed = seed if split == "train" else None
        datasets[split] = _pipeline(dataset, len(examples.y), batch_size, shuffle_seed, _as_ids)
    info = DatasetInfo(
        name=name,
        input_shape=(tokenizer.max_length,),
        num_classes=len(class_names),
        class_names=tuple(class_names),
        **_split_counts(splits),
        kind="text",
        vocabulary=tokenizer.vocabulary,
    )
    return datasets["train"], datasets["val"], datasets["test"], info


def _read_text_csv(path, text_column, label):
    if os.path.splitext(os.fspath(path))[1].lower() != ".csv" or not os.path.isfile(path):
        raise DatasetError(f"--text-column needs --data to be a .csv file, got {path}")
    text_values, label_values = texts.read_text_csv(path, text_column, label)
    labels, class_names = _labels_to_ids(label_values, f"--data {path}")
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
        splits, class_names = _read_image_folder(path, image_size, color_mode)
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


def _class_names(path, folder):
    names = sorted(
        entry for entry in os.listdir(folder) if os.path.isdir(os.path.join(folder, entry))
    )
    if not names:
        raise DatasetError(f"--data {path}: {folder} has no class subfolders")
    if len(names) < 2:
        raise DatasetError(
            f"--data {path}: only one class ({names[0]!r}); classification needs at least two"
        )
    return names


def _image_files(folder):
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _read_image_folder(path, image_size, color_mode):
    if color_mode is not None and color_mode not in COLOR_MODES:
        raise DatasetError(
            f"--color-mode must be one of {', '.join(COLOR_MODES)}, got {color_mode!r}"
        )
    has_split_folders = os.path.isdir(os.path.join(path, "train"))
    train_folder = os.path.join(path, "train") if has_split_folders else path
    class_names = _class_names(path, train_folder)
    splits = {"train": None, "val": None, "test": None}
    shape = None
    for split in SPLIT_FOLDERS:
        folder = os.path.join(path, split) if has_split_folders else path
        if split != "train" and not (has_split_folders and os.path.isdir(folder)):
            continue
        files, labels = [], []
        for class_id, name in enumerate(class_names):
            class_folder = os.path.join(folder, name)
            found = _image_files(class_folder) if os.path.isdir(class_folder) else []
            files += found
            labels += [class_id] * len(found)
        if not files:
            raise DatasetError(f"--data {path}: no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}")
        if shape is None:
            shape = _target_shape(files[0], image_size, color_mode)
        images = read_images(files, shape)
        splits[split] = Examples(images, np.asarray(labels, "int32"))
    return splits, class_names


def _decode(file):
    """The raw image in `file`, uint8 `(height, width, channels)`."""
    try:
        data = tf.io.read_file(file)
        return tf.io.decode_image(data, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        raise DatasetError(
            f"cannot read the image {file}: {_validation.first_line(error)}"
        ) from None


def _target_shape(file, image_size, color_mode):
    """`(height, width, channels)` of every image: `image_size` and
    `color_mode` where given, else the first image's."""
    first = _decode(file)
    height, width = image_size or first.shape[:2]
    if color_mode is None:
        color_mode = "grayscale" if first.shape[-1] == 1 else "rgb"
    return (int(height), int(width), 1 if color_mode == "grayscale" else 3)


def _decode_to_shape(encoded, shape):
    """TF ops from the bytes of an image file to uint8 `shape`: decoded as RGB
    (alpha dropped, gray repeated), converted to gray for one channel, and
    resized with antialiasing when its size differs."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    if shape[-1] == 1:
        image = tf.image.rgb_to_grayscale(image)
    image.set_shape((None, None, shape[-1]))

    def resize():
        resized = tf.image.resize(image, shape[:2], antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], shape[:2]))
    return tf.ensure_shape(tf.cond(same_size, lambda: image, resize), shape)


def read_image(file, shape):
    """One image file as uint8 `shape` (resized, converted to gray or RGB)."""
    try:
        return _decode_to_shape(tf.io.read_file(file), shape).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        raise DatasetError(
            f"cannot read the image {file}: {_validation.first_line(error)}"
        ) from None


def read_images(files, shape):
    """The image `files` as one uint8 array `(len(files),) + shape`, decoded
    in parallel by tf.data (several times faster than one file at a time)."""
    files = list(files)
    decoded = (
        tf.data.Dataset.from_tensor_slices(files)
        .map(
            lambda file: _decode_to_shape(tf.io.read_file(file), shape),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .batch(1024)
    )
    try:
        return np.concatenate(list(decoded.as_numpy_iterator()))
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        # tf.data's error does not say which file; find it one by one.
        for file in files:
            read_image(file, shape)
        raise


def _labels_to_ids(values, where):
    """Class ids for label values (ints sort numerically, strings by name)."""
    values = [str(v).strip() for v in values]
    if not values:
        raise DatasetError(f"{where}: no examples")
    unique = sorted(set(values))
    try:
        unique = sorted(unique, key=int)
    except ValueError:
        pass
    if len(unique) < 2:
        raise DatasetError(
            f"{where}: only one class ({unique[0]!r}); classification needs at least two"
        )
    index = {name: i for i, name in enumerate(unique)}
    return np.asarray([index[v] for v in values], "int32"), unique


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
    labels, class_names = _labels_to_ids([row[label_index] for _, row in body], f"--data {path}")
    return Examples(features, labels), class_names


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as arrays:
            arrays = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"--data {path}: cannot read a NumPy .npz file ({error})") from None
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
    ids, class_names = _labels_to_ids(all_labels.tolist(), f"--data {path}")
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


def load_source(
    dataset=None, path=None, *, batch_size=64, data_dir=None, seed=0, augment=False, **file_options
):
    """`load(dataset)` or `load_path(path)`: the data a command was given,
    `--dataset NAME` (TFDS, or the embedded digits when neither is given) or
    `--data PATH`, never both. `file_options` go to `load_path`."""
    if dataset is not None and path is not None:
        raise DatasetError(
            f"--data {path} and --dataset {dataset} exclude each other: "
            "train on your files or on a TFDS dataset"
        )
    if path is not None:
        return load_path(path, batch_size=batch_size, seed=seed, augment=augment, **file_options)
    return load(
        dataset or "digits",
        batch_size=batch_size,
        data_dir=data_dir,
        seed=seed,
        augment=augment,
        **{key: file_options[key] for key in _TEXT_OPTIONS if key in file_options},
    )


# The `load_path` options that apply to a TFDS text dataset too.
_TEXT_OPTIONS = ("max_length", "vocab_size", "tokenizer")


def load_for(settings, *, batch_size=64, augment=False, tokenizer=None):
    """`load_source` with a command's `settings`: `dataset`, `data`,
    `data_dir`, `seed` and the `--data` reading options, named as their flags
    (`val_split` for `--val-split`, ...). Texts are tokenized by `tokenizer`
    when given (a resumed run's), else by one fitted on the training split."""
    return load_source(
        settings["dataset"],
        settings["data"],
        batch_size=batch_size,
        data_dir=settings["data_dir"],
        seed=settings["seed"],
        augment=augment,
        image_size=settings["image_size"],
        color_mode=settings["color_mode"],
        label=settings["label"],
        validation_split=settings["val_split"],
        test_split=settings["test_split"],
        text_column=settings["text_column"],
        max_length=settings["max_length"],
        vocab_size=settings["vocab_size"],
        tokenizer=tokenizer,
    )
