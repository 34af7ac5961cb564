"""TFDS datasets, and the embedded `digits`.

`digits` (1,797 8x8 handwritten digits, shipped in `hlkeras/datasets/`) is a
real TFDS builder registered when this module is imported, so it goes through
the same code path as `mnist`, `fashion_mnist` or `cifar10` in a user's TFDS
`data_dir`."""

import os
import random

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from hlkeras import _validation
from hlkeras.data.pipeline import DatasetInfo
from hlkeras.data.pipeline import Examples
from hlkeras.data.pipeline import augmenter
from hlkeras.data.pipeline import check_loading_arguments
from hlkeras.data.pipeline import count_examples
from hlkeras.data.pipeline import make_pipeline
from hlkeras.data.pipeline import scale_images
from hlkeras.data.pipeline import text_datasets
from hlkeras.data.tables import MISSING_VALUES_HINT
from hlkeras.data.tables import DatasetError

EMBEDDED_DATASETS = ("digits",)

_DIGITS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "datasets", "digits.npz")

_DIGITS_TEST_SIZE = 360

_DIGITS_SPLIT_SEED = 0

_DIGITS_MAX_PIXEL = 16


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


def _not_found_error(name, data_dir):
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return DatasetError(
        f"dataset {name!r} is not prepared in {where}. Point --data-dir "
        f"(data_dir=) at a TFDS data directory that holds it, or download it "
        f"once with network access: `tfds build {name}` or "
        f"`tfds.load({name!r}, download=True)`. 'digits' is embedded and "
        "always available."
    )


def prepare(name="digits", data_dir=None):
    """Makes TFDS dataset `name` ready in `data_dir` (the embedded digits are
    written as TFDS records the first time), or raises `DatasetError`.

    A first preparation leaves the global random states as it found them,
    so a run seeded before it starts as one on a prepared directory.
    """
    _builder(name, data_dir)


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
            _preserving_python_random_state(builder.download_and_prepare)
    if builder.info.supervised_keys is None:
        raise DatasetError(
            f"dataset {name!r} has no (image, label) supervised keys; hlkeras "
            "trains image classifiers only."
        )
    return builder


def _preserving_python_random_state(prepare):
    """Runs `prepare()` and puts Python's `random` state back: TFDS' first
    preparation draws from it (measured; NumPy's and TensorFlow's states are
    left alone), so a script seeded before `data.load` would otherwise start
    from other weights on a fresh data directory than on a prepared one."""
    state = random.getstate()
    try:
        prepare()
    finally:
        random.setstate(state)


def _read_split(builder, split, name, data_dir):
    try:
        return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError:
        # TFDS asserts when the data files are missing from data_dir.
        raise _not_found_error(name, data_dir) from None
    except ValueError as error:
        raise DatasetError(f"dataset {name!r} has no {split!r} split ({error}).") from None


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
    check_loading_arguments(batch_size, validation_split)
    builder = _builder(name, data_dir)
    if _is_text(builder):
        splits, class_names = _read_tfds_texts(builder, name, data_dir, validation_split)
        tokenizer = tokenizer or (max_length, vocab_size)
        return text_datasets(splits, class_names, name, batch_size, seed, tokenizer)
    train_examples = _read_split(builder, "train", name, data_dir)
    test_examples = _read_split(builder, "test", name, data_dir)
    if _has_float_inputs(builder):
        for split, examples in (("train", train_examples), ("test", test_examples)):
            _check_finite_examples(examples, f"dataset {name!r}", split)
    train_examples, val_examples, num_train, num_val = _split_train(
        train_examples, count_examples(train_examples), validation_split
    )
    num_test = count_examples(test_examples)
    train_ds = make_pipeline(
        train_examples,
        num_train,
        batch_size,
        shuffle_seed=seed,
        augment=augmenter(seed) if augment else None,
    )
    val_ds = None
    if num_val:
        val_ds = make_pipeline(val_examples, num_val, batch_size, shuffle_seed=None)
    test_ds = make_pipeline(test_examples, num_test, batch_size, shuffle_seed=None)
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
    images, _ = next(iter(examples.take(count).batch(count).map(scale_images)))
    return images.numpy()
