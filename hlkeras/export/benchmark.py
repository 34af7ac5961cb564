"""`hlkeras benchmark`: one model in every runtime it ships to, side by side.

`benchmark_model` exports a `.keras` model (through `hlkeras.export`, into a
work directory) and runs it in Keras on the active backend (`predict`, and a
compiled call), the SavedModel in TensorFlow, LiteRT at each quantization,
and ONNX Runtime. For each it measures the file size, the batch-1 latency
(p50 and p90), the throughput at batch `THROUGHPUT_BATCH`, and, one sample
at a time as a device runs, the accuracy and the top-1 agreement with Keras.

The artifacts are exported without hlkeras.export's accuracy gate: a
benchmark reports what an int8 file loses instead of refusing it.
"""

import dataclasses
import json
import os

import numpy as np

from hlkeras import _files
from hlkeras import _timing
from hlkeras import _validation
from hlkeras import export
from hlkeras.export import onnx_export

# The artifact families `--formats` chooses from; Keras is always measured,
# since every other row is compared with it.
FORMATS = ("saved_model", "tflite", "onnx")
THROUGHPUT_BATCH = 32
LATENCY_WARMUP = 5


@dataclasses.dataclass
class RuntimeResult:
    """One runtime's measurements.

    Attributes:
        name: The row, e.g. `"keras predict"`, `"tflite int8"`, `"onnx"`.
        runtime: What ran it, e.g. `"keras 3.15.1 (jax)"`, `"LiteRT"`.
        path: The artifact (`None` for Keras).
        size_bytes: Its size on disk (Keras: the `.keras` file).
        latency_p50_ms: Median wall time of one batch-1 call.
        latency_p90_ms: 90th percentile of the same calls.
        throughput: Samples per second at batch `THROUGHPUT_BATCH` (median
            call), or `None` when the artifact takes batch 1 only.
        accuracy: Top-1 accuracy, one sample at a time, on the labels.
        agreement: Fraction of samples whose top-1 class equals Keras'.
        max_abs_diff: Max absolute difference of outputs from Keras'.
        note: Why a measurement is missing, or how the row was run.
    """

    name: str
    runtime: str
    path: str = None
    size_bytes: int = None
    latency_p50_ms: float = None
    latency_p90_ms: float = None
    throughput: float = None
    accuracy: float = None
    agreement: float = None
    max_abs_diff: float = None
    note: str = None


@dataclasses.dataclass
class BenchmarkReport:
    """Every runtime's `RuntimeResult` for one model.

    Attributes:
        model: The `.keras` path.
        backend: The Keras backend.
        samples: How many samples accuracy and agreement used.
        latency_runs: Timed batch-1 calls per latency.
        results: One `RuntimeResult` per row, Keras first.
    """

    model: str
    backend: str
    samples: int
    latency_runs: int
    results: list

    def result(self, name):
        """The `RuntimeResult` named `name`, or `None`."""
        return next((r for r in self.results if r.name == name), None)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2)


@dataclasses.dataclass
class _Runtime:
    """How to run one row: `make_predict(batch_size)` returns a function
    from a batch to outputs (a LiteRT interpreter is prepared per batch
    shape); `per_sample`, when set, computes the batch-1 outputs of many
    samples in one call (Keras `predict(batch_size=1)`)."""

    name: str
    runtime: str
    path: str
    make_predict: object
    per_sample: object = None
    note: str = None


def benchmark_model(
    model_path,
    verify_data,
    *,
    representative_data=None,
    formats=FORMATS,
    quantizations=export.QUANTIZATIONS,
    latency_runs=100,
    work_dir,
    progress=print,
):
    """Exports and measures `model_path` in every runtime.

    Args:
        model_path: A `.keras` file.
        verify_data: `(inputs, labels)` for accuracy, agreement and latency.
        representative_data: Calibration inputs for `"int8"` (skipped with a
            note without them).
        formats: Any of `FORMATS`.
        quantizations: The `.tflite` quantizations to measure.
        latency_runs: Timed batch-1 calls per runtime (p50, p90).
        work_dir: Where the artifacts are exported (one export, one
            directory per artifact only if that export failed).
        progress: Called with one line per step.

    Returns:
        A `BenchmarkReport`.
    """
    import keras

    for format in formats:
        _validation.check_choice("formats", format, FORMATS)
    for quantization in quantizations:
        _validation.check_choice("quantizations", quantization, export.QUANTIZATIONS)
    inputs, labels = verify_data
    options = {
        "formats": formats,
        "quantizations": quantizations,
        "representative_data": representative_data,
    }
    model = export.load_keras_model(model_path)
    runtimes = _keras_runtimes(model, model_path)
    runtimes += _exported_runtimes(model_path, model.input_shape, options, work_dir, progress)
    order = ["keras predict", "keras compiled", "saved_model"]
    order += [_row_name("tflite", q) for q in export.QUANTIZATIONS] + ["onnx"]
    runtimes.sort(key=lambda runtime: order.index(runtime.name))
    reference = None
    results = []
    for index, runtime in enumerate(runtimes):
        progress(f"[{index + 1}/{len(runtimes)}] measuring {runtime.name}")
        result, outputs = _measure(runtime, inputs, labels, reference, latency_runs)
        if reference is None:  # Keras predict, the first row, is the reference.
            reference = outputs
            result.agreement, result.max_abs_diff = 1.0, 0.0
        results.append(result)
    return BenchmarkReport(
        model=os.path.abspath(model_path),
        backend=keras.backend.backend(),
        samples=len(inputs),
        latency_runs=latency_runs,
        results=results,
    )


def _keras_runtimes(model, model_path):
    """Keras `predict` as a user calls it, and the compiled predict step
    called directly (`predict_on_batch` after `compile(jit_compile=...)`:
    XLA on TensorFlow and JAX; none on torch, where `torch.compile` took
    35-70 s here per model and was no faster at batch 1)."""
    import keras

    backend = keras.backend.backend()
    engine = f"keras {keras.__version__} ({backend})"
    compiled = export.load_keras_model(model_path)  # its own compile state
    compiled.compile(jit_compile=backend != "torch")
    return [
        _Runtime(
            "keras predict",
            engine,
            model_path,
            lambda batch_size: lambda x: model.predict(x, verbose=0),
            per_sample=lambda x: model.predict(x, batch_size=1, verbose=0),
            note="model.predict(x)",
        ),
        _Runtime(
            "keras compiled",
            engine,
            model_path,
            lambda batch_size: compiled.predict_on_batch,
            note=f"predict_on_batch, jit_compile={compiled.jit_compile}",
        ),
    ]


def _exported_runtimes(model_path, input_shape, options, work_dir, progress):
    """One `_Runtime` per requested artifact, all from one export into
    `work_dir` (one SavedModel and one conversion path for every `.tflite`).
    When that export fails, each artifact is exported alone, so one mode
    that cannot convert does not hide the others: its row gets the reason."""
    formats = [f for f in FORMATS if f in options["formats"]]
    quantizations = list(options["quantizations"]) if "tflite" in formats else []
    failures = {}
    if "int8" in quantizations and options["representative_data"] is None:
        quantizations.remove("int8")
        failures[("tflite", "int8")] = "int8 needs representative data (--dataset or --data)"
    planned = [(f, None) for f in formats if f != "tflite"] + [("tflite", q) for q in quantizations]
    export_formats = [f for f in formats if f != "tflite" or quantizations]
    directories = {key: work_dir for key in planned}
    if planned:
        progress(f"exporting {', '.join(_row_name(*key) for key in planned)}")
        if _export(model_path, work_dir, export_formats, quantizations, options):
            for key in planned:
                directories[key] = os.path.join(work_dir, _row_name(*key).replace(" ", "_"))
                failures[key] = _export(
                    model_path, directories[key], [key[0]], [key[1] or "none"], options
                )
    runtimes = []
    for format, quantization in planned + [key for key in failures if key not in planned]:
        out_dir = directories.get((format, quantization), work_dir)
        name = _row_name(format, quantization)
        runtime = _artifact_runtime(format, name, out_dir, quantization, input_shape)
        if failures.get((format, quantization)):
            runtime.make_predict, runtime.note = None, failures[(format, quantization)]
        runtimes.append(runtime)
    return runtimes


def _row_name(format, quantization):
    if format == "tflite":
        return f"tflite {'float32' if quantization == 'none' else quantization}"
    return format


def _export(model_path, out_dir, formats, quantizations, options):
    """Exports without verification (the benchmark measures); returns why
    it failed, or `None`."""
    try:
        export.export_model(
            model_path,
            out_dir,
            formats=formats,
            quantization=quantizations or "none",
            representative_data=options["representative_data"],
            latency_runs=0,
        )
    except export.ExportError as error:
        return f"not exported: {error}"
    return None


def _artifact_runtime(format, name, out_dir, quantization, input_shape):
    if format == "saved_model":
        path = os.path.join(out_dir, export.SAVED_MODEL_DIRNAME)
        return _Runtime(
            name, _engine("TensorFlow", "tensorflow", "tensorflow-cpu"), path,
            _loaded_once(lambda: export.saved_model_predictor(path)),
        )  # fmt: skip
    if format == "onnx":
        path = os.path.join(out_dir, onnx_export.ONNX_FILENAME)
        return _Runtime(
            name, _engine("ONNX Runtime", "onnxruntime"), path,
            _loaded_once(lambda: onnx_export.predictor(path)),
            note=f"opset {onnx_export.ONNX_OPSET}",
        )  # fmt: skip
    path = os.path.join(out_dir, export.tflite_filename(quantization))

    def make_predict(batch_size):
        with open(path, "rb") as file:
            return export.tflite_predictor(file.read(), (batch_size, *input_shape[1:]))

    return _Runtime(name, _engine("LiteRT", "ai-edge-litert"), path, make_predict)


def _loaded_once(load):
    """`make_predict` of a runtime whose one predictor takes any batch."""
    loaded = []

    def make_predict(batch_size):
        if not loaded:
            loaded.append(load())
        return loaded[0]

    return make_predict


def _engine(name, *distributions):
    """`name` and the version of the first installed of `distributions`."""
    from importlib import metadata

    for distribution in distributions:
        try:
            return f"{name} {metadata.version(distribution)}"
        except metadata.PackageNotFoundError:
            pass
    return name


def _measure(runtime, inputs, labels, reference, latency_runs):
    """Returns the runtime's `RuntimeResult` and its per-sample outputs."""
    result = RuntimeResult(runtime.name, runtime.runtime, runtime.path, note=runtime.note)
    if runtime.path is not None and os.path.exists(runtime.path):
        result.size_bytes = export.path_size(runtime.path)
    if runtime.make_predict is None:
        return result, None
    predict = runtime.make_predict(1)
    if runtime.per_sample is not None:
        outputs = np.asarray(runtime.per_sample(inputs))
    else:
        outputs = export.per_sample(predict, inputs)
    sample = inputs[:1]
    seconds = _timing.time_calls(lambda: predict(sample), latency_runs, LATENCY_WARMUP)
    result.latency_p50_ms = 1000 * float(np.percentile(seconds, 50))
    result.latency_p90_ms = 1000 * float(np.percentile(seconds, 90))
    result.throughput = _throughput(runtime, inputs, latency_runs)
    if labels is not None:
        result.accuracy = float(np.mean(np.argmax(outputs, -1) == labels))
    if reference is not None:
        result.agreement = float(np.mean(np.argmax(outputs, -1) == np.argmax(reference, -1)))
        result.max_abs_diff = float(np.max(np.abs(outputs - reference)))
    return result, outputs


def _throughput(runtime, inputs, latency_runs):
    """Samples per second of one call on `THROUGHPUT_BATCH` samples, or
    `None` for an artifact with a static batch of 1 (a recurrent model's
    `.tflite`)."""
    batch = inputs[np.arange(THROUGHPUT_BATCH) % len(inputs)]
    try:
        predict = runtime.make_predict(THROUGHPUT_BATCH)
        predict(batch)
    except (RuntimeError, ValueError):
        return None
    repeats = max(5, latency_runs // 10)
    return THROUGHPUT_BATCH / _timing.median_seconds(lambda: predict(batch), repeats, 2)


# --------------------------------------------------------------------------
# Output


def table_lines(report):
    """The report as aligned text lines, with each latency as a ratio to
    Keras predict's (the anchor measured in the same run)."""
    anchor = report.result("keras predict").latency_p50_ms
    header = (
        "runtime", "engine", "size", "p50 ms", "p90 ms", "vs predict",
        f"samples/s @{THROUGHPUT_BATCH}", "accuracy", "agreement", "max diff", "note",
    )  # fmt: skip
    rows = [header]
    for r in report.results:
        ratio = None if r.latency_p50_ms is None else r.latency_p50_ms / anchor
        rows.append(
            (
                r.name,
                r.runtime,
                "-" if r.size_bytes is None else format_size(r.size_bytes),
                format_optional(r.latency_p50_ms, ".3f"),
                format_optional(r.latency_p90_ms, ".3f"),
                "-" if ratio is None else f"{ratio:.3f}x",
                format_optional(r.throughput, ".0f"),
                format_optional(r.accuracy, ".2%"),
                format_optional(r.agreement, ".2%"),
                format_optional(r.max_abs_diff, ".1e"),
                r.note or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def format_size(size_bytes):
    """`123 B`, `45.6 KiB` or `7.8 MiB`."""
    for unit in ("B", "KiB", "MiB"):
        if size_bytes < 1024 or unit == "MiB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024


def format_optional(value, pattern):
    """`value` formatted with `pattern`, or `-` when it was not measured."""
    return "-" if value is None else format(value, pattern)


def write_json(report, path):
    _files.atomic_write_text(path, report.to_json() + "\n")


def plot(report, path):
    """Saves bar charts of batch-1 latency (p50, with p90 marked) and of
    file size per runtime to `path` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [r for r in report.results if r.latency_p50_ms is not None]
    names = [r.name for r in measured]
    figure = Figure(figsize=(11, 0.45 * len(names) + 1.5), layout="constrained")
    FigureCanvasAgg(figure)
    latency, size = figure.subplots(1, 2, sharey=True)
    p50 = [r.latency_p50_ms for r in measured]
    latency.barh(names, p50, color="tab:blue", label="p50")
    latency.plot([r.latency_p90_ms for r in measured], names, "k|", markersize=12, label="p90")
    latency.set_xscale("log")
    latency.set_xlabel("batch-1 latency (ms, log scale)")
    latency.legend(loc="lower right")
    latency.invert_yaxis()
    size.barh(names, [(r.size_bytes or 0) / 1024 for r in measured], color="tab:orange")
    size.set_xlabel("size on disk (KiB)")
    figure.suptitle(f"{os.path.basename(report.model)} on {report.backend}")
    _files.save_figure_atomic(figure, path)
