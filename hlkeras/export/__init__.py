"""SavedModel, TFLite (LiteRT) with builtin ops only, and ONNX export, each
verified in its own runtime against the Keras model, sample by sample at
batch 1.

`export_model` (`exporter`) is the entry point: it takes a model from any
backend (or a `.keras` path), writes a SavedModel, one `.tflite` file per
quantization (float32, float16, dynamic-range or int8) and/or
a float32 `.onnx` file, checks that each `.tflite` uses builtin ops only,
runs every artifact (TensorFlow, LiteRT, ONNX Runtime) and returns an
`ExportReport` of sizes, op sets, output parity, accuracy and batch-1
latency. Its stages are modules: `arguments`, `loading`, `convert` (always
under the TensorFlow backend; a subprocess for JAX and torch models),
`runtimes`, `verify`, `report`; `onnx_export` is the ONNX conversion and
`benchmark` measures one model in every runtime.

The conversion and the runtimes need TensorFlow (the TFLite converter,
tf2onnx), imported when they run.
"""

from hlkeras.export.arguments import check_max_accuracy_drop
from hlkeras.export.arguments import check_onnx_installed
from hlkeras.export.arguments import check_quantizations
from hlkeras.export.convert import convert_saved_model
from hlkeras.export.convert import describe_conversion_failure
from hlkeras.export.convert import describe_onnx_failure
from hlkeras.export.convert import export_saved_model
from hlkeras.export.convert import model_to_tflite
from hlkeras.export.exporter import export_model
from hlkeras.export.loading import load_keras_model
from hlkeras.export.report import DEFAULT_FORMATS
from hlkeras.export.report import FORMATS
from hlkeras.export.report import QUANTIZATIONS
from hlkeras.export.report import REFUSED_REPORT_FILENAME
from hlkeras.export.report import REPORT_FILENAME
from hlkeras.export.report import SAVED_MODEL_DIRNAME
from hlkeras.export.report import STAGING_PREFIX
from hlkeras.export.report import VERIFY_BATCH_SIZE
from hlkeras.export.report import ArtifactReport
from hlkeras.export.report import ExportError
from hlkeras.export.report import ExportRefused
from hlkeras.export.report import ExportReport
from hlkeras.export.report import tflite_filename
from hlkeras.export.runtimes import builtin_op_names
from hlkeras.export.runtimes import median_latency_ms
from hlkeras.export.runtimes import path_size
from hlkeras.export.runtimes import per_sample
from hlkeras.export.runtimes import run_tflite
from hlkeras.export.runtimes import saved_model_predictor
from hlkeras.export.runtimes import tflite_op_names
from hlkeras.export.runtimes import tflite_predictor
from hlkeras.export.verify import accuracy_loss
from hlkeras.export.verify import batch_dependence
from hlkeras.export.verify import batch_tolerance
from hlkeras.export.verify import non_finite_outputs

__all__ = [
    "ArtifactReport",
    "DEFAULT_FORMATS",
    "ExportError",
    "ExportRefused",
    "ExportReport",
    "FORMATS",
    "QUANTIZATIONS",
    "REFUSED_REPORT_FILENAME",
    "REPORT_FILENAME",
    "SAVED_MODEL_DIRNAME",
    "STAGING_PREFIX",
    "VERIFY_BATCH_SIZE",
    "accuracy_loss",
    "batch_dependence",
    "batch_tolerance",
    "builtin_op_names",
    "check_max_accuracy_drop",
    "check_onnx_installed",
    "check_quantizations",
    "convert_saved_model",
    "describe_conversion_failure",
    "describe_onnx_failure",
    "export_model",
    "export_saved_model",
    "load_keras_model",
    "median_latency_ms",
    "model_to_tflite",
    "non_finite_outputs",
    "path_size",
    "per_sample",
    "run_tflite",
    "saved_model_predictor",
    "tflite_filename",
    "tflite_op_names",
    "tflite_predictor",
]
