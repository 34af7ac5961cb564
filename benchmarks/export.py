"""Export benchmark on digits for every built-in architecture (mlp, resnet,
vit, vit with MoE FFNs, as `hlkeras.models` builds them with their defaults):
int8 size and accuracy against float32/Keras, dynamic-range next to them,
LiteRT batch-1 latency against Keras, and the wall time of one export of
every mode against one export per mode (the anchor, in the same run).

Accuracy and parity are measured per sample at batch 1, as `export_model`
verifies (the gate is opened here, `max_accuracy_drop=100`, so a failing
mode is measured and reported rather than refused). Every number is a ratio
to its anchor measured in this same run (the Keras model, the float32
file), so a busy machine shifts both sides alike.

`--profile` instead times every operator of the float32, dynamic and int8
`.tflite` of each architecture, and of the text transformer, at batch 1
(`hlkeras.export.profile`): where the time goes by op type, and how many
QUANTIZE/DEQUANTIZE ops each file has. The models are untrained (timing
does not depend on the weights; int8 is calibrated on digits or token ids).

Usage (TensorFlow backend, a few minutes):

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/export.py [--arch vit_moe] [--profile]
"""

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import hlkeras  # noqa: E402
from hlkeras import export  # noqa: E402
from hlkeras import models  # noqa: E402
from hlkeras.export import convert  # noqa: E402
from hlkeras.export import profile  # noqa: E402
from hlkeras.export import runtimes  # noqa: E402

TARGETS = {
    "int8_size_ratio": 0.30,
    "int8_latency_ratio": 0.8,
    "int8_accuracy_drop_points": 1.0,
    "litert_latency_ratio": 0.25,
    "export_seconds": 60.0,
}
# The architectures `hlkeras train --arch` trains, with their defaults.
SPECS = {
    "mlp": {"arch": "mlp"},
    "resnet": {"arch": "resnet"},
    "vit": {"arch": "vit", "num_experts": 0},
    "vit_moe": {"arch": "vit", "num_experts": 4},
}


def load_digits(seed=0, train_count=1400):
    """The embedded digits as `(x_train, y_train, x_test, y_test)`, in [0, 1]."""
    path = os.path.join(os.path.dirname(hlkeras.__file__), "datasets", "digits.npz")
    with np.load(path) as data:
        images = data["images"].astype("float32")[..., None] / 16.0
        labels = data["labels"].astype("int32")
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order]
    return (
        images[:train_count],
        labels[:train_count],
        images[train_count:],
        labels[train_count:],
    )


def train(name, x_train, y_train, epochs):
    spec = {**SPECS[name], "input_shape": (8, 8, 1), "num_classes": 10}
    model = models.build(spec)
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def line(name, value, target=None, unit=""):
    if target is None:
        print(f"{name:<28} {value:10.4g}{unit}")
        return
    verdict = "MET" if value <= target else "NOT MET"
    print(f"{name:<28} {value:10.4g}{unit}   target <= {target}   {verdict}")


MODES = ("none", "dynamic", "int8")


def export_all_modes(model, x_train, x_test, y_test, latency_runs, tmp):
    """One `ExportReport` of float32 (with the SavedModel), dynamic and int8
    from one export, its wall time, and the wall time of the anchor in the
    same run: one export per mode, as `hlkeras export` did before (one
    SavedModel and one Keras reference each)."""
    options = dict(
        representative_data=x_train[:200],
        verify_data=(x_test, y_test),
        latency_runs=latency_runs,
        max_accuracy_drop=100.0,
    )
    start = time.perf_counter()
    report = export.export_model(
        model, os.path.join(tmp, "all"), formats=("saved_model", "tflite"), quantization=MODES,
        **options,
    )  # fmt: skip
    one_export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for quantization in MODES:
        export.export_model(
            model,
            os.path.join(tmp, quantization),
            formats=("saved_model", "tflite") if quantization == "none" else ("tflite",),
            quantization=quantization,
            **options,
        )
    return report, one_export_seconds, time.perf_counter() - start


def benchmark(name, data, epochs, latency_runs):
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(0)
    model = train(name, x_train, y_train, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        float32, export_seconds, separate_seconds = export_all_modes(
            model, x_train, x_test, y_test, latency_runs, tmp
        )
        flatbuffers = {
            mode: pathlib.Path(float32.artifact("tflite", mode).path).read_bytes()
            for mode in ("none", "int8")
        }
    interleaved = runtimes.interleaved_latency_ms(flatbuffers, x_test[:1], repeats=100, rounds=7)
    files = {mode: float32.artifact("tflite", mode) for mode in MODES}
    f32, dyn, i8 = files["none"], files["dynamic"], files["int8"]
    print(
        f"\n== {name}  ({model.count_params()} params, {len(x_test)} test images, "
        f"per sample at batch 1)"
    )
    print(
        f"accuracy: keras {float32.keras_accuracy:.4f}  float32 {f32.accuracy:.4f}  "
        f"dynamic {dyn.accuracy:.4f}  int8 {i8.accuracy:.4f}  "
        f"(int8 top-1 agreement {i8.top1_agreement:.2%})"
    )
    print(f"keras batch-dependence max|diff| {float32.keras_batch_max_abs_diff:.2e}")
    print(
        f"sizes: float32 {f32.size_bytes} B  dynamic {dyn.size_bytes} B  "
        f"int8 {i8.size_bytes} B  saved_model {float32.artifact('saved_model').size_bytes} B"
    )
    print(
        f"batch-1 median latency: keras {float32.keras_latency_ms:.3f} ms  "
        f"litert float32 {f32.latency_ms:.3f} ms  dynamic {dyn.latency_ms:.3f} ms  "
        f"int8 {i8.latency_ms:.3f} ms"
    )
    line("float32_max_abs_diff", f32.max_abs_diff)
    print(
        f"interleaved batch-1 median latency: float32 {interleaved['none']:.4f} ms  "
        f"int8 {interleaved['int8']:.4f} ms"
    )
    line(
        "int8_latency_ratio",
        interleaved["int8"] / interleaved["none"],
        TARGETS["int8_latency_ratio"],
    )
    line("int8_size_ratio", i8.size_bytes / f32.size_bytes, TARGETS["int8_size_ratio"])
    line("dynamic_size_ratio", dyn.size_bytes / f32.size_bytes)
    line(
        "int8_accuracy_drop_points",
        100.0 * (float32.keras_accuracy - i8.accuracy),
        TARGETS["int8_accuracy_drop_points"],
    )
    line("dynamic_accuracy_drop_points", 100.0 * (float32.keras_accuracy - dyn.accuracy))
    line(
        "litert_latency_ratio",
        f32.latency_ms / float32.keras_latency_ms,
        TARGETS["litert_latency_ratio"],
    )
    line("litert_int8_latency_ratio", i8.latency_ms / float32.keras_latency_ms)
    line("export_seconds", export_seconds, TARGETS["export_seconds"], unit=" s")
    line("separate_exports_seconds", separate_seconds, unit=" s")
    line("one_export_ratio", export_seconds / separate_seconds)


# The text transformer of `hlkeras train --arch text`, on 32-token inputs.
TEXT_SPEC = {"arch": "text", "input_shape": (32,), "num_classes": 4, "vocabulary_size": 2000}
PROFILE_MODES = ("none", "dynamic", "int8")
TOP_OPS = 8


def profile_inputs(name, data):
    """Calibration examples and the profiled sample of an architecture."""
    if name == "text":
        tokens = np.random.default_rng(0).integers(1, 2000, size=(200, 32)).astype("int32")
        return tokens, tokens[:1]
    x_train, _, x_test, _ = data
    return x_train[:200], x_test[:1]


def profile_arch(name, data):
    """Where each quantization's batch-1 time goes, by op type."""
    keras.utils.set_random_seed(0)
    if name == "text":
        model = models.build(TEXT_SPEC)
    else:
        model = models.build({**SPECS[name], "input_shape": (8, 8, 1), "num_classes": 10})
    calibration, sample = profile_inputs(name, data)
    print(f"\n== {name}  ({model.count_params()} params; per-op time at batch 1, 1 thread)")
    for mode in PROFILE_MODES:
        tflite = convert.model_to_tflite(
            model, mode, representative_data=calibration, input_dtype=str(calibration.dtype)
        )
        whole_us, times = profile.op_profile(tflite, sample)
        totals = profile.summary(times)
        conversions = sum(totals.get(op, (0, 0))[0] for op in ("QUANTIZE", "DEQUANTIZE"))
        parts_us = sum(op.microseconds for op in times)
        print(
            f"{mode:<8} whole {whole_us:8.1f} us  sum of ops {parts_us:8.1f} us  "
            f"{len(times)} ops, {conversions} QUANTIZE/DEQUANTIZE, {len(tflite)} B"
        )
        for op_name, (count, total_us) in list(totals.items())[:TOP_OPS]:
            share = total_us / parts_us if parts_us else 0.0
            print(f"    {op_name:<22} {count:4d} ops {total_us:8.1f} us {share:6.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(SPECS) + ["text"], help="default: all")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="per-op time of each file")
    args = parser.parse_args()
    print(f"benchmarks/export.py  backend={keras.backend.backend()}")
    data = load_digits()
    if args.profile:
        for name in [args.arch] if args.arch else [*SPECS, "text"]:
            profile_arch(name, data)
        return
    if args.arch == "text":
        parser.error("--arch text is profiled only (--profile): digits are images")
    for name in [args.arch] if args.arch else list(SPECS):
        benchmark(name, data, args.epochs, args.latency_runs)


if __name__ == "__main__":
    main()
