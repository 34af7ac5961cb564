"""`hlkeras.data.load_path`: a user's image folder, CSV and .npz, against
hand-built files (counts, class names, disjoint deterministic splits,
normalization statistics against NumPy) and one-line errors for bad input.

The loaders are tf.data code whatever the Keras backend, so they run on the
tensorflow backend only."""

import numpy as np
import pytest
from PIL import Image

from hlkeras import _validation
from hlkeras import data

pytestmark = pytest.mark.backends("tensorflow")


def make_image_folder(root, counts, size=(6, 5), mode="L"):
    """Class folders of images whose every pixel is the image's id (0..)."""
    image_id = 0
    for class_name, count in counts.items():
        (root / class_name).mkdir(parents=True)
        for _ in range(count):
            pixels = np.full(size if mode == "L" else (*size, 3), image_id, "uint8")
            Image.fromarray(pixels, mode).save(root / class_name / f"{image_id}.png")
            image_id += 1
    return root


def ids_and_labels(ds):
    images, labels = data.to_numpy(ds)
    return np.round(images[:, 0, 0, 0] * 255).astype(int), labels


def test_an_image_folder_gives_sorted_class_names_and_disjoint_deterministic_splits(tmp_path):
    root = make_image_folder(tmp_path / "photos", {"cat": 20, "ant": 15, "bee": 15})
    train, val, test, info = data.load_path(root, batch_size=8, validation_split=0.1, seed=3)
    assert info.class_names == ("ant", "bee", "cat") and info.num_classes == 3
    assert info.input_shape == (6, 5, 1) and info.kind == "images"
    assert (info.num_train, info.num_val, info.num_test) == (35, 5, 10)
    # Training drops its last partial batch; the other splits keep every example.
    splits = {name: ids_and_labels(ds) for name, ds in (("val", val), ("test", test))}
    everything, _, _, _ = data.load_path(root, batch_size=1, validation_split=0.0, test_split=0.0)
    train_ids, _ = ids_and_labels(everything)
    assert sorted(train_ids) == list(range(50))
    val_ids, test_ids = set(splits["val"][0]), set(splits["test"][0])
    assert not val_ids & test_ids
    # A label follows its file's folder: ids 0-19 are cat (2), 20-34 ant (0), 35-49 bee (1).
    for ids, labels in splits.values():
        expected = [2 if i < 20 else 0 if i < 35 else 1 for i in ids]
        assert list(labels) == expected
    # Same seed, same split; another seed, another split.
    _, _, again, _ = data.load_path(root, batch_size=8, validation_split=0.1, seed=3)
    assert set(ids_and_labels(again)[0]) == test_ids
    _, _, other, _ = data.load_path(root, batch_size=8, validation_split=0.1, seed=4)
    assert set(ids_and_labels(other)[0]) != test_ids


def test_image_size_and_color_mode_resize_and_convert(tmp_path):
    root = make_image_folder(tmp_path / "photos", {"a": 3, "b": 3}, size=(6, 5), mode="RGB")
    _, _, test, info = data.load_path(
        root, batch_size=2, test_split=0.5, image_size=(4, 4), color_mode="grayscale"
    )
    assert info.input_shape == (4, 4, 1)
    images, _ = data.to_numpy(test)
    # A flat gray image stays the same gray through resizing and conversion.
    for image in images:
        assert np.allclose(image, image[0, 0, 0], atol=1 / 255)


def test_read_images_converts_every_color_mode_like_the_formulas(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 3, 3), dtype="uint8")
    rgba = np.concatenate([rgb, np.full((4, 3, 1), 7, "uint8")], axis=-1)
    gray = rng.integers(0, 256, (4, 3), dtype="uint8")
    files = []
    for name, pixels in (("rgb.png", rgb), ("rgba.png", rgba), ("gray.png", gray)):
        Image.fromarray(pixels).save(tmp_path / name)
        files.append(str(tmp_path / name))
    as_rgb = data.read_images(files, (4, 3, 3))
    np.testing.assert_array_equal(as_rgb[0], rgb)
    np.testing.assert_array_equal(as_rgb[1], rgb)  # alpha dropped
    np.testing.assert_array_equal(as_rgb[2], np.repeat(gray[..., None], 3, axis=-1))
    as_gray = data.read_images(files, (4, 3, 1)).astype(int)
    luma = np.round(rgb @ np.array([0.2989, 0.587, 0.114]))[..., None]
    assert np.abs(as_gray[0] - luma).max() <= 1
    np.testing.assert_array_equal(as_gray[2], gray[..., None])
    # One file at a time (what `hlkeras predict` reads a single image with) agrees.
    np.testing.assert_array_equal(data.read_image(files[1], (4, 3, 1)), as_gray[1])


def test_train_val_test_subfolders_are_the_splits(tmp_path):
    root = tmp_path / "photos"
    make_image_folder(root / "train", {"x": 4, "y": 4})
    make_image_folder(root / "test", {"x": 2, "y": 1})
    _, val, test, info = data.load_path(root, batch_size=2, validation_split=0.25)
    assert (info.num_train, info.num_val, info.num_test) == (6, 2, 3)
    assert sorted(ids_and_labels(test)[1]) == [0, 0, 1]


def test_a_csv_gives_features_class_names_and_training_statistics(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(5.0, 3.0, size=(40, 3)).round(3)
    features[:, 0] = np.arange(40)  # the example's id
    labels = ["spam" if i % 3 else "ham" for i in range(40)]
    path = tmp_path / "table.csv"
    lines = ["id,a,b,kind"] + [
        f"{f[0]:.0f},{f[1]},{f[2]},{label}" for f, label in zip(features, labels)
    ]
    path.write_text("\n".join(lines) + "\n")
    train, val, test, info = data.load_path(path, batch_size=4, label="kind")
    assert info.kind == "table" and info.input_shape == (3,)
    assert info.class_names == ("ham", "spam")
    x_val, _ = data.to_numpy(val)
    x_test, y_test = data.to_numpy(test)
    held_out = set(x_val[:, 0]) | set(x_test[:, 0])
    train_ids = [i for i in range(40) if i not in held_out]
    assert len(train_ids) == info.num_train
    np.testing.assert_allclose(info.feature_mean, features[train_ids].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(info.feature_variance, features[train_ids].var(axis=0), rtol=1e-4)
    assert list(y_test) == [0 if int(i) % 3 == 0 else 1 for i in x_test[:, 0]]


def test_an_npz_with_a_test_split_keeps_it(tmp_path):
    path = tmp_path / "arrays.npz"
    x = np.arange(30 * 4 * 4, dtype="uint8").reshape(30, 4, 4)
    np.savez(path, x=x, y=np.arange(30) % 3, x_test=x[:6], y_test=np.arange(6) % 3)
    _, _, test, info = data.load_path(path, batch_size=4, validation_split=0.2)
    assert info.input_shape == (4, 4, 1) and info.num_test == 6 and info.num_val == 6
    images, labels = data.to_numpy(test)
    np.testing.assert_allclose(images[..., 0], x[:6] / 255.0, atol=1e-6)
    assert list(labels) == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda p: p / "missing", ["missing", "no such file or folder"]),
        (lambda p: (p / "empty").mkdir() or p / "empty", ["no class subfolders"]),
        (lambda p: make_image_folder(p / "one", {"only": 2}), ["only one class", "'only'"]),
        (
            lambda p: [(p / "d" / c).mkdir(parents=True) for c in "ab"] and p / "d",
            ["no", "images in"],
        ),
        (lambda p: _write(p / "t.csv", ""), ["empty"]),
        (lambda p: _write(p / "t.csv", "a,b\n1,2\n"), ["'label'", "['a', 'b']"]),
        (lambda p: _write(p / "t.csv", "a,label\nx,1\ny,2\n"), ["column 'a'", "not numeric"]),
        (lambda p: _npz(p, x=np.zeros((3, 2))), ["'x' and 'y'", "['x']"]),
        (lambda p: _npz(p, x=np.zeros((3, 2)), y=np.zeros(2)), ["len(x) = 3", "2 y"]),
        (lambda p: _write(p / "t.txt", "hello"), ["expected a folder", ".csv", ".npz"]),
        # Non-finite and missing values, named by column and line as an editor
        # numbers them (the blank line 3 counts).
        (
            lambda p: _write(p / "t.csv", "a,b,label\n1,2,x\n\n3,nan,y\n"),
            ["t.csv", "column 'b' has a NaN at line 4", "fill or drop missing values"],
        ),
        (
            lambda p: _write(p / "t.csv", "a,label\n1,x\n-inf,y\n"),
            ["column 'a' has -inf at line 3"],
        ),
        (lambda p: _write(p / "t.csv", "a,label\n1e39,x\n2,y\n"), ["column 'a' has inf at line 2"]),
        (lambda p: _write(p / "t.csv", "a,label\n1,x\n,y\n"), ["column 'a' is empty at line 3"]),
        (
            lambda p: _npz(p, x=np.array([[0.0, 1.0], [np.nan, 2.0]]), y=np.arange(2)),
            ["a.npz", "array 'x' has a NaN in sample 1", "[1, 0]"],
        ),
        (
            lambda p: _npz(
                p,
                x=np.zeros((4, 2)),
                y=np.arange(4) % 2,
                x_test=np.full((2, 2), np.inf),
                y_test=np.arange(2),
            ),
            ["array 'x_test' has inf in sample 0"],
        ),  # fmt: skip
        # A binary file named .csv (a PNG's header), and a Latin-1 CSV.
        (
            lambda p: _write_bytes(p / "t.csv", b"\x89PNG\r\n\x1a\n\x00\x00\xff"),
            ["t.csv", "not a UTF-8 text CSV file"],
        ),
        (
            lambda p: _write_bytes(p / "t.csv", "caf\u00e9,label\n1,x\n".encode("latin-1")),
            ["not a UTF-8 text CSV file", "save it as UTF-8"],
        ),
    ],
)
def test_bad_data_is_one_clear_error_naming_the_path(tmp_path, make, fragments):
    path = make(tmp_path)
    with pytest.raises(data.DatasetError) as raised:
        data.load_path(path)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_corrupt_image_is_an_error_naming_the_file(tmp_path):
    root = make_image_folder(tmp_path / "photos", {"a": 2, "b": 2})
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match="broken.png"):
        data.load_path(root)


def test_data_and_dataset_together_is_an_error():
    with pytest.raises(data.DatasetError, match="exclude each other"):
        data.load_source("digits", "some/folder")


def _write(path, text):
    path.write_text(text)
    return path


def _write_bytes(path, content):
    path.write_bytes(content)
    return path


def _npz(tmp_path, **arrays):
    path = tmp_path / "a.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.backends("tensorflow", "jax", "torch")  # the layers run in tf.data on each
def test_augmentation_changes_training_batches_only(tmp_path):
    path = tmp_path / "arrays.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (64, 8, 8), dtype="uint8"), y=np.arange(64) % 2)
    plain = data.load_path(path, batch_size=8, seed=1)
    augmented = data.load_path(path, batch_size=8, seed=1, augment=True)
    for split in (1, 2):  # validation and test: never augmented
        np.testing.assert_array_equal(
            data.to_numpy(plain[split])[0], data.to_numpy(augmented[split])[0]
        )
    x_plain, y_plain = data.to_numpy(plain[0])
    x_augmented, y_augmented = data.to_numpy(augmented[0])
    np.testing.assert_array_equal(y_plain, y_augmented)  # same shuffle order
    changed = np.mean(np.any(x_plain != x_augmented, axis=(1, 2, 3)))
    assert changed > 0.5, f"only {changed:.0%} of training images were augmented"


def test_a_utf8_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    # Excel's "CSV UTF-8" starts with a byte-order mark.
    path = tmp_path / "t.csv"
    path.write_bytes("label,a\nx,1\ny,2\nx,3\ny,4\n".encode("utf-8-sig"))
    _, _, _, info = data.load_path(path, validation_split=0.0, test_split=0.0)
    assert info.class_names == ("x", "y") and info.input_shape == (1,)


def test_finite_check_of_100k_rows_is_vectorized():
    # The check is one np.isfinite pass: its result on a large table is the
    # NumPy oracle's, at the last row too.
    table = np.ones((100_000, 30), "float32")
    table[-1, 7] = np.nan
    assert _validation.first_non_finite(table) == ((99_999, 7), "a NaN")
    table[-1, 7] = 1.0
    assert _validation.first_non_finite(table) is None
