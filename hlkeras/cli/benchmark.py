"""`hlkeras benchmark MODEL`: one model in every runtime, side by side
(`hlkeras.export.benchmark`)."""

import argparse
import functools
import os
import sys

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError
from hlkeras.cli.common import add_measuring_data_flags
from hlkeras.cli.common import check_onnx_installed
from hlkeras.cli.common import comma_list
from hlkeras.cli.export import export_arrays
from hlkeras.cli.export import quantize_flag
from hlkeras.training import runs


def add_parser(commands):
    from hlkeras.export import QUANTIZATIONS
    from hlkeras.export.benchmark import FORMATS

    benchmark = commands.add_parser(
        "benchmark",
        parents=[COMMON_FLAGS],
        help="one model in every runtime: size, batch-1 latency, throughput, accuracy",
        description=(
            "Exports MODEL (a .keras file or a run directory) to a temporary "
            "directory and runs it in Keras (model.predict and a compiled "
            "predict_on_batch), the SavedModel in TensorFlow, LiteRT at each "
            "quantization and ONNX Runtime. Prints one table (size, batch-1 "
            "latency p50/p90 and its ratio to Keras predict, samples/s at batch "
            "32, accuracy and top-1 agreement with Keras, one sample at a time), "
            "writes it as JSON and plots it."
        ),
    )
    benchmark.add_argument("model", metavar="MODEL")
    add_measuring_data_flags(
        benchmark,
        "the data to measure on (its test split; int8 calibrates on its "
        "training split); default: a run directory's own dataset",
    )
    benchmark.add_argument(
        "--formats",
        default=None,
        help=f"comma-separated: {', '.join(FORMATS)} (default: all whose packages are installed)",
    )
    benchmark.add_argument(
        "--quantize",
        default=",".join(QUANTIZATIONS),
        help="the .tflite quantizations, comma-separated (default: all)",
    )
    benchmark.add_argument(
        "--latency-runs", type=int, default=100, metavar="N", help="timed batch-1 calls per runtime"
    )
    benchmark.add_argument("--json", default="benchmark.json", metavar="FILE", help="the report")
    benchmark.add_argument("--plot", default="benchmark.png", metavar="FILE", help="the bar chart")
    benchmark.set_defaults(func=run, representative=None, verify=None)


def _benchmark_formats(args):
    from hlkeras.export import benchmark
    from hlkeras.export import onnx_export

    if args.formats is not None:
        formats = comma_list("--formats", args.formats, benchmark.FORMATS)
        if "onnx" in formats:
            check_onnx_installed("--formats")
        return formats
    if onnx_export.missing_packages():
        print(
            f"benchmark: skipping onnx (not installed: {onnx_export.ONNX_EXTRA_HINT})",
            file=sys.stderr,
        )
        return [f for f in benchmark.FORMATS if f != "onnx"]
    return list(benchmark.FORMATS)


def _benchmark_args(args):
    """A copy of `args` whose `model` is MODEL's `.keras` file; a run
    directory's recorded data fills in --dataset / --data when neither is
    given. `args` itself is left as parsed."""
    path, recorded = args.model, {}
    if os.path.isdir(path):
        run_dir = runs.RunDir(path)
        if not args.dataset and not args.data and os.path.exists(run_dir.file(run_dir.CONFIG)):
            settings = run_dir.recorded_settings()
            data = settings.get("data")
            recorded = {
                "data": data,
                "label": settings.get("label", args.label),
                "text_column": settings.get("text_column"),
                "dataset": None if data else settings.get("dataset") or "digits",
            }
        path = run_dir.file(run_dir.MODEL)
    if not os.path.isfile(path) or not path.endswith(".keras"):
        raise UsageError(f"MODEL {args.model}: expected a .keras file or a run directory")
    resolved = argparse.Namespace(**{**vars(args), **recorded, "model": path})
    if not resolved.dataset and not resolved.data:
        raise UsageError(
            f"MODEL {args.model}: pass --dataset NAME or --data PATH to measure accuracy on"
        )
    return resolved


def run(args):
    import tempfile

    from hlkeras import export
    from hlkeras.export import benchmark

    formats = _benchmark_formats(args)
    quantizations = quantize_flag(args.quantize, export.QUANTIZATIONS)
    if args.latency_runs < 1:
        raise UsageError(f"--latency-runs must be >= 1; got {args.latency_runs}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a directory; give a file name")
    args = _benchmark_args(args)
    try:
        export.load_keras_model(args.model)
    except export.ExportError as error:
        raise UsageError(str(error)) from None
    needs_calibration = "tflite" in formats and "int8" in quantizations
    representative, verify = export_arrays(args, needs_calibration)
    progress = functools.partial(print, "benchmark:", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="hlkeras-benchmark-") as work_dir:
        report = benchmark.benchmark_model(
            args.model,
            verify,
            representative_data=representative,
            formats=formats,
            quantizations=quantizations,
            latency_runs=args.latency_runs,
            work_dir=work_dir,
            progress=progress,
        )
    for line in benchmark.table_lines(report):
        print(line)
    benchmark.write_json(report, args.json)
    benchmark.plot(report, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0
