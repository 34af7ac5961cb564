"""`export_model`: the one entry point, as a sequence of stage calls: check
the arguments, load the model, measure Keras, convert (one SavedModel for
every `.tflite`), verify each artifact, then publish or refuse."""

import dataclasses
import os
import shutil
import tempfile
import time

from hlkeras.export import auto
from hlkeras.export import onnx_export
from hlkeras.export.arguments import MISSING_REPRESENTATIVE
from hlkeras.export.arguments import as_float_array
from hlkeras.export.arguments import check_formats
from hlkeras.export.arguments import check_max_accuracy_drop
from hlkeras.export.arguments import check_no_overwrite
from hlkeras.export.arguments import check_out_dir
from hlkeras.export.arguments import check_quantizations
from hlkeras.export.arguments import single_input_shape
from hlkeras.export.arguments import split_verify_data
from hlkeras.export.convert import SPARSE_ENCODING_MIN_SPARSITY
from hlkeras.export.convert import has_recurrent_layer
from hlkeras.export.convert import recurrent_layer_names
from hlkeras.export.convert import write_artifacts
from hlkeras.export.convert import write_artifacts_in_tensorflow_process
from hlkeras.export.loading import kernel_sparsity
from hlkeras.export.loading import load_keras_model
from hlkeras.export.loading import prepare_for_export
from hlkeras.export.report import DEFAULT_FORMATS
from hlkeras.export.report import QUANTIZATIONS
from hlkeras.export.report import REFUSED_REPORT_FILENAME
from hlkeras.export.report import REPORT_FILENAME
from hlkeras.export.report import SAVED_MODEL_DIRNAME
from hlkeras.export.report import STAGING_PREFIX
from hlkeras.export.report import ExportError
from hlkeras.export.report import ExportRefused
from hlkeras.export.report import ExportReport
from hlkeras.export.report import tflite_filename
from hlkeras.export.verify import accuracy_loss
from hlkeras.export.verify import measure_keras
from hlkeras.export.verify import verify_artifacts


@dataclasses.dataclass(frozen=True)
class PlannedArtifact:
    """One file or directory an export writes: its format, its `.tflite`
    quantization (`None` for the others) and its name inside `out_dir`."""

    format: str
    quantization: str
    filename: str


def planned_artifacts(formats, quantizations):
    """The artifacts of `formats`, one `.tflite` per quantization, in the
    order they are verified and reported."""
    planned = []
    if "saved_model" in formats:
        planned.append(PlannedArtifact("saved_model", None, SAVED_MODEL_DIRNAME))
    if "tflite" in formats:
        planned += [PlannedArtifact("tflite", q, tflite_filename(q)) for q in quantizations]
    if "onnx" in formats:
        planned.append(PlannedArtifact("onnx", None, onnx_export.ONNX_FILENAME))
    return planned


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
    signature), `model_<float32|float16|dynamic|int8>.tflite` for each
    quantization, `model.onnx` (float32, dynamic batch, opset
    `hlkeras.export.onnx_export.ONNX_OPSET`, run in ONNX Runtime), and the
    report as `export.json`. They are written to a staging directory and
    renamed into place only after conversion and verification succeed, so a
    failed export leaves any previous artifacts as they were. Several
    quantizations share one SavedModel and one Keras reference.

    Args:
        model_or_path: A single-input, single-output `keras.Model`, or the
            path of a `.keras` file.
        out_dir: Output directory, created if missing.
        formats: Any of `"saved_model"`, `"tflite"`, `"onnx"` (needs the
            `onnx` extra: `pip install 'hlkeras[onnx]'`). Default: the
            SavedModel and the `.tflite`.
        quantization: The `.tflite` quantization, or a sequence of them
            (one `.tflite` each): `"none"` (or `"float32"`), `"float16"`
            (half-precision weights), `"dynamic"` (int8 weights only) or
            `"int8"` (int8 weights and activations, calibrated on
            `representative_data`; with float I/O, the elementwise ops
            whose LiteRT int8 kernels are slower stay float:
            `convert.FLOAT_IN_INT8_OPS` and attention's activation
            matmuls. With `int8_io=True` they are int8 too). Or `"auto"`:
            every mode is converted and verified, and only the fastest
            `.tflite` that passes the accuracy gate (median batch-1 LiteRT
            latency on this machine, the candidates timed in turns) is
            published, `report.auto` says why;
            int8 is tried only with `representative_data`. It needs
            `verify_data` and `latency_runs > 0`.
        representative_data: float32 array `(N, ...)` of about 100-500
            training inputs. Required for `"int8"`.
        verify_data: Inputs `x`, or `(x, labels)`, to measure output parity
            (and accuracy, with labels) against the Keras model. Its first
            sample also times batch-1 latency.
        int8_io: For `"int8"`, make the `.tflite` input and output int8
            instead of float32, with the converter's int8-only op set (for
            integer-only accelerators).
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
    report = export_model(model, "export/", quantization=("float32", "int8"),
                          representative_data=x_train[:200],
                          verify_data=(x_test, y_test))
    print(report.artifact("tflite", "int8").size_bytes, report.to_json())
    ```
    """
    import keras

    start = time.perf_counter()
    formats = check_formats(formats)
    choose = auto.is_auto(quantization)
    if choose:
        auto.check_auto(formats, verify_data, latency_runs)
    quantizations = QUANTIZATIONS if choose else check_quantizations(quantization)
    max_accuracy_drop = check_max_accuracy_drop(max_accuracy_drop)
    int8_asked = not choose and "int8" in quantizations and "tflite" in formats
    if int8_asked and representative_data is None:
        raise ExportError(MISSING_REPRESENTATIVE)
    out_dir = check_out_dir(out_dir)
    targets = [os.path.join(out_dir, a.filename) for a in planned_artifacts(formats, quantizations)]
    check_no_overwrite(targets + [os.path.join(out_dir, REPORT_FILENAME)], overwrite)

    source, model = _load(model_or_path)
    input_shape = single_input_shape(model)
    model = prepare_for_export(model)
    recurrent = has_recurrent_layer(model)
    if choose:
        quantizations, skipped = auto.candidates(representative_data, recurrent)
    planned = planned_artifacts(formats, quantizations)
    if recurrent and "int8" in quantizations and "tflite" in formats:
        raise ExportError(
            "--quantize int8 is not available for a model with recurrent layers "
            f"({recurrent_layer_names(model)}): TensorFlow 2.21's TFLite calibrator "
            "crashes on their loops; use --quantize dynamic or float16"
        )
    if representative_data is not None:
        representative_data = as_float_array(
            "representative_data", representative_data, input_shape
        )
    inputs, labels = split_verify_data(verify_data, input_shape)
    report = ExportReport(
        source=source,
        backend=keras.backend.backend(),
        out_dir=out_dir,
        quantization=quantizations[0] if len(quantizations) == 1 else list(quantizations),
        int8_io=bool(int8_io),
        artifacts=[],
        max_accuracy_drop=max_accuracy_drop,
        weight_sparsity=kernel_sparsity(model),
    )
    request = {
        "sparse": report.weight_sparsity >= SPARSE_ENCODING_MIN_SPARSITY,
        "formats": list(formats),
        "quantizations": list(quantizations),
        "int8_io": bool(int8_io),
        "representative_data": representative_data,
        "input_dtype": str(model.inputs[0].dtype),
    }
    latency_sample = inputs if inputs is not None else representative_data
    if latency_sample is not None:
        latency_sample = latency_sample[:1]

    created_out_dir = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging_dir = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir)
    published = False
    try:
        reference = measure_keras(report, model, inputs, labels, latency_sample, latency_runs)
        staged = []
        if report.refused is None:
            _convert(model, staging_dir, request)
            staged = [(a, os.path.join(staging_dir, a.filename)) for a in planned]
            failed = verify_artifacts(
                report, staged, out_dir, (inputs, labels), reference, latency_sample, latency_runs
            )
            if choose:
                auto.time_in_turns(report, staged, latency_sample, latency_runs)
                staged = auto.choose_fastest(report, staged, failed, skipped)
            elif failed:
                report.refused = next(iter(failed.values()))
            if report.refused is None and inputs is not None:
                report.refused = accuracy_loss(report)
        report.export_seconds = time.perf_counter() - start
        if report.refused:
            _refuse(report, out_dir)
        staged_report = os.path.join(staging_dir, REPORT_FILENAME)
        with open(staged_report, "w") as file:
            file.write(report.to_json())
        moves = [(path, a.filename) for a, path in staged] + [(staged_report, REPORT_FILENAME)]
        _publish(moves, out_dir, os.path.join(staging_dir, ".replaced"))
        published = True
        _remove_stale_refusal(out_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
        if created_out_dir and not published and not os.listdir(out_dir):
            os.rmdir(out_dir)
    return report


def _load(model_or_path):
    """`(source, model)`: a `.keras` path loaded safely, or the model itself."""
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.path.abspath(os.fspath(model_or_path))
        return source, load_keras_model(source)
    return "<in-memory model>", model_or_path


def _convert(model, staging_dir, request):
    """Writes the requested artifacts into `staging_dir`, always under the
    TensorFlow backend (`hlkeras.export.convert`)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        write_artifacts(model, staging_dir, request)
    else:
        write_artifacts_in_tensorflow_process(model, staging_dir, request)


def _publish(moves, out_dir, trash_dir):
    """Renames each staged `(path, filename)` onto `out_dir/filename`.

    An existing target is first moved into `trash_dir` (a file would be
    replaced atomically by `os.replace`, but a SavedModel is a directory),
    so a failure before this point leaves the old artifacts untouched.
    """
    os.makedirs(trash_dir, exist_ok=True)
    for staged_path, filename in moves:
        target = os.path.join(out_dir, filename)
        if os.path.lexists(target):
            os.replace(target, os.path.join(trash_dir, filename))
        os.replace(staged_path, target)


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
