"""The arrays that calibrate and verify an export (`hlkeras export`,
`hlkeras benchmark`): `.npy` / `.npz` files, or a TFDS dataset's or a user's
`--data`'s training samples and test split, split and tokenized as
`hlkeras train` split and tokenized them."""

import functools

import numpy as np

from hlkeras.data import texts
from hlkeras.data.files import load_path
from hlkeras.data.pipeline import to_numpy
from hlkeras.data.tables import DatasetError
from hlkeras.data.tables import check_finite_array
from hlkeras.data.tables import read_npz
from hlkeras.data.tfds import load
from hlkeras.data.tfds import representative_samples

CALIBRATION_SAMPLES = 200


def export_arrays(
    model_path,
    *,
    needs_calibration,
    wants_calibration=False,
    dataset=None,
    data=None,
    label="label",
    text_column=None,
    representative=None,
    verify=None,
):
    """`(calibration samples, verification data)` for exporting `model_path`:
    the `representative` `.npy` and `verify` `.npz` files when given, else
    `data`'s (a user's files) or `dataset`'s (TFDS) own. Calibration samples
    are read when `needs_calibration` (which raises without them) or
    `wants_calibration` (`--quantize auto`: int8 only when there are some).

    Raises:
        DatasetError: naming the flag and file that cannot be used.
    """
    calibration = verification = None
    if data and dataset:
        raise DatasetError(f"--data {data} and --dataset {dataset} exclude each other")
    if data:
        calibration, verification = data_file_arrays(model_path, data, label, text_column)
    elif dataset and (tokenizer := texts.saved_tokenizer(model_path)) is not None:
        # A text model: its TFDS texts tokenized by its own vocabulary.
        fetch = functools.partial(dataset_token_arrays, tokenizer=tokenizer)
        calibration, verification = _from_dataset(fetch, dataset, "texts")
    elif dataset:
        if (needs_calibration or wants_calibration) and not representative:
            calibration = _from_dataset(
                dataset_calibration_samples, dataset, "representative samples"
            )
        if not verify:
            verification = _from_dataset(dataset_test_arrays, dataset, "test split")
    if representative:
        calibration = load_npy("--representative", representative)
    if verify:
        verification = load_verify_npz(verify)
    if needs_calibration and calibration is None:
        raise DatasetError(
            "--quantize int8 needs calibration data: pass --dataset NAME "
            "(e.g. digits), --data PATH or --representative FILE.npy"
        )
    return calibration, verification


def load_npy(flag, path):
    """The finite array in the `.npy` file `path`."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{flag} {path}: cannot read a NumPy .npy file ({error})") from None
    check_finite_array(array, f"{flag} {path}", "")
    return array


def load_verify_npz(path):
    """`x`, or `(x, y)`, of the `--verify` `.npz` file `path`."""
    arrays = read_npz(path, f"--verify {path}")
    if "x" not in arrays:
        raise DatasetError(
            f"--verify {path}: needs an array named 'x' (and optionally 'y'); "
            f"found {sorted(arrays)}"
        )
    check_finite_array(arrays["x"], f"--verify {path}", "x")
    return (arrays["x"], arrays["y"]) if "y" in arrays else arrays["x"]


def dataset_calibration_samples(name):
    """`CALIBRATION_SAMPLES` training images of dataset `name`."""
    return representative_samples(name, count=CALIBRATION_SAMPLES, data_dir=None)


def dataset_test_arrays(name):
    """`(images, labels)` of dataset `name`'s test split, as NumPy arrays."""
    _, _, test_ds, _ = load(name)
    return to_numpy(test_ds)


def dataset_token_arrays(name, tokenizer):
    """`(calibration ids, (test ids, labels))` of TFDS text dataset `name`,
    tokenized by a text model's `tokenizer`."""
    # Training batches drop their remainder: small ones keep a small split.
    train_ds, _, test_ds, _ = load(name, tokenizer=tokenizer, batch_size=25)
    return to_numpy(train_ds.take(8))[0], to_numpy(test_ds)


def data_file_arrays(model_path, path, label, text_column):
    """`(calibration samples, (test x, test y))` of `--data PATH`, split as
    `hlkeras train --data PATH` splits it with its default seed and fractions;
    texts are tokenized with the model's own vocabulary."""
    tokenizer = None
    if text_column:
        tokenizer = texts.saved_tokenizer(model_path)
        if tokenizer is None:
            raise DatasetError(
                f"--text-column: no {texts.VOCABULARY_FILE} beside {model_path} "
                "(copy it from the model's run directory)"
            )
    train_ds, _, test_ds, _ = load_path(
        path, label=label, text_column=text_column, tokenizer=tokenizer
    )
    if test_ds is None:
        raise DatasetError(f"--data {path}: no test split to verify on")
    return to_numpy(train_ds)[0][:CALIBRATION_SAMPLES], to_numpy(test_ds)


def _from_dataset(fetch, name, what):
    try:
        return fetch(name)
    except DatasetError as error:
        raise DatasetError(
            f"--dataset {name}: cannot load its {what} ({error}); "
            "pass --representative FILE.npy / --verify FILE.npz instead"
        ) from None
