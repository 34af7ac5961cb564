"""Images from files: a folder of class subfolders (optionally inside
`train/`, `val/`, `test/`), decoded in parallel by tf.data, converted to
gray or RGB and resized to one shape."""

import os

import numpy as np
import tensorflow as tf

from hlkeras import _validation
from hlkeras.data.pipeline import Examples
from hlkeras.data.tables import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

COLOR_MODES = ("grayscale", "rgb")

SPLIT_FOLDERS = ("train", "val", "test")


def folder_class_names(path, folder):
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


def image_files(folder, *, recursive=False):
    """The sorted image files in `folder` (and its subfolders if `recursive`)."""
    walk = os.walk(folder) if recursive else [(folder, None, os.listdir(folder))]
    return sorted(
        os.path.join(root, name)
        for root, _, names in walk
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def read_image_folder(path, image_size, color_mode):
    if color_mode is not None and color_mode not in COLOR_MODES:
        raise DatasetError(
            f"--color-mode must be one of {', '.join(COLOR_MODES)}, got {color_mode!r}"
        )
    has_split_folders = os.path.isdir(os.path.join(path, "train"))
    train_folder = os.path.join(path, "train") if has_split_folders else path
    class_names = folder_class_names(path, train_folder)
    splits = {"train": None, "val": None, "test": None}
    shape = None
    for split in SPLIT_FOLDERS:
        folder = os.path.join(path, split) if has_split_folders else path
        if split != "train" and not (has_split_folders and os.path.isdir(folder)):
            continue
        files, labels = [], []
        for class_id, name in enumerate(class_names):
            class_folder = os.path.join(folder, name)
            found = image_files(class_folder) if os.path.isdir(class_folder) else []
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
