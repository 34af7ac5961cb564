"""SavedModel, TFLite (LiteRT) with builtin ops only, and ONNX export, each
verified in its own runtime against the Keras model.

`export_model` is the entry point: it takes a model from any backend (or a
`.keras` path), writes a SavedModel, a `.tflite` file (float32, float16,
dynamic-range or full-integer int8) and/or a float32 `.onnx` file, checks
that the `.tflite` uses builtin ops only, runs every artifact (TensorFlow,
LiteRT, ONNX Runtime) and returns an `ExportReport` of sizes, op sets,
output parity, accuracy and batch-1 latency. The ONNX conversion itself is
in `hlkeras.onnx_export`.

The conversion itself always runs under the TensorFlow Keras backend: on the
TensorFlow backend in this process, on JAX and torch in a
`KERAS_BACKEND=tensorflow` subprocess (`python -m hlkeras.export REQUEST`)
that loads the model from a `.keras` file with `safe_mode=True`. Keras'
own `export(format="litert")` refuses JAX and turns on Flex ops, and
jax2tf SavedModels of some graphs (`top_k`) do not serve in TF 2.21.

This module needs TensorFlow itself (the TFLite converter), as do
`hlkeras.data`, `hlkeras.texts` and `hlkeras.onnx_export` (tf2onnx).
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

from hlkeras import _compat
from hlkeras import _timing
from hlkeras import _validation
from hlkeras import onnx_export

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
FORMATS = ("saved_model", "tflite", "onnx")
# What `export_model` writes unless told: the ONNX packages are an extra.
DEFAULT_FORMATS = ("saved_model", "tflite")
SAVED_MODEL_DIRNAME = "saved_model"
REPORT_FILENAME = "export.json"
# Where the report of a refused export goes: next to the artifacts that were
# not published, without replacing the report of an earlier good export.
REFUSED_REPORT_FILENAME = "export.refused.json"
# Verification runs Keras in batches of this size to see whether a sample's
# output depends on its batch-mates.
VERIFY_BATCH_SIZE = 64
# Staging directories live inside `out_dir`, so publishing is a rename on
# one filesystem.
STAGING_PREFIX = ".hlkeras-export-"


class ExportError(ValueError):
    """A user mistake or an unexportable model, with a message that says why.

    The CLI prints it as one line; everything else is a bug and keeps its
    traceback.
    """


class ExportRefused(ExportError):
    """Verification failed, so nothing was published.

    Attributes:
        report: The `ExportReport`, also written to
            `out_dir/export.refused.json`.
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def tflite_filename(quantization):
    """The `.tflite` file name for a quantization mode, e.g. `model_int8.tflite`."""
    return f"model_{'float32' if quantization == 'none' else quantization}.tflite"


# --------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class ArtifactReport:
    """One written artifact and what verification measured on it.

    Every measurement runs the artifact one sample at a time (batch 1, as a
    device does) over the whole verification set, against the Keras model
    run the same way.

    Attributes:
        format: `"saved_model"`, `"tflite"` or `"onnx"`.
        path: Absolute path of the file or directory.
        size_bytes: Size on disk (a directory's files summed).
        ops: Sorted TFLite or ONNX op names (`.tflite` and `.onnx` only).
        builtin_only: Whether every op is a LiteRT builtin (`.tflite` only).
        max_abs_diff: Max absolute difference of outputs against Keras.
        top1_agreement: Fraction of samples whose top-1 class equals Keras'.
        accuracy: Top-1 accuracy on the verification labels, in [0, 1].
        latency_ms: Median batch-1 latency of the LiteRT interpreter or of
            ONNX Runtime (`.tflite` and `.onnx` only).
        opset: The ONNX opset (`.onnx` only).
    """

    format: str
    path: str
    size_bytes: int
    ops: list = None
    builtin_only: bool = None
    max_abs_diff: float = None
    top1_agreement: float = None
    accuracy: float = None
    latency_ms: float = None
    opset: int = None


@dataclasses.dataclass
class ExportReport:
    """What `export_model` wrote and how its artifacts compare to Keras.

    Attributes:
        source: The `.keras` path, or `"<in-memory model>"`.
        backend: The Keras backend the reference model ran on.
        out_dir: Absolute output directory.
        quantization: The `.tflite` quantization mode.
        int8_io: Whether the int8 `.tflite` takes and returns int8 tensors.
        artifacts: One `ArtifactReport` per written artifact.
        verify_samples: Number of samples parity and accuracy used.
        keras_accuracy: Top-1 accuracy of the Keras model (batch 1) on the
            same labels.
        keras_batch_max_abs_diff: Max absolute difference between the Keras
            model's outputs at batch 1 and in batches of up to
            `VERIFY_BATCH_SIZE`: above `batch_tolerance(outputs)` a sample's
            output depends on its batch-mates.
        keras_latency_ms: Median batch-1 latency of Keras
            `model(x, training=False)` in this process.
        max_accuracy_drop: The gate, in accuracy points (see `export_model`).
        refused: Why nothing was published, or `None` when it was.
        export_seconds: Wall time of the whole export, verification included.
    """

    source: str
    backend: str
    out_dir: str
    quantization: str
    int8_io: bool
    artifacts: list
    verify_samples: int = 0
    keras_accuracy: float = None
    keras_batch_max_abs_diff: float = None
    keras_latency_ms: float = None
    max_accuracy_drop: float = None
    refused: str = None
    export_seconds: float = None

    def artifact(self, format):
        """Returns the `ArtifactReport` of `format` (`"saved_model"`/`"tflite"`)."""
        for artifact in self.artifacts:
            if artifact.format == format:
                return artifact
        raise KeyError(f"No {format!r} artifact in this export.")

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["artifacts"] = [ArtifactReport(**a) for a in data["artifacts"]]
        return cls(**data)


# --------------------------------------------------------------------------
# Argument checks


def _check_choice(name, value, allowed):
    return _validation.check_choice(name, value, allowed, error=ExportError)


def _check_formats(formats):
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    if not formats:
        raise ExportError(f"Argument `formats` must name at least one of {FORMATS}. Received: ()")
    for format in formats:
        _check_choice("formats", format, FORMATS)
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


def _check_out_dir(out_dir):
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(
            f"Argument `out_dir` (CLI: --out) must be a directory, created if "
            f"missing; {out_dir} is an existing file."
        )
    return out_dir


def _target_paths(out_dir, formats, quantization):
    """Maps each artifact name to its final path inside `out_dir`."""
    targets = {}
    if "saved_model" in formats:
        targets["saved_model"] = os.path.join(out_dir, SAVED_MODEL_DIRNAME)
    if "tflite" in formats:
        targets["tflite"] = os.path.join(out_dir, tflite_filename(quantization))
    if "onnx" in formats:
        targets["onnx"] = os.path.join(out_dir, onnx_export.ONNX_FILENAME)
    targets["report"] = os.path.join(out_dir, REPORT_FILENAME)
    return targets


def _check_no_overwrite(targets, overwrite):
    existing = [path for path in targets.values() if os.path.lexists(path)]
    if existing and not overwrite:
        raise ExportError(
            f"Export would overwrite {', '.join(existing)}. Pass overwrite=True "
            "(CLI: --overwrite) to replace them, or choose another `out_dir`."
        )


def _as_float_array(name, data, input_shape):
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


def _split_verify_data(verify_data, input_shape):
    """`verify_data` is inputs `x`, or a tuple `(x, labels)`."""
    if verify_data is None:
        return None, None
    if isinstance(verify_data, tuple) and len(verify_data) == 2:
        inputs, labels = verify_data
    else:
        inputs, labels = verify_data, None
    inputs = _as_float_array("verify_data", inputs, input_shape)
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


def _single_input_shape(model):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            "export_model supports models with one input and one output; "
            f"this model has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs."
        )
    return tuple(model.inputs[0].shape)


# --------------------------------------------------------------------------
# Loading a `.keras` file


def load_keras_model(path):
    """Loads a `.keras` file with `safe_mode=True`, or raises `ExportError`.

    Safe mode refuses `Lambda` layers: their Python bytecode would run on load.
    """
    import keras

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"Model file {path} does not exist (or is not a file).")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ExportError(
            f"{path} is not a Keras model file: expected a `.keras` zip archive "
            "written by `model.save(...)`."
        )
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad archive.
        if "Lambda" in str(error):
            raise ExportError(
                f"{path} contains a `Lambda` layer, which loading refuses under "
                "safe_mode=True because it would run arbitrary Python bytecode "
                "from the file. Replace the Lambda with a registered custom "
                "layer (keras.saving.register_keras_serializable)."
            ) from None
        first_line = str(error).strip().splitlines()[0] if str(error) else ""
        hint = ""
        if "Could not locate class" in str(error):
            # Also what a JAX/torch export hits: its TF subprocess imports
            # only keras and hlkeras.
            hint = (
                " Custom layers must be registered with "
                "keras.saving.register_keras_serializable in a module imported "
                "before loading (the JAX/torch export subprocess imports only "
                "keras and hlkeras)."
            )
        raise ExportError(
            f"{path} is not a loadable Keras model: {type(error).__name__}: "
            f"{first_line[:300]}{hint}"
        ) from None


# --------------------------------------------------------------------------
# Pre-export model surgery (LoRA merge)


def _prepare_for_export(model):
    """Returns the model to export, with LoRA adapters merged.

    `hlkeras.lora.merge_lora` folds the adapters into plain layers, so the
    artifact holds no LoRA layer and no extra matmuls. (MoE layers export in
    both modes: capacity and dropless layouts have static shapes.)
    """
    from hlkeras import lora

    if any(lora.adapter_weights(layer) for layer in model.layers):
        return lora.merge_lora(model)
    return model


def _all_layers(model):
    return _compat.sublayers(model)


# --------------------------------------------------------------------------
# Conversion (always under the TensorFlow backend)


def export_saved_model(model, path):
    """Writes `model` as a TF SavedModel with `serve`/`serving_default`."""
    model.export(path, format="tf_saved_model", verbose=False)


def convert_saved_model(
    saved_model_dir,
    quantization="none",
    representative_data=None,
    int8_io=False,
    input_dtype="float32",
):
    """Converts a SavedModel to a `.tflite` flatbuffer (bytes), builtins only.

    Only `TFLITE_BUILTINS` (plus `TFLITE_BUILTINS_INT8` for int8) are allowed:
    Flex (SELECT_TF_OPS) kernels are not in the `ai_edge_litert` runtime nor in
    a default phone build, so a graph that needs them fails here instead of on
    the device.

    Args:
        saved_model_dir: Path of the SavedModel.
        quantization: `"none"` (float32), `"float16"` (half-precision weights),
            `"dynamic"` (int8 weights, float activations) or `"int8"` (full
            integer, calibrated on `representative_data`).
        representative_data: float32 array `(N, ...)` of model inputs, needed
            for `"int8"`.
        int8_io: For `"int8"`, make the model's input and output int8 too.
        input_dtype: The model input's dtype, which calibration samples are
            cast to (`"int32"` for the token ids of a text model).
    """
    import tensorflow as tf

    _check_choice("quantization", quantization, QUANTIZATIONS)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8":
        if representative_data is None:
            raise ExportError(_MISSING_REPRESENTATIVE)
        supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = _one_sample_at_a_time(representative_data, input_dtype)
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    converter.target_spec.supported_ops = supported_ops
    return converter.convert()


_MISSING_REPRESENTATIVE = (
    "quantization='int8' needs `representative_data`: about 100-500 training "
    "inputs as a float32 array (N, ...) to calibrate activation ranges. "
    "Received: representative_data=None"
)


def _one_sample_at_a_time(representative_data, input_dtype="float32"):
    def samples():
        for sample in representative_data:
            yield [sample[None].astype(input_dtype)]

    return samples


def model_to_tflite(model, quantization="none", representative_data=None):
    """Converts an in-memory Keras model (TensorFlow backend) to TFLite bytes.

    `TFLiteConverter.from_keras_model` is broken for Keras 3, so the model goes
    through a temporary SavedModel.
    """
    with tempfile.TemporaryDirectory() as tmp:
        saved_model_dir = os.path.join(tmp, "saved_model")
        export_saved_model(model, saved_model_dir)
        return convert_saved_model(saved_model_dir, quantization, representative_data)


def _write_artifacts(model, staging_dir, request):
    """Writes the requested artifacts of a TF-backend `model` into `staging_dir`.

    `request` holds `formats`, `quantization`, `int8_io` and, for int8,
    `representative_data`. Conversion failures become `ExportError`s that name
    the op and the layer.
    """
    from tensorflow.lite.python.convert_phase import ConverterError

    formats = request["formats"]
    if "onnx" in formats:
        _write_onnx(model, os.path.join(staging_dir, onnx_export.ONNX_FILENAME))
    if "saved_model" not in formats and "tflite" not in formats:
        return
    saved_model_dir = os.path.join(staging_dir, SAVED_MODEL_DIRNAME)
    export_saved_model(model, saved_model_dir)
    if "tflite" in formats:
        try:
            flatbuffer = convert_saved_model(
                _tflite_source(model, saved_model_dir, staging_dir),
                request["quantization"],
                request.get("representative_data"),
                request["int8_io"],
                request["input_dtype"],
            )
        except ConverterError as error:
            raise ExportError(describe_conversion_failure(str(error), model)) from None
        path = os.path.join(staging_dir, tflite_filename(request["quantization"]))
        with open(path, "wb") as file:
            file.write(flatbuffer)
    if "saved_model" not in formats:
        shutil.rmtree(saved_model_dir)
    shutil.rmtree(os.path.join(staging_dir, _BATCH1_SAVED_MODEL_DIRNAME), ignore_errors=True)


_BATCH1_SAVED_MODEL_DIRNAME = "batch1_saved_model"


def _recurrent_layer_names(model):
    import keras

    return ", ".join(
        layer.name for layer in _all_layers(model) if isinstance(layer, keras.layers.RNN)
    )


def _has_recurrent_layer(model):
    return bool(_recurrent_layer_names(model))


def _tflite_source(model, saved_model_dir, staging_dir):
    """The SavedModel the TFLite converter reads: the artifact itself, or for
    a model with recurrent layers (GRU, LSTM) a batch-1 twin, because the
    converter turns their loops into builtin ops only when every tensor in
    the loop has a static shape."""
    import tensorflow as tf

    if not _has_recurrent_layer(model):
        return saved_model_dir
    path = os.path.join(staging_dir, _BATCH1_SAVED_MODEL_DIRNAME)
    signature = [tf.TensorSpec((1, *model.input_shape[1:]), model.inputs[0].dtype)]
    model.export(path, format="tf_saved_model", verbose=False, input_signature=signature)
    return path


_UNSUPPORTED_OP = re.compile(
    r"fused\[\"[^\"]*\", \"([^\"@]+)@[^\"]*\"\][^\n]*?'tf\.(\w+)' op is neither"
)


def describe_conversion_failure(message, model):
    """Turns a TFLite converter error into one sentence naming op and layer.

    The converter's MLIR location of each unsupported op holds the TF name
    scope, e.g. `functional_1/my_layer_1/erfinv/Erfinv`; its first component
    that is a layer of `model` (TF may add a `_N` suffix) is the layer that
    produced the op.
    """
    found = {}
    for scope, op in _UNSUPPORTED_OP.findall(message):
        found.setdefault(op, _layer_in_scope(scope, model))
    if not found:
        ops = re.findall(r"'tf\.(\w+)' op is neither", message)
        found = {op: None for op in ops}
    if not found:
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        return f"TFLite conversion with builtin ops only failed: {first_line[:400]}"
    parts = []
    for op, layer in found.items():
        where = f" in layer {layer.name!r} ({type(layer).__name__})" if layer else ""
        parts.append(f"TF op {op!r}{where}")
    return (
        "The model needs ops with no TFLite builtin kernel (they would need Flex, "
        "which LiteRT on devices and ai_edge_litert cannot run): "
        + "; ".join(parts)
        + ". Rewrite that layer with ops that have builtin kernels."
    )


def _write_onnx(model, path):
    """Converts with `hlkeras.onnx_export`; a failure becomes one
    `ExportError` naming the op and the layer it came from."""
    try:
        onnx_export.convert_to_onnx(model, path)
    except onnx_export.OnnxConversionError as error:
        raise ExportError(describe_onnx_failure(error, model)) from None


def describe_onnx_failure(error, model):
    """One sentence: which ops (in which layers) have no ONNX conversion."""
    parts = []
    for op, node_name in error.ops:
        layer = _layer_in_scope(node_name, model)
        where = f" in layer {layer.name!r} ({type(layer).__name__})" if layer else ""
        parts.append(f"op {op!r}{where}")
    what = "; ".join(dict.fromkeys(parts))
    if error.detail:
        return f"ONNX conversion failed{' at ' + what if what else ''}: {error.detail}"
    return (
        f"The model needs ops with no ONNX conversion in tf2onnx (opset "
        f"{onnx_export.ONNX_OPSET}): {what}. Rewrite that layer with ops ONNX has."
    )


def _layer_in_scope(scope, model):
    layers = _all_layers(model)
    for component in scope.split("/"):
        for layer in layers:
            if re.fullmatch(re.escape(layer.name) + r"(_\d+)?", component):
                return layer
    return None


# --------------------------------------------------------------------------
# Running in a TensorFlow-backend subprocess (JAX and torch models)


def _write_artifacts_in_tensorflow_process(model, staging_dir, request):
    """Saves `model` to `.keras` and converts it in a TF-backend subprocess."""
    import keras

    work_dir = os.path.join(staging_dir, ".work")
    os.makedirs(work_dir)
    keras_path = os.path.join(work_dir, "model.keras")
    model.save(keras_path)
    request = dict(request)
    if request.get("representative_data") is not None:
        npy_path = os.path.join(work_dir, "representative.npy")
        np.save(npy_path, request.pop("representative_data"))
        request["representative_npy"] = npy_path
    request.update(keras_path=keras_path, staging_dir=staging_dir, backend=keras.backend.backend())
    request_path = os.path.join(work_dir, "request.json")
    result_path = os.path.join(work_dir, "result.json")
    request["result_path"] = result_path
    with open(request_path, "w") as file:
        json.dump(request, file)
    completed = subprocess.run(
        [sys.executable, "-m", "hlkeras.export", request_path],
        env=_tensorflow_subprocess_env(),
        capture_output=True,
        text=True,
    )
    result = {}
    if os.path.exists(result_path):
        with open(result_path) as file:
            result = json.load(file)
    shutil.rmtree(work_dir)
    if "user_error" in result:
        raise ExportError(result["user_error"])
    if completed.returncode != 0 or not result.get("ok"):
        raise RuntimeError(
            "The TensorFlow-backend export subprocess failed "
            f"(exit {completed.returncode}):\n{completed.stderr[-4000:]}"
        )


def _tensorflow_subprocess_env():
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # hlkeras may run from a checkout that is not installed.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _subprocess_main(request_path):
    """`python -m hlkeras.export REQUEST.json`: the TF-backend conversion."""
    with open(request_path) as file:
        request = json.load(file)
    try:
        try:
            model = load_keras_model(request["keras_path"])
        except ExportError as error:
            raise ExportError(
                "The TensorFlow-backend export process could not load the "
                f"model saved from {request['backend']}: {error}"
            ) from None
        if "representative_npy" in request:
            request["representative_data"] = np.load(request["representative_npy"])
        _write_artifacts(model, request["staging_dir"], request)
        result = {"ok": True}
    except ExportError as error:
        result = {"user_error": str(error)}
    with open(request["result_path"], "w") as file:
        json.dump(result, file)
    return 0


# --------------------------------------------------------------------------
# Verification in LiteRT


def builtin_op_names():
    """The names of all LiteRT builtin operators (`CUSTOM` excluded)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {n for n in vars(schema.BuiltinOperator) if n.isupper()}
    return names - {"CUSTOM", "DELEGATE"}


def tflite_op_names(tflite_model):
    """Sorted distinct op names in a `.tflite` flatbuffer (bytes)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_model)
    return sorted({op["op_name"] for op in _compat.tflite_op_details(interpreter)})


def _prepared_interpreter(tflite_model, input_shape):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_model)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], input_shape)
    interpreter.allocate_tensors()
    return interpreter


def _set_input(interpreter, array):
    detail = interpreter.get_input_details()[0]
    if detail["dtype"] == np.int8:  # int8 I/O: quantize with the file's scale.
        scale, zero_point = detail["quantization"]
        array = np.clip(np.round(array / scale + zero_point), -128, 127)
    interpreter.set_tensor(detail["index"], np.asarray(array, detail["dtype"]))


def _get_output(interpreter):
    detail = interpreter.get_output_details()[0]
    output = interpreter.get_tensor(detail["index"])
    if detail["dtype"] == np.int8:
        scale, zero_point = detail["quantization"]
        output = (output.astype("float32") - zero_point) * scale
    return output


def run_tflite(tflite_model, inputs):
    """Runs a `.tflite` model (bytes) on one batch in the LiteRT interpreter.

    int8 inputs and outputs are quantized and dequantized with the file's
    scales, so callers always pass and get float arrays.

    Args:
        tflite_model: The flatbuffer bytes.
        inputs: A NumPy array for a single-input model, or a dict from input
            name (the Keras `Input` name) to array. Several inputs go by name
            because LiteRT does not keep the model's input order.

    Returns:
        The first output as a NumPy array.
    """
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(inputs, dict):
        runner = Interpreter(model_content=tflite_model).get_signature_runner("serving_default")
        named = {name: np.asarray(array) for name, array in inputs.items()}
        outputs = runner(**named)
        return outputs[sorted(outputs)[0]]
    interpreter = _prepared_interpreter(tflite_model, np.shape(inputs))
    return _invoke(interpreter, np.asarray(inputs, "float32"))


def _invoke(interpreter, array):
    """Runs a prepared interpreter on `array`; returns a copy of its output."""
    _set_input(interpreter, array)
    interpreter.invoke()
    return np.array(_get_output(interpreter))


def median_latency_ms(run_once, repeats=50, warmup=5):
    """Median wall time of `run_once()` in milliseconds, after `warmup` calls."""
    return 1000.0 * _timing.median_seconds(run_once, repeats, warmup)


def tflite_predictor(tflite_model, input_shape):
    """A function that runs the `.tflite` model (bytes) on batches of
    `input_shape` in one prepared LiteRT interpreter, float in and out."""
    interpreter = _prepared_interpreter(tflite_model, input_shape)
    return functools.partial(_invoke, interpreter)


def saved_model_predictor(path):
    """A function that runs the SavedModel's `serving_default` on a batch
    (cast to its input dtype: a text model takes int32 token ids)."""
    import tensorflow as tf

    serving = tf.saved_model.load(path).signatures["serving_default"]
    (spec,) = serving.structured_input_signature[1].values()

    def predict(array):
        (output,) = serving(tf.constant(array, dtype=spec.dtype)).values()
        return output.numpy()

    return predict


def _tflite_latency_ms(tflite_model, sample, repeats):
    predict = tflite_predictor(tflite_model, sample.shape)
    return median_latency_ms(lambda: predict(sample), repeats)


def _keras_latency_ms(model, sample, repeats):
    from keras import ops

    return median_latency_ms(lambda: ops.convert_to_numpy(model(sample, training=False)), repeats)


def per_sample(predict, inputs):
    """`predict` run on each sample alone (batch 1), as a device runs it."""
    return np.concatenate([predict(sample[None]) for sample in inputs])


def _tflite_per_sample(flatbuffer, inputs):
    return per_sample(tflite_predictor(flatbuffer, (1,) + inputs.shape[1:]), inputs)


def _accuracy(outputs, labels):
    return float(np.mean(np.argmax(outputs, axis=-1) == labels))


def _max_abs_diff(outputs, reference):
    return float(np.max(np.abs(np.asarray(outputs, "float64") - reference)))


def batch_tolerance(outputs):
    """How far float32 outputs may move with the batch size alone.

    Kernels block their work differently at different batch sizes, so sums
    round differently: ~1e-6 relative here. 1e-4 of the output scale stays
    far above that and far below any real dependence on batch-mates.
    """
    return 1e-4 * max(1.0, float(np.max(np.abs(outputs))))


def _score(artifact, outputs, reference, labels):
    artifact.max_abs_diff = _max_abs_diff(outputs, reference)
    artifact.top1_agreement = float(
        np.mean(np.argmax(outputs, axis=-1) == np.argmax(reference, axis=-1))
    )
    if labels is not None:
        artifact.accuracy = _accuracy(outputs, labels)


def path_size(path):
    """Bytes on disk of a file, or of a directory's files summed."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _verify_tflite(path, inputs, labels, reference, sample, latency_runs):
    with open(path, "rb") as file:
        flatbuffer = file.read()
    ops = tflite_op_names(flatbuffer)
    not_builtin = sorted(set(ops) - builtin_op_names())
    if not_builtin:  # The converter should have refused already.
        raise ExportError(f"The .tflite file uses non-builtin ops {not_builtin}.")
    report = ArtifactReport("tflite", path, 0, ops=ops, builtin_only=True)
    if inputs is not None:
        _score(report, _tflite_per_sample(flatbuffer, inputs), reference, labels)
    if sample is not None and latency_runs:
        report.latency_ms = _tflite_latency_ms(flatbuffer, sample, latency_runs)
    return report


def _verify_onnx(path, inputs, labels, reference, sample, latency_runs):
    report = ArtifactReport(
        "onnx", path, 0, ops=onnx_export.op_names(path), opset=onnx_export.ONNX_OPSET
    )
    predict = onnx_export.predictor(path)
    if inputs is not None:
        _score(report, per_sample(predict, inputs), reference, labels)
    if sample is not None and latency_runs:
        report.latency_ms = median_latency_ms(lambda: predict(sample), latency_runs)
    return report


def _verify_saved_model(path, inputs, labels, reference):
    report = ArtifactReport("saved_model", path, 0)
    if inputs is not None:
        _score(report, per_sample(saved_model_predictor(path), inputs), reference, labels)
    return report


def _keras_reference(model, inputs):
    """The Keras outputs per sample at batch 1, and their max difference from
    the same samples run in batches (see `batch_tolerance`)."""
    per_sample = model.predict(inputs, batch_size=1, verbose=0)
    batched = model.predict(inputs, batch_size=min(len(inputs), VERIFY_BATCH_SIZE), verbose=0)
    return np.asarray(per_sample, "float64"), _max_abs_diff(batched, per_sample)


# --------------------------------------------------------------------------
# The accuracy gate


def check_max_accuracy_drop(value):
    """`max_accuracy_drop` must be a number of accuracy points >= 0."""
    return _validation.check_non_negative("max_accuracy_drop", value, error=ExportError)


def non_finite_outputs(reference):
    """Why a Keras model whose own outputs are NaN or infinite cannot be
    exported, or `None`. Checked first: NaN outputs would otherwise read as
    batch dependence or a parity failure, and send the user after a layer."""
    bad = ~np.isfinite(reference).reshape(len(reference), -1).all(axis=-1)
    if not bad.any():
        return None
    return (
        f"the Keras model outputs NaN or infinity for {int(bad.sum())} of {len(reference)} "
        f"verification samples (the first is sample {int(np.argmax(bad))}): check the "
        "verification data and the trained weights for NaN"
    )


def batch_dependence(report, reference):
    """Why the Keras model itself cannot be exported, or `None`: a sample's
    output that depends on its batch-mates (beyond `batch_tolerance`)."""
    if report.keras_batch_max_abs_diff <= batch_tolerance(reference):
        return None
    return (
        "the Keras model's output for a sample depends on the other samples in "
        f"its batch (max |difference| {report.keras_batch_max_abs_diff:.3g} between "
        f"batch 1 and batches of {VERIFY_BATCH_SIZE}): a layer mixes samples at "
        "inference, so no exported file can match it sample by sample"
    )


def accuracy_loss(report):
    """Why the verified artifacts must not be published, or `None`.

    An artifact fails when its accuracy is more than
    `report.max_accuracy_drop` points below Keras' (with labels), or when
    it agrees with Keras' top-1 class on fewer than
    `100 - max_accuracy_drop` percent of the samples (without labels).
    """
    allowed = report.max_accuracy_drop
    for artifact in report.artifacts:
        name = os.path.basename(artifact.path)
        if artifact.accuracy is not None:
            drop = 100 * (report.keras_accuracy - artifact.accuracy)
            if drop > allowed:
                return (
                    f"{name} scored {artifact.accuracy:.2%} against Keras' "
                    f"{report.keras_accuracy:.2%} at batch 1, a drop of {drop:.2f} "
                    f"points > the allowed {allowed:g}{_remedy(artifact, report)}"
                )
        elif 100 * artifact.top1_agreement < 100 - allowed:
            return (
                f"{name} agrees with Keras' top-1 class on only "
                f"{artifact.top1_agreement:.2%} of the samples at batch 1 "
                f"(needs >= {100 - allowed:g}%){_remedy(artifact, report)}"
            )
    return None


def _remedy(artifact, report):
    if artifact.format == "tflite" and report.quantization == "int8":
        return "; try --quantize dynamic or float16, or more --representative data"
    if artifact.format == "tflite" and report.quantization != "none":
        return "; try --quantize none"
    return ""


# --------------------------------------------------------------------------
# Publishing


def _publish(staged, targets, trash_dir):
    """Renames each staged artifact onto its target.

    An existing target is first moved into `trash_dir` (a file would be
    replaced atomically by `os.replace`, but a SavedModel is a directory),
    so a failure before this point leaves the old artifacts untouched.
    """
    os.makedirs(trash_dir, exist_ok=True)
    for name, staged_path in staged.items():
        target = targets[name]
        if os.path.lexists(target):
            os.replace(target, os.path.join(trash_dir, name))
        os.replace(staged_path, target)


# --------------------------------------------------------------------------
# The entry point


def export_model(
    model_or_path,
    out_dir,
    *,
    formats=DEFAULT_FORMATS,
    quantization="none",
    representative_data=None,
    verify_data=None,
    int8_io=False,
    overwrite=False,
    latency_runs=50,
    max_accuracy_drop=1.0,
):
    """Exports a Keras model to SavedModel, builtins-only TFLite and ONNX, verified.

    Works on every backend: on JAX and torch the model is written to `.keras`
    and converted in a `KERAS_BACKEND=tensorflow` subprocess that loads it with
    `safe_mode=True` (so its layers must be Keras built-ins or registered
    hlkeras layers). LoRA layers are merged first.

    Verification runs every artifact one sample at a time (batch 1, as a
    device does) over all of `verify_data`, against the Keras model run the
    same way: max |difference| of outputs, top-1 agreement, accuracy. An
    artifact that loses more than `max_accuracy_drop` points of accuracy
    (without labels: agrees with Keras on fewer than `100 -
    max_accuracy_drop` percent of the samples), or a Keras model whose
    output for a sample depends on the rest of its batch, is refused:
    nothing is published, the report goes to `out_dir/export.refused.json`,
    and `ExportRefused` says why.

    Artifacts, inside `out_dir`: `saved_model/` (with a `serving_default`
    signature), `model_<float32|float16|dynamic|int8>.tflite`, `model.onnx`
    (float32, dynamic batch, opset `hlkeras.onnx_export.ONNX_OPSET`, run in
    ONNX Runtime), and the report as `export.json`. They are written to a
    staging directory and renamed into place only after conversion and
    verification succeed, so a failed export leaves any previous artifacts
    as they were.

    Args:
        model_or_path: A single-input, single-output `keras.Model`, or the
            path of a `.keras` file.
        out_dir: Output directory, created if missing.
        formats: Any of `"saved_model"`, `"tflite"`, `"onnx"` (needs the
            `onnx` extra: `pip install 'hlkeras[onnx]'`). Default: the
            SavedModel and the `.tflite`.
        quantization: `"none"` (float32), `"float16"` (half-precision weights),
            `"dynamic"` (int8 weights only) or `"int8"` (full integer,
            calibrated on `representative_data`).
        representative_data: float32 array `(N, ...)` of about 100-500
            training inputs. Required for `"int8"`.
        verify_data: Inputs `x`, or `(x, labels)`, to measure output parity
            (and accuracy, with labels) against the Keras model. Its first
            sample also times batch-1 latency.
        int8_io: For `"int8"`, make the `.tflite` input and output int8
            instead of float32.
        overwrite: Replace existing artifacts in `out_dir`.
        latency_runs: Timed runs for each median latency; 0 skips timing.
        max_accuracy_drop: Accuracy points (>= 0) an artifact may lose
            against Keras before the export is refused.

    Returns:
        An `ExportReport`, also written to `out_dir/export.json`.

    Raises:
        ExportRefused: Verification failed; nothing was published.
        ExportError: Any other user mistake or unexportable model.

    Example:

    ```python
    report = export_model(model, "export/", quantization="int8",
                          representative_data=x_train[:200],
                          verify_data=(x_test, y_test))
    print(report.artifact("tflite").size_bytes, report.to_json())
    ```
    """
    import keras

    start = time.perf_counter()
    formats = _check_formats(formats)
    _check_choice("quantization", quantization, QUANTIZATIONS)
    max_accuracy_drop = check_max_accuracy_drop(max_accuracy_drop)
    if quantization == "int8" and "tflite" in formats and representative_data is None:
        raise ExportError(_MISSING_REPRESENTATIVE)
    out_dir = _check_out_dir(out_dir)
    targets = _target_paths(out_dir, formats, quantization)
    _check_no_overwrite(targets, overwrite)

    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.path.abspath(os.fspath(model_or_path))
        model = load_keras_model(source)
    else:
        source, model = "<in-memory model>", model_or_path
    input_shape = _single_input_shape(model)
    model = _prepare_for_export(model)
    if quantization == "int8" and "tflite" in formats and _has_recurrent_layer(model):
        raise ExportError(
            "--quantize int8 is not available for a model with recurrent layers "
            f"({_recurrent_layer_names(model)}): TensorFlow 2.21's TFLite calibrator "
            "crashes on their loops; use --quantize dynamic or float16"
        )
    if representative_data is not None:
        representative_data = _as_float_array(
            "representative_data", representative_data, input_shape
        )
    inputs, labels = _split_verify_data(verify_data, input_shape)

    request = {
        "formats": list(formats),
        "quantization": quantization,
        "int8_io": bool(int8_io),
        "representative_data": representative_data,
        "input_dtype": str(model.inputs[0].dtype),
    }
    report = ExportReport(
        source=source,
        backend=keras.backend.backend(),
        out_dir=out_dir,
        quantization=quantization,
        int8_io=bool(int8_io),
        artifacts=[],
        max_accuracy_drop=max_accuracy_drop,
    )
    latency_sample = inputs if inputs is not None else representative_data
    if latency_sample is not None:
        latency_sample = latency_sample[:1]
    created_out_dir = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging_dir = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir)
    staged = {}
    published = False
    try:
        reference = _measure_keras(report, model, inputs, labels, latency_sample, latency_runs)
        if report.refused is None:
            if keras.backend.backend() == "tensorflow":
                _write_artifacts(model, staging_dir, request)
            else:
                _write_artifacts_in_tensorflow_process(model, staging_dir, request)
            staged = {f: os.path.join(staging_dir, os.path.basename(targets[f])) for f in formats}
            _verify_artifacts(
                report, staged, targets, (inputs, labels), reference,
                latency_sample, latency_runs,
            )  # fmt: skip
        report.export_seconds = time.perf_counter() - start
        if report.refused:
            _refuse(report, out_dir)
        staged["report"] = os.path.join(staging_dir, REPORT_FILENAME)
        with open(staged["report"], "w") as file:
            file.write(report.to_json())
        _publish(staged, targets, os.path.join(staging_dir, ".replaced"))
        published = True
        _remove_stale_refusal(out_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
        if created_out_dir and not published and not os.listdir(out_dir):
            os.rmdir(out_dir)
    return report


def _refuse(report, out_dir):
    """Writes the refused report next to the unpublished artifacts; raises."""
    refused_path = os.path.join(out_dir, REFUSED_REPORT_FILENAME)
    partial_path = refused_path + ".partial"
    with open(partial_path, "w") as file:
        file.write(report.to_json())
    os.replace(partial_path, refused_path)
    raise ExportRefused(
        f"export refused, nothing was published: {report.refused}. "
        f"The full report is in {refused_path}",
        report,
    )


def _remove_stale_refusal(out_dir):
    # A refusal report next to artifacts that passed would contradict them.
    refused_path = os.path.join(out_dir, REFUSED_REPORT_FILENAME)
    if os.path.exists(refused_path):
        os.remove(refused_path)


def _measure_keras(report, model, inputs, labels, sample, latency_runs):
    """Fills the Keras side of `report`; returns its per-sample outputs.

    A model whose outputs depend on the batch is refused here, before any
    conversion: no artifact could match it sample by sample.
    """
    reference = None
    if inputs is not None:
        reference, report.keras_batch_max_abs_diff = _keras_reference(model, inputs)
        report.verify_samples = len(inputs)
        if labels is not None:
            report.keras_accuracy = _accuracy(reference, labels)
        report.refused = non_finite_outputs(reference) or batch_dependence(report, reference)
    if sample is not None and latency_runs:
        report.keras_latency_ms = _keras_latency_ms(model, sample, latency_runs)
    return reference


def _verify_artifacts(report, staged, targets, verify_data, reference, sample, latency_runs):
    """Measures each staged artifact into `report`, then applies the gate.

    Args:
        staged: Maps each format to its path in the staging directory.
        targets: Maps each format to its final path (recorded in the report).
        verify_data: `(inputs, labels)`; either may be `None`.
        reference: Keras' per-sample outputs on `inputs`.
        sample: A batch of one input for latency, or `None`.
    """
    inputs, labels = verify_data
    for format, path in staged.items():
        if format == "saved_model":
            artifact = _verify_saved_model(path, inputs, labels, reference)
        elif format == "onnx":
            artifact = _verify_onnx(path, inputs, labels, reference, sample, latency_runs)
        else:
            try:
                artifact = _verify_tflite(path, inputs, labels, reference, sample, latency_runs)
            except RuntimeError as error:
                # LiteRT refuses some converted graphs only when they run
                # (e.g. an int8 DIV whose divisor quantizes to zero).
                name = os.path.basename(targets[format])
                report.refused = f"{name} failed to run in LiteRT: {str(error).strip().rstrip('.')}"
                return
        artifact.path = targets[format]
        artifact.size_bytes = path_size(path)
        report.artifacts.append(artifact)
    if inputs is not None:
        report.refused = accuracy_loss(report)


if __name__ == "__main__":
    sys.exit(_subprocess_main(sys.argv[1]))
