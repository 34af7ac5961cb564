"""What an export wrote and measured (`ExportReport`, one `ArtifactReport`
per artifact), its errors, and the names of the files it writes."""

import dataclasses
import json

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
        quantization: The quantization of a `.tflite` (`"none"` for
            float32), `None` for the other formats.
        sparse_tensors: How many tensors of a `.tflite` are stored in the
            sparse encoding (a pruned model's, see
            `ExportReport.weight_sparsity`).
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
    quantization: str = None
    sparse_tensors: int = None


@dataclasses.dataclass
class ExportReport:
    """What `export_model` wrote and how its artifacts compare to Keras.

    Attributes:
        source: The `.keras` path, or `"<in-memory model>"`.
        backend: The Keras backend the reference model ran on.
        out_dir: Absolute output directory.
        quantization: The `.tflite` quantization mode, or the list of them
            when one export wrote several.
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
        auto: For `quantization="auto"`: `chosen` (the quantization
            published), `reason` (one sentence), `candidates` (each tried
            `.tflite`: its `quantization`, `file`, `latency_ms`,
            `size_bytes`, `accuracy`, `top1_agreement`, `max_abs_diff` and
            why it was `refused`, or `None`) and `skipped` (`{quantization:
            why it was not tried}`); `None` otherwise.
        weight_sparsity: The fraction of zeros over the model's kernels. From
            `SPARSE_ENCODING_MIN_SPARSITY` (0.3) on, the float32 and float16
            `.tflite` store them in the converter's sparse encoding; dynamic
            and int8 stay dense (their sparse kernels fail in LiteRT's
            default runtime).
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
    weight_sparsity: float = None
    auto: dict = None

    def artifact(self, format, quantization=None):
        """Returns the `ArtifactReport` of `format` (`"saved_model"`,
        `"tflite"`, `"onnx"`); of a `.tflite`, the one of `quantization`,
        which may be left out when the export wrote one `.tflite`."""
        quantization = "none" if quantization == "float32" else quantization
        found = [
            artifact
            for artifact in self.artifacts
            if artifact.format == format and quantization in (None, artifact.quantization)
        ]
        if len(found) > 1:
            raise KeyError(
                f"This export wrote {len(found)} {format!r} artifacts; name the "
                f"quantization, one of {[a.quantization for a in found]}."
            )
        if not found:
            what = f"{format!r}" + (f" ({quantization})" if quantization else "")
            raise KeyError(f"No {what} artifact in this export.")
        return found[0]

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["artifacts"] = [ArtifactReport(**a) for a in data["artifacts"]]
        return cls(**data)
