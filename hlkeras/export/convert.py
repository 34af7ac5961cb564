"""Conversion, always under the TensorFlow Keras backend: the SavedModel,
the builtins-only `.tflite` of each quantization, and the `.onnx`.

On the TensorFlow backend it runs in this process; on JAX and torch in a
`KERAS_BACKEND=tensorflow` subprocess (`python -m hlkeras.export REQUEST`)
that loads the model from a `.keras` file with `safe_mode=True`. Keras'
own `export(format="litert")` refuses JAX and turns on Flex ops, and
jax2tf SavedModels of some graphs (`top_k`) do not serve in TF 2.21.
"""

import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from hlkeras.export import onnx_export
from hlkeras.export import profile
from hlkeras.export.arguments import MISSING_REPRESENTATIVE
from hlkeras.export.arguments import check_choice
from hlkeras.export.loading import all_layers
from hlkeras.export.loading import load_keras_model
from hlkeras.export.report import QUANTIZATIONS
from hlkeras.export.report import SAVED_MODEL_DIRNAME
from hlkeras.export.report import ExportError
from hlkeras.export.report import tflite_filename
from hlkeras.layers import moe_ops


def export_saved_model(model, path):
    """Writes `model` as a TF SavedModel with `serve`/`serving_default`,
    MoE experts traced as one matmul each (`moe_ops.per_expert_matmuls`:
    LiteRT's int8 FULLY_CONNECTED is fast, its int8 BATCH_MATMUL is not)."""
    with moe_ops.per_expert_matmuls():
        model.export(path, format="tf_saved_model", verbose=False)


# The quantizations whose `.tflite` may hold sparse-encoded weights. Measured
# with ai_edge_litert 2.3: a sparse dynamic-range or int8 FULLY_CONNECTED
# fails to prepare in LiteRT's default (XNNPACK) runtime, so those stay
# dense (tests/test_export_sparse.py pins it).
SPARSE_QUANTIZATIONS = ("none", "float16")

# A model whose kernels are at least this fraction zeros (a pruned model) is
# exported with the sparse encoding.
SPARSE_ENCODING_MIN_SPARSITY = 0.3


@contextlib.contextmanager
def _collections_skip_older_objects():
    """Freezes the objects that exist when the block starts (`gc.freeze`)
    until it ends, unless the process froze some itself.

    The TFLite converter runs a full `gc.collect()` in every conversion (TF
    2.21's `lite.py`, to free the SavedModel it loaded), and a full
    collection walks every object of the process. In a long-lived one (a
    notebook, a search, a test worker holding ~2 GB of Keras and TF
    objects) that took seconds per conversion (py-spy: `gc_collect_main`
    under the converter); with this, a TF test pass spends 148-150 s in
    collections instead of 329 s. Frozen objects are not walked; the ones
    the block makes are, and what they free, they free as before. The
    frozen ones go back to the oldest generation when the block ends and
    are collected as usual. (A process that froze objects itself, e.g. a
    server before forking, is left alone: `gc.unfreeze` would undo it.)

    Keep the blocks short: garbage older than a block waits for the next
    collection after it. A whole search run frozen made that one
    collection larger (50 s in a test worker), so only conversions are.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@_collections_skip_older_objects()
def convert_saved_model(
    saved_model_dir,
    quantization="none",
    representative_data=None,
    int8_io=False,
    input_dtype="float32",
    sparse=False,
    float_tflite=None,
):
    """Converts a SavedModel to a `.tflite` flatbuffer (bytes), builtins only.

    Only `TFLITE_BUILTINS` and `TFLITE_BUILTINS_INT8` are allowed:
    Flex (SELECT_TF_OPS) kernels are not in the `ai_edge_litert` runtime nor in
    a default phone build, so a graph that needs them fails here instead of on
    the device.

    Args:
        saved_model_dir: Path of the SavedModel.
        quantization: `"none"` (float32), `"float16"` (half-precision weights),
            `"dynamic"` (int8 weights, float activations) or `"int8"` (int8
            weights and activations, calibrated on `representative_data`;
            the converter's int8-only op set with `int8_io`).
        representative_data: float32 array `(N, ...)` of model inputs, needed
            for `"int8"`.
        int8_io: For `"int8"`, make the model's input and output int8 too.
        input_dtype: The model input's dtype, which calibration samples are
            cast to (`"int32"` for the token ids of a text model).
        sparse: Store mostly-zero weights in the converter's sparse encoding
            (`EXPERIMENTAL_SPARSITY`, densified when the interpreter
            prepares); only for the `SPARSE_QUANTIZATIONS`.
        float_tflite: The float32 conversion of the same SavedModel, if the
            caller has it: the int8 route with float I/O reads its graph,
            and converts it itself otherwise.
    """
    import tensorflow as tf

    check_choice("quantization", quantization, QUANTIZATIONS)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.optimizations = []
    if quantization != "none":
        converter.optimizations.append(tf.lite.Optimize.DEFAULT)
    if sparse and quantization in SPARSE_QUANTIZATIONS:
        converter.optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8":
        if representative_data is None:
            raise ExportError(MISSING_REPRESENTATIVE)
        supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = _one_sample_at_a_time(representative_data, input_dtype)
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        else:
            converter.target_spec.supported_ops = [*supported_ops, tf.lite.OpsSet.TFLITE_BUILTINS]
            if float_tflite is None:
                float_tflite = convert_saved_model(saved_model_dir, "none", input_dtype=input_dtype)
            return _int8_with_float_where_faster(converter, float_tflite)
    converter.target_spec.supported_ops = supported_ops
    return converter.convert()


# LiteRT's int8 kernels of these elementwise ops are slower than their
# float32 ones at batch 1 (benchmarks/export.py --profile, vit int8:
# LayerNorm's SQUARED_DIFFERENCE 8 us against 0.1 us per op; SOFTMAX and
# RSQRT 1.7 and 1 us against 1 and 0.1; the text Transformer's 41 MULs 29 us
# against 11.5, its 3 DIVs 9.8 us): an int8 file with float I/O keeps them
# float. Measured with and without DIV, MUL, ADD and SUB, int8 / float32
# latency, interleaved: text 1.12 -> 0.85, vit 0.83 -> 0.76, vit_moe 0.80
# -> 0.77, mlp 0.52 -> 0.50, resnet 0.34 -> 0.34 (0-3% larger files).
FLOAT_IN_INT8_OPS = ("SQUARED_DIFFERENCE", "RSQRT", "SOFTMAX", "DIV", "MUL", "ADD", "SUB")


def _int8_with_float_where_faster(converter, float_tflite):
    """int8 weights and activations, but float32 for `FLOAT_IN_INT8_OPS` and
    for the BATCH_MATMULs of two activations (attention's q.k and
    weights.v: 25.7 us int8 against 4.8 us float32 over a vit's four).
    Every kernel stays int8 (the vectors of the elementwise ops, such as
    LayerNorm's scale, stay float); only a file with float I/O gets this
    (int8 I/O means an integer-only device).

    TF's QuantizationDebugger is TF's selective-quantization API: it
    calibrates once and leaves the denylisted ops and nodes float."""
    import tensorflow as tf

    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_ops=list(FLOAT_IN_INT8_OPS),
        denylisted_nodes=_activation_matmuls(float_tflite),
    )
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=converter.representative_dataset, debug_options=options
    )
    return debugger.get_nondebug_quantized_model()


def _activation_matmuls(float_tflite):
    """Output names of a float `.tflite`'s BATCH_MATMULs without a constant
    operand (the converter names the int8 file's nodes alike)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(float_tflite))
    graph = model.subgraphs[0]
    return [
        graph.tensors[operator.outputs[0]].name.decode()
        for operator in graph.operators
        if profile.op_name(model, operator) == "BATCH_MATMUL"
        and not any(profile.is_constant(model, t) for t in operator.inputs if t >= 0)
    ]


def _one_sample_at_a_time(representative_data, input_dtype="float32"):
    def samples():
        for sample in representative_data:
            yield [sample[None].astype(input_dtype)]

    return samples


def model_to_tflite(model, quantization="none", representative_data=None, **options):
    """Converts an in-memory Keras model (TensorFlow backend) to TFLite bytes.

    `TFLiteConverter.from_keras_model` is broken for Keras 3, so the model goes
    through a temporary SavedModel. `options` are `convert_saved_model`'s.
    """
    with tempfile.TemporaryDirectory() as tmp:
        saved_model_dir = os.path.join(tmp, "saved_model")
        export_saved_model(model, saved_model_dir)
        return convert_saved_model(saved_model_dir, quantization, representative_data, **options)


def write_artifacts(model, staging_dir, request):
    """Writes the requested artifacts of a TF-backend `model` into `staging_dir`.

    `request` holds `formats`, `quantizations`, `int8_io`, `input_dtype`
    and, for int8, `representative_data`. One SavedModel serves every
    `.tflite` conversion. Conversion failures become `ExportError`s that
    name the op and the layer.
    """
    formats = request["formats"]
    if "onnx" in formats:
        _write_onnx(model, os.path.join(staging_dir, onnx_export.ONNX_FILENAME))
    if "saved_model" not in formats and "tflite" not in formats:
        return
    saved_model_dir = os.path.join(staging_dir, SAVED_MODEL_DIRNAME)
    export_saved_model(model, saved_model_dir)
    if "tflite" in formats:
        source = _tflite_source(model, saved_model_dir, staging_dir)
        float_tflite = None
        # float32 first: the int8 conversion reads its graph (a sparse-encoded
        # one would not do: DENSIFY hides which matmul operands are weights).
        for quantization in sorted(request["quantizations"], key=lambda q: q != "none"):
            flatbuffer = _converted(source, quantization, request, model, float_tflite)
            if quantization == "none" and not request.get("sparse", False):
                float_tflite = flatbuffer
            with open(os.path.join(staging_dir, tflite_filename(quantization)), "wb") as file:
                file.write(flatbuffer)
    if "saved_model" not in formats:
        shutil.rmtree(saved_model_dir)
    shutil.rmtree(os.path.join(staging_dir, _BATCH1_SAVED_MODEL_DIRNAME), ignore_errors=True)


def _converted(saved_model_dir, quantization, request, model, float_tflite=None):
    """`convert_saved_model` with the request's options; a converter error
    becomes one `ExportError` naming the op and the layer."""
    from tensorflow.lite.python.convert_phase import ConverterError

    try:
        return convert_saved_model(
            saved_model_dir,
            quantization,
            request.get("representative_data"),
            request["int8_io"],
            request["input_dtype"],
            request.get("sparse", False),
            float_tflite,
        )
    except ConverterError as error:
        raise ExportError(describe_conversion_failure(str(error), model)) from None


_BATCH1_SAVED_MODEL_DIRNAME = "batch1_saved_model"


def recurrent_layer_names(model):
    import keras

    return ", ".join(
        layer.name for layer in all_layers(model) if isinstance(layer, keras.layers.RNN)
    )


def has_recurrent_layer(model):
    return bool(recurrent_layer_names(model))


def _tflite_source(model, saved_model_dir, staging_dir):
    """The SavedModel the TFLite converter reads: the artifact itself, or for
    a model with recurrent layers (GRU, LSTM) a batch-1 twin, because the
    converter turns their loops into builtin ops only when every tensor in
    the loop has a static shape."""
    import tensorflow as tf

    if not has_recurrent_layer(model):
        return saved_model_dir
    path = os.path.join(staging_dir, _BATCH1_SAVED_MODEL_DIRNAME)
    signature = [tf.TensorSpec((1, *model.input_shape[1:]), model.inputs[0].dtype)]
    with moe_ops.per_expert_matmuls():
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
    """Converts with `hlkeras.export.onnx_export`; a failure becomes one
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
    layers = all_layers(model)
    for component in scope.split("/"):
        for layer in layers:
            if re.fullmatch(re.escape(layer.name) + r"(_\d+)?", component):
                return layer
    return None


def write_artifacts_in_tensorflow_process(model, staging_dir, request):
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
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def subprocess_main(request_path):
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
        write_artifacts(model, request["staging_dir"], request)
        result = {"ok": True}
    except ExportError as error:
        result = {"user_error": str(error)}
    with open(request["result_path"], "w") as file:
        json.dump(result, file)
    return 0
