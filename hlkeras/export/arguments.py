"""The argument checks of `export_model`, each raising `ExportError` that
names the argument, what it got and what it allows."""

import os

import numpy as np

from hlkeras import _validation
from hlkeras.export import onnx_export
from hlkeras.export.report import FORMATS
from hlkeras.export.report import QUANTIZATIONS
from hlkeras.export.report import ExportError


def check_choice(name, value, allowed):
    return _validation.check_choice(name, value, allowed, error=ExportError)


def check_formats(formats):
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    if not formats:
        raise ExportError(f"Argument `formats` must name at least one of {FORMATS}. Received: ()")
    for format in formats:
        check_choice("formats", format, FORMATS)
    if "onnx" in formats:
        check_onnx_installed()
    return formats


def check_onnx_installed():
    """Raises `ExportError` naming the missing packages and the pip extra."""
    missing = onnx_export.missing_packages()
    if missing:
        raise ExportError(
            f"format 'onnx' needs {', '.join(missing)}, which is not installed: "
            f"{onnx_export.ONNX_EXTRA_HINT}"
        )


def check_quantizations(quantization):
    """`quantization` as a tuple of distinct `QUANTIZATIONS` (`"float32"` is
    another name of `"none"`): one name, or a non-empty sequence of them."""
    given = (quantization,) if isinstance(quantization, str) else tuple(quantization)
    if not given:
        raise ExportError(
            f"Argument `quantization` must name at least one of {QUANTIZATIONS}. Received: ()"
        )
    named = ["none" if q == "float32" else q for q in given]
    for value in named:
        check_choice("quantization", value, QUANTIZATIONS)
    return tuple(dict.fromkeys(named))


def check_out_dir(out_dir):
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(
            f"Argument `out_dir` (CLI: --out) must be a directory, created if "
            f"missing; {out_dir} is an existing file."
        )
    return out_dir


def check_no_overwrite(targets, overwrite):
    existing = [path for path in targets if os.path.lexists(path)]
    if existing and not overwrite:
        raise ExportError(
            f"Export would overwrite {', '.join(existing)}. Pass overwrite=True "
            "(CLI: --overwrite) to replace them, or choose another `out_dir`."
        )


def as_float_array(name, data, input_shape):
    """Checks that `data` is a batch of model inputs; returns float32 NumPy."""
    array = np.asarray(data, dtype="float32")
    expected = tuple(input_shape[1:])
    matches = array.ndim == len(expected) + 1 and all(
        want is None or want == got for want, got in zip(expected, array.shape[1:])
    )
    if not matches or len(array) == 0:
        raise ExportError(
            f"Argument `{name}` must be a non-empty batch of model inputs of shape "
            f"(N, {', '.join(str(d) for d in expected)}). "
            f"Received shape {array.shape}."
        )
    found = _validation.first_non_finite(array)
    if found is not None:
        index, what = found
        raise ExportError(
            f"Argument `{name}` has {what} in sample {index[0]} (at index {list(index)}): "
            "a model cannot be verified or calibrated on it; drop or fix that sample"
        )
    return array


def split_verify_data(verify_data, input_shape):
    """`verify_data` is inputs `x`, or a tuple `(x, labels)`."""
    if verify_data is None:
        return None, None
    if isinstance(verify_data, tuple) and len(verify_data) == 2:
        inputs, labels = verify_data
    else:
        inputs, labels = verify_data, None
    inputs = as_float_array("verify_data", inputs, input_shape)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2:  # one-hot
            labels = labels.argmax(-1)
        if labels.shape != (len(inputs),):
            raise ExportError(
                "The labels in `verify_data=(x, labels)` must be class ids of shape "
                f"({len(inputs)},) or one-hot of shape ({len(inputs)}, classes). "
                f"Received shape {np.shape(verify_data[1])}."
            )
    return inputs, labels


def single_input_shape(model):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            "export_model supports models with one input and one output; "
            f"this model has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs."
        )
    return tuple(model.inputs[0].shape)


def check_max_accuracy_drop(value):
    """`max_accuracy_drop` must be a number of accuracy points >= 0."""
    return _validation.check_non_negative("max_accuracy_drop", value, error=ExportError)


MISSING_REPRESENTATIVE = (
    "quantization='int8' needs `representative_data`: about 100-500 training "
    "inputs as a float32 array (N, ...) to calibrate activation ranges. "
    "Received: representative_data=None"
)
