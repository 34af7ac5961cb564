"""`quantization="auto"`: convert every `.tflite` quantization, verify each
sample by sample at batch 1, and publish only the fastest that passes the
accuracy gate, as measured on this machine. The report says why."""

import os
import pathlib

from hlkeras.export.report import QUANTIZATIONS
from hlkeras.export.report import ExportError
from hlkeras.export.runtimes import interleaved_latency_ms
from hlkeras.export.verify import artifact_loss

AUTO = "auto"

NO_CALIBRATION = (
    "int8 needs calibration inputs (representative_data; CLI: --dataset, --data or "
    "--representative)"
)
RECURRENT = "TensorFlow 2.21's TFLite calibrator crashes on recurrent layers"


def is_auto(quantization):
    return isinstance(quantization, str) and quantization == AUTO


def check_auto(formats, verify_data, latency_runs):
    """The arguments `"auto"` needs to choose by: a `.tflite`, labels or
    inputs for the gate, and timed runs."""
    if "tflite" not in formats:
        raise ExportError(
            "quantization='auto' (CLI: --quantize auto) chooses among .tflite "
            f"files; `formats` must include 'tflite'. Received: {tuple(formats)}"
        )
    if verify_data is None:
        raise ExportError(
            "quantization='auto' (CLI: --quantize auto) publishes the fastest "
            ".tflite that passes the accuracy gate, so it needs verify_data "
            "(CLI: --dataset, --data or --verify)"
        )
    if not latency_runs:
        raise ExportError(
            "quantization='auto' (CLI: --quantize auto) picks the fastest .tflite, "
            f"so it needs latency_runs > 0 (CLI: --latency-runs). Received: {latency_runs}"
        )


def candidates(representative_data, recurrent):
    """`(quantizations to try, {quantization: why it is not tried})`."""
    skipped = {}
    if representative_data is None:
        skipped["int8"] = NO_CALIBRATION
    elif recurrent:
        skipped["int8"] = RECURRENT
    return tuple(q for q in QUANTIZATIONS if q not in skipped), skipped


def time_in_turns(report, staged, sample, repeats):
    """Re-times the verified `.tflite` files in turns
    (`runtimes.interleaved_latency_ms`) and records each one's median as its
    `latency_ms`: timed one after the other, as verification does, a busy
    moment of the machine would favour whichever file it missed."""
    paths = {planned.quantization: path for planned, path in staged if planned.format == "tflite"}
    tried = [a for a in report.artifacts if a.format == "tflite"]
    flatbuffers = {a.quantization: pathlib.Path(paths[a.quantization]).read_bytes() for a in tried}
    medians = interleaved_latency_ms(flatbuffers, sample, repeats)
    for artifact in tried:
        artifact.latency_ms = medians[artifact.quantization]


def choose_fastest(report, staged, failed, skipped):
    """Keeps in `report` and `staged` only the fastest `.tflite` that passes
    `artifact_loss` (of equal latencies, the smaller file), and records every
    candidate in `report.auto`; refuses the export (`report.refused`) when
    none passes.

    Args:
        staged: `(PlannedArtifact, staged path)` pairs of the export.
        failed: `{PlannedArtifact: why}` of the files LiteRT could not run.
        skipped: `{quantization: why}` of the modes not converted.

    Returns:
        The staged pairs to publish.
    """
    tried = [a for a in report.artifacts if a.format == "tflite"]
    rows = [_row(a, artifact_loss(report, a)) for a in tried]
    rows += [{"quantization": p.quantization, "refused": why} for p, why in failed.items()]
    passed = sorted(
        (row for row in rows if row["refused"] is None),
        key=lambda row: (row["latency_ms"], row["size_bytes"]),
    )
    report.auto = {"chosen": None, "reason": None, "candidates": rows, "skipped": skipped}
    if not passed:
        reasons = "; ".join(row["refused"] for row in rows) + _not_tried(skipped)
        report.refused = f"quantization 'auto': no .tflite passed the gate ({reasons})"
        return staged
    chosen = passed[0]["quantization"]
    report.auto.update(chosen=chosen, reason=_reason(passed, rows) + _not_tried(skipped))
    report.quantization = chosen
    report.artifacts = [
        a for a in report.artifacts if a.format != "tflite" or a.quantization == chosen
    ]
    return [(p, path) for p, path in staged if p.format != "tflite" or p.quantization == chosen]


def _row(artifact, refused):
    return {
        "quantization": artifact.quantization,
        "file": os.path.basename(artifact.path),
        "latency_ms": artifact.latency_ms,
        "size_bytes": artifact.size_bytes,
        "accuracy": artifact.accuracy,
        "top1_agreement": artifact.top1_agreement,
        "max_abs_diff": artifact.max_abs_diff,
        "refused": refused,
    }


def _reason(passed, rows):
    """One sentence: the chosen file's latency against the others'."""
    times = ", ".join(f"{row['quantization']} {row['latency_ms']:.3f} ms" for row in passed)
    reason = (
        f"{passed[0]['file']} is the fastest of the {len(passed)} .tflite that passed the "
        f"accuracy gate, by median batch-1 LiteRT latency on this machine, timed in turns "
        f"({times})"
    )
    refused = [row["refused"] for row in rows if row["refused"] is not None]
    if refused:
        reason += "; refused: " + "; ".join(refused)
    return reason


def _not_tried(skipped):
    return "".join(f"; not tried: {q}: {why}" for q, why in skipped.items())
