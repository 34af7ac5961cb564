"""Pruning benchmark on digits, against the dense model in the same run.

Two parts:
- `overhead` (any backend): what the `Pruning` callback adds to a training
  step: the median epoch of a `fit` (its first, compiling epoch left out)
  with the callback (masks recomputed every step, `frequency=1`, and every
  100 steps) against the same fit without it, in alternating order, median
  of the per-round ratios.
- `accuracy` (TensorFlow backend, it exports): a dense `hlkeras train` run,
  then `hlkeras prune` of it to 50/80/90% and 2:4, each fine-tuned
  `--epochs` epochs: test accuracy against the dense run's, and the verified
  `.tflite` (sparse-encoded float32) and an int8 export of the 80% model
  against the dense float32 file.
- `structured` (TensorFlow backend): `prune.structured` at 25% and 50% of
  every block's units (hidden units, heads, experts, channels), fine-tuned
  `--epochs` epochs: accuracy, parameters, LiteRT batch-1 latency and a
  Keras training step against the dense model (also the end of `accuracy`).

Usage:

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/prune.py [--arch mlp]
    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/prune.py --part structured \
        --arch vit --num-experts 4
    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/prune.py --part overhead
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from hlkeras import _timing  # noqa: E402
from hlkeras import export  # noqa: E402
from hlkeras import models  # noqa: E402
from hlkeras import prune  # noqa: E402
from hlkeras import training  # noqa: E402
from hlkeras.export import runtimes  # noqa: E402
from hlkeras.training import prune_run  # noqa: E402
from hlkeras.training import runs  # noqa: E402

TARGETS = {
    "overhead_ratio_frequency_1": 1.10,
    "overhead_ratio_frequency_1_whole_fit": 1.10,
    "sparsity_80_accuracy_drop_points": 1.0,
    "sparsity_80_tflite_ratio": 0.40,
    "sparsity_80_int8_tflite_ratio": 0.15,
    "structured_50_accuracy_drop_points": 1.0,
    "structured_50_params_ratio": 0.35,
    "structured_50_litert_latency_ratio": 0.6,
    "structured_50_train_step_ratio": 0.6,
}


def report(name, value, unit=""):
    target = TARGETS.get(name)
    line = f"{name} {value:.4f}{unit}"
    if target is not None:
        line += f" target <= {target} {'MET' if value <= target else 'NOT MET'}"
    print(line, flush=True)


def digits():
    """The digits training split as NumPy arrays."""
    from hlkeras import data

    train_ds, _, _, _ = data.load("digits")
    return data.to_numpy(train_ds)


class EpochSeconds(keras.callbacks.Callback):
    """Wall seconds of every epoch, read after its loss is on the host (on
    JAX the steps are dispatched asynchronously)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        float(logs["loss"])
        self.seconds.append(time.perf_counter() - self.start)


def steady_epoch_seconds(arch, x, y, pruning, epochs):
    """The median epoch of one `fit` of a new model, the first epoch
    (tracing and compiling) left out: what a training step costs."""
    spec = {"arch": arch, "input_shape": x.shape[1:], "num_classes": 10}
    model = training.compile_model(models.build(spec))
    timer = EpochSeconds()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=pruning + [timer])
    return statistics.median(timer.seconds[1:])


def measure_overhead(arch, repeats, epochs=6):
    x, y = digits()
    variants = {
        "plain": lambda: [],
        "frequency_1": lambda: [prune.Pruning(0.8, frequency=1, end_step=10**6)],
        "frequency_100": lambda: [prune.Pruning(0.8, frequency=100, end_step=10**6)],
        # The schedule over this fit's steps: the most weights pruned per
        # update, so the largest top-k in the step.
        "frequency_1_whole_fit": lambda: [prune.Pruning(0.8, frequency=1)],
    }
    # Each round fits every variant once, in alternating order, so a change
    # of the machine's load hits them alike.
    medians = {name: [] for name in variants}
    for round_index in range(repeats):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            medians[name].append(steady_epoch_seconds(arch, x, y, variants[name](), epochs))
    steps = len(x) // 64 + 1
    print(f"{keras.backend.backend()} {arch}: epochs of {steps} steps, {epochs - 1} timed per fit")
    for name in ("frequency_1", "frequency_1_whole_fit", "frequency_100"):
        report(f"overhead_ratio_{name}", _timing.median_pair_ratio(medians[name], medians["plain"]))


def train_dense(arch, num_experts, dense_epochs, work_dir):
    """The dense `hlkeras train` run every pruned model is measured against."""
    dense_dir, _ = runs.RunDir.open(os.path.join(work_dir, "dense"))
    flags = {"arch": arch, "epochs": dense_epochs, "experts": num_experts or None}
    settings = runs.settings_for(dense_dir, False, flags)
    dense = runs.train_run(settings, dense_dir, log=lambda line: None).metrics
    experts = f" with {num_experts} experts" if num_experts else ""
    print(
        f"dense {arch}{experts}: test accuracy {dense['test_accuracy']:.4f} after "
        f"{dense_epochs} epochs, {dense['params']:,} params"
    )
    return dense_dir, dense


def measure_accuracy(dense_dir, dense, epochs, work_dir):
    dense_bytes = os.path.getsize(dense_dir.file(runs.RunDir.TFLITE))
    for name, target in (
        ("sparsity_50", {"sparsity": 0.5}),
        ("sparsity_80", {"sparsity": 0.8}),
        ("sparsity_80_global", {"sparsity": 0.8, "scope": "global"}),
        ("sparsity_90", {"sparsity": 0.9}),
        ("pattern_2of4", {"pattern": "2:4"}),
    ):
        run_dir, _ = runs.RunDir.open(os.path.join(work_dir, name))
        metrics = prune_run.prune_run(
            dense_dir.path, run_dir, epochs=epochs, log=lambda line: None, **target
        ).metrics
        drop = 100 * (dense["test_accuracy"] - metrics["test_accuracy"])
        report(f"{name}_accuracy_drop_points", drop)
        report(f"{name}_tflite_ratio", metrics["tflite_bytes"] / dense_bytes)
        if name == "sparsity_80":
            report(name + "_int8_tflite_ratio", int8_bytes(run_dir) / dense_bytes)


def measure_structured(dense_dir, dense_accuracy, epochs, repeats=30):
    """`prune.structured` at 25% and 50% of every block's hidden units,
    fine-tuned `epochs` epochs: accuracy, parameters, LiteRT batch-1
    latency and a Keras training step against the dense model."""
    from hlkeras import data

    settings = dense_dir.recorded_settings()
    (train_ds, val_ds, test_ds), _ = runs.load_data(settings)
    images, labels = data.to_numpy(test_ds)
    batch = next(iter(train_ds))
    dense = keras.saving.load_model(dense_dir.file(runs.RunDir.MODEL))
    dense_tflite = export.model_to_tflite(dense)
    for ratio in (0.25, 0.5):
        name = f"structured_{round(100 * ratio)}"
        smaller = training.compile_model(
            prune.structured(dense, ratio), learning_rate=settings["lr"]
        )
        smaller.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0)
        predicted = keras.ops.convert_to_numpy(smaller.predict(images, verbose=0)).argmax(-1)
        report(
            f"{name}_accuracy_drop_points", 100 * (dense_accuracy - (predicted == labels).mean())
        )
        report(f"{name}_params_ratio", smaller.count_params() / dense.count_params())
        tflite = export.model_to_tflite(smaller)
        predictors = [
            runtimes.tflite_predictor(f, (1, *images.shape[1:])) for f in (tflite, dense_tflite)
        ]
        ours, anchor = _timing.time_interleaved(
            [lambda p=p: p(images[:1]) for p in predictors], repeats, 5
        )
        report(f"{name}_litert_latency_ratio", _timing.median_pair_ratio(ours, anchor))
        steps = [lambda m=m: m.train_on_batch(*batch) for m in (smaller, dense)]
        ours, anchor = _timing.time_interleaved(steps, repeats, 3)
        report(f"{name}_train_step_ratio", _timing.median_pair_ratio(ours, anchor))


def int8_bytes(run_dir):
    """The size of a verified int8 export of the run's model."""
    from hlkeras import data

    calibration = digits()[0][:200]
    _, _, test_ds, _ = data.load("digits")
    result = export.export_model(
        run_dir.file(runs.RunDir.MODEL),
        os.path.join(run_dir.path, "int8"),
        formats=("tflite",),
        quantization="int8",
        representative_data=calibration,
        verify_data=data.to_numpy(test_ds),
        latency_runs=0,
    )
    return result.artifact("tflite").size_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp")
    parser.add_argument(
        "--part", choices=("overhead", "accuracy", "structured", "all"), default="all"
    )
    parser.add_argument("--num-experts", type=int, default=0, help="vit: MoE experts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    if args.part in ("overhead", "all"):
        measure_overhead(args.arch, args.repeats)
    if args.part == "overhead":
        return
    with tempfile.TemporaryDirectory() as work_dir:
        dense_dir, dense = train_dense(args.arch, args.num_experts, args.dense_epochs, work_dir)
        if args.part in ("accuracy", "all"):
            measure_accuracy(dense_dir, dense, args.epochs, work_dir)
        measure_structured(dense_dir, dense["test_accuracy"], args.epochs)


if __name__ == "__main__":
    main()
