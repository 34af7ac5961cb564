"""The `hlkeras` command line: `hlkeras train | tune | export | info`.

It parses arguments and calls the library modules. User mistakes print one
line to stderr and exit with status 2, without a traceback.
"""

import argparse
import importlib
import os
import platform
import sys
import zipfile

# TensorFlow's C++ start-up logging drowns the CLI's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UsageError(Exception):
    """A user mistake the CLI reports as one line, without a traceback."""


def _version_of(module_name):
    try:
        return importlib.import_module(module_name).__version__
    except ImportError:
        return "not installed"


def cmd_info(args):
    import keras

    import hlkeras

    rows = [
        ("hlkeras", hlkeras.__version__),
        ("keras", keras.__version__),
        ("backend", keras.backend.backend()),
        ("python", platform.python_version()),
        ("tensorflow", _version_of("tensorflow")),
        ("jax", _version_of("jax")),
        ("torch", _version_of("torch")),
        ("keras_tuner", _version_of("keras_tuner")),
        ("tensorflow_datasets", _version_of("tensorflow_datasets")),
        ("ai_edge_litert", _litert_version()),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _litert_version():
    try:
        from importlib.metadata import version

        return version("ai-edge-litert")
    except Exception:
        return "not installed"


# ---------------------------------------------------------------- export


def add_export_parser(commands):
    export = commands.add_parser(
        "export",
        help="export a .keras model to SavedModel and builtins-only TFLite, "
        "verified in LiteRT",
        description="Export MODEL.keras to a SavedModel and a builtins-only "
        ".tflite, check both against the Keras model, print a table and write "
        "DIR/export.json.",
    )
    export.add_argument("model", metavar="MODEL.keras")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument(
        "--quantize", default="none", help="none | float16 | dynamic | int8"
    )
    export.add_argument(
        "--format",
        default="saved_model,tflite",
        help="comma-separated artifacts: saved_model, tflite",
    )
    export.add_argument(
        "--dataset",
        metavar="NAME",
        help="the model's dataset (e.g. digits): int8 calibrates on 200 of its "
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
        help="verification data: array `x` and optional labels `y`; "
        "overrides --dataset",
    )
    export.add_argument(
        "--int8-io", action="store_true", help="int8 input/output tensors for int8"
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace existing artifacts"
    )
    export.add_argument(
        "--latency-runs",
        type=int,
        default=50,
        metavar="N",
        help="timed batch-1 runs per latency median (0 skips timing)",
    )
    export.set_defaults(func=cmd_export)


def _check_cli_choice(flag, value, allowed):
    if value not in allowed:
        raise UsageError(
            f"{flag} must be one of {', '.join(allowed)}; got {value!r}"
        )
    return value


def _load_npy(flag, path):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {path}: cannot read a NumPy .npy file ({error})")


def _load_verify_npz(path):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays:
                raise UsageError(
                    f"--verify {path}: needs an array named 'x' (and optionally "
                    f"'y'); found {sorted(arrays.files)}"
                )
            return (arrays["x"], arrays["y"]) if "y" in arrays else arrays["x"]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UsageError(f"--verify {path}: cannot read a NumPy .npz file ({error})")


def dataset_representative_samples(name):
    """About 200 training images of dataset `name`, for int8 calibration."""
    from hlkeras import data

    return data.representative_samples(name, count=200, data_dir=None)


def dataset_test_arrays(name):
    """`(images, labels)` of dataset `name`'s test split, as NumPy arrays."""
    import numpy as np

    from hlkeras import data

    _, _, test_ds, _ = data.load(name)
    batches = list(test_ds.as_numpy_iterator())
    return (
        np.concatenate([images for images, _ in batches]),
        np.concatenate([labels for _, labels in batches]),
    )


def _from_dataset(fetch, name, what):
    try:
        return fetch(name)
    except (ImportError, AttributeError) as error:
        raise UsageError(
            f"--dataset {name}: cannot load its {what} here ({error}); "
            "pass --representative FILE.npy / --verify FILE.npz instead"
        )


def _format_size(size_bytes):
    for unit in ("B", "KiB", "MiB"):
        if size_bytes < 1024 or unit == "MiB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024


def _format_optional(value, pattern):
    return "-" if value is None else format(value, pattern)


def print_export_table(report):
    rows = [("artifact", "size", "max diff", "accuracy", "latency")]
    for artifact in report.artifacts:
        rows.append(
            (
                os.path.relpath(artifact.path, report.out_dir),
                _format_size(artifact.size_bytes),
                _format_optional(artifact.max_abs_diff, ".2e"),
                _format_optional(artifact.accuracy, ".2%"),
                _format_optional(artifact.latency_ms, ".3f") + " ms"
                if artifact.latency_ms is not None
                else "-",
            )
        )
    rows.append(
        (
            f"keras ({report.backend})",
            "-",
            "-",
            _format_optional(report.keras_accuracy, ".2%"),
            _format_optional(report.keras_latency_ms, ".3f") + " ms"
            if report.keras_latency_ms is not None
            else "-",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def cmd_export(args):
    from hlkeras import export

    quantization = _check_cli_choice("--quantize", args.quantize, export.QUANTIZATIONS)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    for format in formats or [""]:
        _check_cli_choice("--format", format, export.FORMATS)
    if args.latency_runs < 0:
        raise UsageError(f"--latency-runs must be >= 0; got {args.latency_runs}")

    representative = None
    if args.representative:
        representative = _load_npy("--representative", args.representative)
    elif quantization == "int8" and "tflite" in formats:
        if not args.dataset:
            raise UsageError(
                "--quantize int8 needs calibration data: pass --dataset NAME "
                "(e.g. digits) or --representative FILE.npy"
            )
        representative = _from_dataset(
            dataset_representative_samples, args.dataset, "representative samples"
        )
    verify = None
    if args.verify:
        verify = _load_verify_npz(args.verify)
    elif args.dataset:
        verify = _from_dataset(dataset_test_arrays, args.dataset, "test split")

    try:
        report = export.export_model(
            args.model,
            args.out,
            formats=formats,
            quantization=quantization,
            representative_data=representative,
            verify_data=verify,
            int8_io=args.int8_io,
            overwrite=args.overwrite,
            latency_runs=args.latency_runs,
        )
    except export.ExportError as error:
        raise UsageError(str(error))
    print_export_table(report)
    print(f"wrote {os.path.join(report.out_dir, export.REPORT_FILENAME)}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hlkeras",
        description="Modern hidden layers for Keras 3: train, tune and export.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    info = commands.add_parser(
        "info", help="print library versions and the active Keras backend"
    )
    info.set_defaults(func=cmd_info)
    add_export_parser(commands)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as error:
        print(f"hlkeras {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
