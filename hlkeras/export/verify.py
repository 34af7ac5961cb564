"""Verification: the Keras reference at batch 1, each artifact scored
against it sample by sample, and the gate that refuses an export (NaN
outputs, batch dependence, lost accuracy)."""

import os

import numpy as np

from hlkeras.export import onnx_export
from hlkeras.export.report import VERIFY_BATCH_SIZE
from hlkeras.export.report import ArtifactReport
from hlkeras.export.report import ExportError
from hlkeras.export.runtimes import builtin_op_names
from hlkeras.export.runtimes import keras_latency_ms
from hlkeras.export.runtimes import median_latency_ms
from hlkeras.export.runtimes import path_size
from hlkeras.export.runtimes import per_sample
from hlkeras.export.runtimes import saved_model_predictor
from hlkeras.export.runtimes import tflite_latency_ms
from hlkeras.export.runtimes import tflite_op_names
from hlkeras.export.runtimes import tflite_per_sample
from hlkeras.export.runtimes import tflite_sparse_tensor_count


def accuracy(outputs, labels):
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
        artifact.accuracy = accuracy(outputs, labels)


def _verify_tflite(path, inputs, labels, reference, sample, latency_runs):
    with open(path, "rb") as file:
        flatbuffer = file.read()
    ops = tflite_op_names(flatbuffer)
    not_builtin = sorted(set(ops) - builtin_op_names())
    if not_builtin:  # The converter should have refused already.
        raise ExportError(f"The .tflite file uses non-builtin ops {not_builtin}.")
    report = ArtifactReport(
        "tflite",
        path,
        0,
        ops=ops,
        builtin_only=True,
        sparse_tensors=tflite_sparse_tensor_count(flatbuffer),
    )
    if inputs is not None:
        _score(report, tflite_per_sample(flatbuffer, inputs), reference, labels)
    if sample is not None and latency_runs:
        report.latency_ms = tflite_latency_ms(flatbuffer, sample, latency_runs)
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
    """Why the verified artifacts must not be published, or `None`: the
    first artifact's `artifact_loss`."""
    for artifact in report.artifacts:
        why = artifact_loss(report, artifact)
        if why:
            return why
    return None


def artifact_loss(report, artifact):
    """Why `artifact` must not be published, or `None`.

    It fails when its accuracy is more than `report.max_accuracy_drop`
    points below Keras' (with labels), or when it agrees with Keras' top-1
    class on fewer than `100 - max_accuracy_drop` percent of the samples
    (without labels).
    """
    allowed = report.max_accuracy_drop
    name = os.path.basename(artifact.path)
    if artifact.accuracy is not None:
        drop = 100 * (report.keras_accuracy - artifact.accuracy)
        if drop > allowed:
            return (
                f"{name} scored {artifact.accuracy:.2%} against Keras' "
                f"{report.keras_accuracy:.2%} at batch 1, a drop of {drop:.2f} "
                f"points > the allowed {allowed:g}{_remedy(artifact)}"
            )
    elif 100 * artifact.top1_agreement < 100 - allowed:
        return (
            f"{name} agrees with Keras' top-1 class on only "
            f"{artifact.top1_agreement:.2%} of the samples at batch 1 "
            f"(needs >= {100 - allowed:g}%){_remedy(artifact)}"
        )
    return None


def _remedy(artifact):
    if artifact.quantization == "int8":
        return "; try --quantize dynamic or float16, or more --representative data"
    if artifact.quantization not in (None, "none"):
        return "; try --quantize none"
    return ""


def measure_keras(report, model, inputs, labels, sample, latency_runs):
    """Fills the Keras side of `report`; returns its per-sample outputs.

    A model whose outputs depend on the batch is refused here, before any
    conversion: no artifact could match it sample by sample.
    """
    reference = None
    if inputs is not None:
        reference, report.keras_batch_max_abs_diff = _keras_reference(model, inputs)
        report.verify_samples = len(inputs)
        if labels is not None:
            report.keras_accuracy = accuracy(reference, labels)
        report.refused = non_finite_outputs(reference) or batch_dependence(report, reference)
    if sample is not None and latency_runs:
        report.keras_latency_ms = keras_latency_ms(model, sample, latency_runs)
    return reference


def verify_artifacts(report, staged, out_dir, verify_data, reference, sample, latency_runs):
    """Measures each staged artifact into `report` (the gate is
    `accuracy_loss`, applied by the caller).

    Args:
        staged: `(PlannedArtifact, path in the staging directory)` pairs.
        out_dir: Where the artifacts go when published (their reported path).
        verify_data: `(inputs, labels)`; either may be `None`.
        reference: Keras' per-sample outputs on `inputs`.
        sample: A batch of one input for latency, or `None`.

    Returns:
        `{PlannedArtifact: why}` of the `.tflite` files LiteRT failed to run;
        they are not in `report.artifacts`.
    """
    inputs, labels = verify_data
    failed = {}
    for planned, path in staged:
        if planned.format == "saved_model":
            artifact = _verify_saved_model(path, inputs, labels, reference)
        elif planned.format == "onnx":
            artifact = _verify_onnx(path, inputs, labels, reference, sample, latency_runs)
        else:
            try:
                artifact = _verify_tflite(path, inputs, labels, reference, sample, latency_runs)
            except RuntimeError as error:
                # LiteRT refuses some converted graphs only when they run
                # (e.g. an int8 DIV whose divisor quantizes to zero).
                why = str(error).strip().rstrip(".")
                failed[planned] = f"{planned.filename} failed to run in LiteRT: {why}"
                continue
        artifact.quantization = planned.quantization
        artifact.path = os.path.join(out_dir, planned.filename)
        artifact.size_bytes = path_size(path)
        report.artifacts.append(artifact)
    return failed
