"""Datasets for hlkeras: TFDS loading into `tf.data` pipelines that feed
`model.fit` on every Keras backend, and the embedded default dataset `digits`.

`digits` (1,797 8x8 handwritten digits, shipped in `hlkeras/datasets/`) is a
real TFDS builder registered when this module is imported, so it goes through
the same code path as `mnist`, `fashion_mnist` or `cifar10` in a user's TFDS
`data_dir`. This module needs TensorFlow itself (tf.data, TFDS).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from hlkeras import _validation

EMBEDDED_DATASETS = ("digits",)
# Kept as a full-size buffer for these small datasets; the cap bounds memory
# for a large one.
MAX_SHUFFLE_BUFFER = 60_000

_DIGITS_FILE = os.path.join(os.path.dirname(__file__), "datasets", "digits.npz")
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0
_DIGITS_MAX_PIXEL = 16


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message says what to do."""


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


def _pipeline(examples, count, batch_size, shuffle_seed):
    """uint8 examples → cached, float32 [0, 1] batches; shuffled for training.

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
    ds = ds.map(_scale, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _split_train(train_examples, num_examples, validation_split):
    """The last `validation_split` of the (deterministically ordered) train split
    is the validation set, so it never depends on the shuffle seed."""
    num_val = int(round(num_examples * validation_split))
    num_train = num_examples - num_val
    return train_examples.take(num_train), train_examples.skip(num_train), num_train, num_val


def load(name="digits", *, batch_size=64, validation_split=0.1, data_dir=None, seed=0):
    """Loads an image classification dataset as batched `tf.data` pipelines.

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
    train_examples = _read_split(builder, "train", name, data_dir)
    test_examples = _read_split(builder, "test", name, data_dir)
    train_examples, val_examples, num_train, num_val = _split_train(
        train_examples, _count(train_examples), validation_split
    )
    num_test = _count(test_examples)
    train_ds = _pipeline(train_examples, num_train, batch_size, shuffle_seed=seed)
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


def representative_samples(name="digits", count=200, data_dir=None):
    """Returns the first `count` training images as float32 `[0, 1]` NumPy
    array `(count, height, width, channels)`, e.g. for int8 calibration.

    The samples come from the training part (never validation or test), in
    the dataset's fixed order, so calibration is reproducible.
    """
    _validation.check_positive_int("count", count)
    builder = _builder(name, data_dir)
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
