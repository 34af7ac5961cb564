"""`hlkeras export MODEL.keras --out DIR`: a verified SavedModel, `.tflite`
(one per `--quantize` mode) and `.onnx`, and the table of what each
measured."""

import os

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError
from hlkeras.cli.common import add_measuring_data_flags
from hlkeras.cli.common import check_onnx_installed
from hlkeras.cli.common import comma_list


def add_parser(commands):
    export = commands.add_parser(
        "export",
        parents=[COMMON_FLAGS],
        help="export a .keras model to SavedModel, builtins-only TFLite and ONNX, verified",
        description="Export MODEL.keras to a SavedModel, a builtins-only .tflite "
        "and/or a .onnx file, check each against the Keras model in its own "
        "runtime (TensorFlow, LiteRT, ONNX Runtime), print a table and write "
        "DIR/export.json.",
    )
    export.add_argument("model", metavar="MODEL.keras")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument(
        "--quantize",
        default="none",
        help="the .tflite quantization: none (float32), float16, dynamic or int8, "
        "or several comma-separated (one .tflite each, from one SavedModel); or "
        "auto: tries them all and publishes only the fastest that passes the "
        "accuracy gate (int8 only with calibration data)",
    )
    export.add_argument(
        "--format",
        default="saved_model,tflite",
        help="comma-separated artifacts: saved_model, tflite, onnx (onnx needs "
        "pip install 'hlkeras[onnx]')",
    )
    add_measuring_data_flags(
        export,
        "the model's dataset (e.g. digits): int8 calibrates on 200 of its "
        "training images; its test split measures parity and accuracy",
    )
    export.add_argument(
        "--representative",
        metavar="FILE.npy",
        help="int8 calibration inputs, float32 (N, ...); overrides --dataset",
    )
    export.add_argument(
        "--verify",
        metavar="FILE.npz",
        help="verification data: array `x` and optional labels `y`; overrides --dataset",
    )
    export.add_argument(
        "--int8-io", action="store_true", help="int8 input/output, int8-only op set (int8)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    export.add_argument(
        "--latency-runs",
        type=int,
        default=50,
        metavar="N",
        help="timed batch-1 runs per latency median (0 skips timing)",
    )
    export.add_argument(
        "--max-accuracy-drop",
        default="1.0",
        metavar="POINTS",
        help="refuse to publish when an artifact loses more accuracy points "
        "than this against Keras, measured per sample at batch 1 (without "
        "labels: when top-1 agreement is below 100 - POINTS percent; "
        "default 1.0)",
    )
    export.set_defaults(func=run)


def _max_accuracy_drop(text):
    try:
        points = float(text)
    except ValueError:
        points = float("nan")
    if not points >= 0:  # also refuses nan and "-inf"
        raise UsageError(
            f"--max-accuracy-drop must be a number of accuracy points >= 0; got {text!r}"
        )
    return points


def print_export_table(report):
    from hlkeras.export.benchmark import format_optional
    from hlkeras.export.benchmark import format_size

    rows = [("artifact", "size", "max diff", "agreement", "accuracy", "latency")]
    for artifact in report.artifacts:
        rows.append(
            (
                os.path.relpath(artifact.path, report.out_dir),
                format_size(artifact.size_bytes),
                format_optional(artifact.max_abs_diff, ".2e"),
                format_optional(artifact.top1_agreement, ".2%"),
                format_optional(artifact.accuracy, ".2%"),
                format_optional(artifact.latency_ms, ".3f") + " ms"
                if artifact.latency_ms is not None
                else "-",
            )
        )
    rows.append(
        (
            f"keras ({report.backend})",
            "-",
            "-",
            "-",
            format_optional(report.keras_accuracy, ".2%"),
            format_optional(report.keras_latency_ms, ".3f") + " ms"
            if report.keras_latency_ms is not None
            else "-",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    sparse = [a for a in report.artifacts if a.sparse_tensors]
    if sparse:
        names = ", ".join(os.path.basename(a.path) for a in sparse)
        print(
            f"kernels {report.weight_sparsity:.1%} zeros: {names} store them in "
            "the sparse encoding (dynamic and int8 stay dense: LiteRT cannot run theirs)"
        )


def run(args):
    from hlkeras import export

    quantizations = quantize_flag(args.quantize, export.QUANTIZATIONS + (AUTO,))
    choose = quantizations == AUTO
    formats = comma_list("--format", args.format, export.FORMATS)
    if "onnx" in formats:
        check_onnx_installed("--format")
    if args.latency_runs < 0:
        raise UsageError(f"--latency-runs must be >= 0; got {args.latency_runs}")
    max_accuracy_drop = _max_accuracy_drop(args.max_accuracy_drop)

    needs_calibration = not choose and "int8" in quantizations and "tflite" in formats
    representative, verify = export_arrays(args, needs_calibration, wants_calibration=choose)

    try:
        report = export.export_model(
            args.model,
            args.out,
            formats=formats,
            quantization=quantizations,
            representative_data=representative,
            verify_data=verify,
            int8_io=args.int8_io,
            overwrite=args.overwrite,
            latency_runs=args.latency_runs,
            max_accuracy_drop=max_accuracy_drop,
        )
    except export.ExportRefused as refusal:
        print_export_table(refusal.report)
        raise UsageError(str(refusal))
    except export.ExportError as error:
        raise UsageError(str(error))
    print_export_table(report)
    if report.auto:
        print(f"--quantize auto chose {report.auto['chosen']}: {report.auto['reason']}")
    print(f"wrote {os.path.join(report.out_dir, export.REPORT_FILENAME)}")
    return 0


# hlkeras.export.auto.AUTO, spelled again: the parser imports no Keras.
AUTO = "auto"


def quantize_flag(text, allowed):
    """`--quantize`'s comma-separated modes (`float32` is another name of
    `none`), or `"auto"` alone where `allowed` has it."""
    given = [value.strip() for value in text.split(",")]
    if AUTO in given and AUTO in allowed:
        if len(given) > 1:
            raise UsageError(f"--quantize auto tries every mode and takes no other; got {text!r}")
        return AUTO
    named = ",".join("none" if value == "float32" else value for value in given)
    return comma_list("--quantize", named, allowed)


def export_arrays(args, needs_calibration, wants_calibration=False):
    """`(calibration samples, verification data)` of an export command's
    flags (`hlkeras.data.arrays.export_arrays`)."""
    from hlkeras import data

    try:
        return data.arrays.export_arrays(
            args.model,
            needs_calibration=needs_calibration,
            wants_calibration=wants_calibration,
            dataset=args.dataset,
            data=args.data,
            label=args.label,
            text_column=args.text_column,
            representative=args.representative,
            verify=args.verify,
        )
    except data.DatasetError as error:
        raise UsageError(str(error)) from None
