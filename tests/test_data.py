"""hlkeras.data: the embedded digits TFDS builder, the pipelines, the TFDS path
for other datasets (mnist, mocked) and the errors."""

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
from digits_testing import load_digits_arrays
from etils import epath

from hlkeras import data

# Argument checks, files and tf.data: the same on every backend.
pytestmark = pytest.mark.neutral


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(data_dir):
    return data.load("digits", batch_size=32, data_dir=data_dir, seed=3)


def _example_keys(images, labels):
    """Order-free identity of examples: quantized pixel bytes + label."""
    quantized = np.round(images * 255.0).astype("uint8")
    return sorted(q.tobytes() + bytes([int(y)]) for q, y in zip(quantized, labels))


def test_info_describes_digits(digits):
    info = digits[3]
    assert info.name == "digits"
    assert info.input_shape == (8, 8, 1)
    assert info.num_classes == 10
    assert info.class_names == tuple(str(d) for d in range(10))
    # 1,797 = 360 test + 1,437 train, of which the last 10% is validation.
    assert (info.num_train, info.num_val, info.num_test) == (1293, 144, 360)


def test_splits_partition_the_embedded_file(data_dir):
    # Batches of one, so the training set's dropped partial batch is empty.
    train_ds, val_ds, test_ds, _ = data.load("digits", batch_size=1, data_dir=data_dir)
    source_images, source_labels = load_digits_arrays()
    splits = [data.to_numpy(ds) for ds in (train_ds, val_ds, test_ds)]
    assert [len(y) for _, y in splits] == [1293, 144, 360]
    images = np.concatenate([x for x, _ in splits])
    labels = np.concatenate([y for _, y in splits])
    # Same examples as the .npz (gray levels 0..16 stored as round(v*255/16)).
    assert _example_keys(images, labels) == _example_keys(
        np.round(source_images * 16.0 * 255.0 / 16.0) / 255.0, source_labels
    )
    np.testing.assert_allclose(
        np.sort(images.ravel()), np.sort(source_images.ravel()), atol=1 / 510
    )
    # The test split is the documented fixed permutation's first 360 images.
    test_ids = np.random.default_rng(0).permutation(1797)[:360]
    assert _example_keys(*splits[2]) == _example_keys(
        np.round(source_images[test_ids] * 255.0) / 255.0, source_labels[test_ids]
    )


def test_batches_are_float_images_in_unit_range(digits):
    images, labels = next(iter(digits[0]))
    assert images.shape == (32, 8, 8, 1) and images.dtype.name == "float32"
    assert labels.shape == (32,) and labels.dtype.name == "int32"
    assert float(np.min(images)) >= 0.0 and float(np.max(images)) <= 1.0


def test_only_training_drops_the_partial_batch(digits):
    train_ds, val_ds, test_ds, _ = digits
    train_sizes = [len(y) for _, y in train_ds.as_numpy_iterator()]
    assert train_sizes == [32] * (1293 // 32) and int(train_ds.cardinality()) == 1293 // 32
    assert [len(y) for _, y in val_ds.as_numpy_iterator()] == [32] * 4 + [16]
    assert sum(len(y) for _, y in test_ds.as_numpy_iterator()) == 360


def test_order_is_deterministic_and_seeded(data_dir):
    # Fresh pipelines: each iteration of a training set reshuffles it.
    digits = data.load("digits", batch_size=32, data_dir=data_dir, seed=3)
    again = data.load("digits", batch_size=32, data_dir=data_dir, seed=3)
    other_seed = data.load("digits", batch_size=32, data_dir=data_dir, seed=4)
    for split in (1, 2):  # validation and test: fixed order
        np.testing.assert_array_equal(
            data.to_numpy(digits[split])[1], data.to_numpy(again[split])[1]
        )
    first = data.to_numpy(digits[0])[1]
    np.testing.assert_array_equal(first, data.to_numpy(again[0])[1])
    assert not np.array_equal(first, data.to_numpy(other_seed[0])[1])
    # Reshuffled every epoch (iteration).
    assert not np.array_equal(first, data.to_numpy(digits[0])[1])


def test_validation_split_zero_has_no_validation_set(data_dir):
    train_ds, val_ds, _, info = data.load("digits", validation_split=0.0, data_dir=data_dir)
    assert val_ds is None and info.num_train == 1437 and info.num_val == 0


@pytest.mark.backends("tensorflow", "jax", "torch")
def test_pipeline_feeds_model_fit_on_this_backend(digits):
    train_ds, val_ds, _, info = digits
    model = keras.Sequential(
        [
            keras.Input(info.input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(
        train_ds.take(3), validation_data=val_ds.take(1), epochs=2, verbose=0, shuffle=False
    )
    assert np.isfinite(history.history["loss"]).all()
    assert len(history.history["val_accuracy"]) == 2


def test_representative_samples_are_the_first_training_images(data_dir):
    samples = data.representative_samples("digits", count=50, data_dir=data_dir)
    assert samples.shape == (50, 8, 8, 1) and samples.dtype == np.float32
    builder = tfds.builder("digits", data_dir=data_dir)
    raw = builder.as_dataset(split="train[:50]", as_supervised=True, shuffle_files=False)
    expected = np.stack([image for image, _ in raw.as_numpy_iterator()]) / 255.0
    np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-7)


def test_mnist_goes_through_the_same_tfds_path():
    with tfds.testing.mock_data(num_examples=20):
        train_ds, val_ds, test_ds, info = data.load("mnist", batch_size=6, validation_split=0.1)
        images, labels = data.to_numpy(train_ds)
    assert info.input_shape == (28, 28, 1) and info.num_classes == 10
    assert (info.num_train, info.num_val, info.num_test) == (18, 2, 20)
    assert images.shape == (18, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.5
    assert set(labels.tolist()) <= set(range(10))


def test_unprepared_dataset_says_what_to_do(tmp_path):
    with pytest.raises(data.DatasetError) as error:
        data.load("mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert "--data-dir" in message and "tfds build mnist" in message
    assert isinstance(error.value, ValueError)


def test_unknown_dataset_names_the_choices(tmp_path):
    with pytest.raises(data.DatasetError, match="unknown dataset 'no_such_set'.*digits.*mnist"):
        data.load("no_such_set", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"batch_size": 0}, "batch_size"), ({"validation_split": 1.0}, "validation_split")],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*Received"):
        data.load("digits", **kwargs)


class FloatFeatures(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset of float feature vectors, one of which holds a NaN
    (train example 3); the test split is clean."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for its metadata files in the builder's package; a test
    # module has none.
    code_path = epath.Path(__file__)
    pkg_dir_path = epath.Path(__file__).parent

    def _info(self):
        return self.dataset_info_from_configs(
            description="float features, one NaN",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=2),
                }
            ),
            supervised_keys=("x", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(bad=3), "test": self._generate_examples(None)}

    def _generate_examples(self, bad):
        for i in range(6):
            x = np.full((2,), np.nan if i == bad else float(i), np.float32)
            yield i, {"x": x, "label": i % 2}


def test_a_tfds_dataset_with_nan_features_is_refused_naming_the_example(tmp_path):
    FloatFeatures(data_dir=str(tmp_path)).download_and_prepare()
    with pytest.raises(data.DatasetError) as raised:
        data.load("float_features", data_dir=str(tmp_path), validation_split=0.0)
    message = str(raised.value)
    assert message == (
        "dataset 'float_features': train example 3 has a NaN or infinity in its "
        "inputs; fill or drop missing values first"
    )


def test_a_first_preparation_leaves_the_random_states_as_it_found_them(tmp_path):
    """TFDS' first preparation of the digits draws from Python's `random`; a
    script seeded before `data.load` must start the same on a fresh data
    directory as on a prepared one. (Oracle: the states themselves.)"""
    import random

    keras.utils.set_random_seed(0)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    data.prepare("digits", str(tmp_path / "fresh"))
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(after, numpy_state))
