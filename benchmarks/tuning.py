"""Benchmark of hyperparameter search on digits.

1. Hyperband, Bayesian and Random search over the `tuning/digits_mlp.toml`
   space with one epoch budget: Hyperband runs one full iteration with
   `--max-epochs`; the budget is the epochs it trained, and Random and
   Bayesian get `budget / max_epochs` trials of up to `--max-epochs` epochs.
   Each line gives the best validation accuracy, trials, epochs and wall time,
   and the ratios to Random (the anchor, measured in the same process).
2. Distributed throughput: `hlkeras tune --workers 1` and `--workers 2` on
   identical trials (a fixed architecture, only `lr` varies); trials per
   minute over the span from the first trial's start to the last trial's end
   (from the trial files), so process start-up is not counted.

Targets: Hyperband reaches >= 0.98 validation accuracy within 15 minutes;
2 workers reach >= 1.5x the trials per minute of 1 worker.

3. `--budget`: Random, Bayesian and Hyperband over `tuning/digits_phone.toml`
   (mlp, resnet and vit) under a device budget (default 100 KiB int8 and
   1 ms), through `run_search` as `hlkeras tune` runs it: the best feasible
   validation accuracy, trials that fit, the wall time (search, retraining
   and the export of best.tflite), and the extra cost of measuring a trial
   (export + latency) as a fraction of its training time, side by side.

Run from the project root on the TensorFlow backend:

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/tuning.py

The defaults are a quick check (a few minutes). The targets are measured with

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/tuning.py \
        --max-epochs 9 --dist-trials 8 --dist-epochs 3

(about 19 minutes on the shared 2-core machine, 7.5 of them Hyperband).
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from hlkeras import data  # noqa: E402
from hlkeras import search  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE_FILE = os.path.join(REPO_ROOT, "tuning", "digits_mlp.toml")
# Identical trials for the throughput measurement: only `lr` varies.
FIXED_SPACE = """\
arch = "mlp"
depth = 2
width = 128
dropout = 0.1
batch_size = 64
lr = {min = 1e-3, max = 1e-2, log = true}
"""


def run_tuner(kind, x_train, y_train, x_val, y_val, *, max_trials, max_epochs, seed, root):
    hypermodel = search.SpecHyperModel(
        "mlp",
        x_train.shape[1:],
        10,
        search.load_space(SPACE_FILE),
        num_train=len(x_train),
        epochs=max_epochs,
    )
    directory = os.path.join(root, kind)
    tuner = search.make_tuner(
        kind,
        hypermodel,
        directory=directory,
        max_trials=max_trials,
        max_epochs=max_epochs,
        seed=seed,
    )
    start = time.perf_counter()
    search.run_trials(tuner, x_train, y_train, validation_data=(x_val, y_val), epochs=max_epochs)
    seconds = time.perf_counter() - start
    rows = search.trial_rows(tuner.oracle, tuner.project_dir)
    completed = search.ranked(rows)
    return {
        "best": completed[0]["score"] if completed else float("nan"),
        "trials": len(rows),
        "epochs": sum(row["epochs"] or 0 for row in rows),
        "seconds": seconds,
    }


def warm_up(x_train, y_train):
    """One tiny fit first, so the first tuner does not pay for the first trace."""
    import keras_tuner

    hypermodel = search.SpecHyperModel("mlp", x_train.shape[1:], 10, {"depth": 1, "width": 32})
    hp = keras_tuner.HyperParameters()
    hypermodel.fit(hp, hypermodel.build(hp), x_train[:256], y_train[:256], epochs=1, verbose=0)


def compare_tuners(args, root):
    train_ds, val_ds, _, _ = data.load("digits", seed=args.seed)
    x_train, y_train = data.to_numpy(train_ds)
    x_val, y_val = data.to_numpy(val_ds)
    warm_up(x_train, y_train)
    common = dict(max_epochs=args.max_epochs, seed=args.seed, root=root)
    results = {
        "hyperband": run_tuner(
            "hyperband",
            x_train,
            y_train,
            x_val,
            y_val,
            max_trials=args.hyperband_max_trials,
            **common,
        )
    }
    budget_trials = max(1, round(results["hyperband"]["epochs"] / args.max_epochs))
    for kind in ("random", "bayesian"):
        results[kind] = run_tuner(
            kind, x_train, y_train, x_val, y_val, max_trials=budget_trials, **common
        )
    anchor = results["random"]
    print(
        f"epoch budget: {results['hyperband']['epochs']} epochs "
        f"(Hyperband, max_epochs={args.max_epochs}); random/bayesian: {budget_trials} trials"
    )
    for kind in ("hyperband", "bayesian", "random"):
        r = results[kind]
        print(
            f"tuner={kind:<9} best_val_accuracy={r['best']:.4f} trials={r['trials']:>3} "
            f"epochs={r['epochs']:>4} wall={r['seconds']:7.1f}s "
            f"acc_vs_random={r['best'] - anchor['best']:+.4f} "
            f"wall_vs_random={r['seconds'] / anchor['seconds']:.2f}x"
        )
    hyperband = results["hyperband"]
    met = hyperband["best"] >= 0.98 and hyperband["seconds"] <= 15 * 60
    print(
        f"target hyperband >= 0.98 val_accuracy within 15 min: {'MET' if met else 'NOT MET'} "
        f"({hyperband['best']:.4f} in {hyperband['seconds'] / 60:.1f} min)"
    )


def search_span(directory):
    """Seconds from the first trial's start to the last trial's end."""
    project = os.path.join(directory, search.SEARCH_PROJECT)
    starts = [
        os.path.getmtime(p)
        for p in glob.glob(os.path.join(project, "trial_*", search.TRIAL_TUNER_FILE))
    ]
    ends = [os.path.getmtime(p) for p in glob.glob(os.path.join(project, "trial_*", "trial.json"))]
    return max(ends) - min(starts), len(ends)


def trials_per_minute(workers, args, root):
    space = os.path.join(root, "fixed.toml")
    with open(space, "w") as f:
        f.write(FIXED_SPACE)
    directory = os.path.join(root, f"workers{workers}")
    command = [
        sys.executable,
        "-m",
        "hlkeras.cli",
        "tune",
        "--tuner",
        "random",
        "--max-trials",
        str(args.dist_trials),
        "--max-epochs",
        str(args.dist_epochs),
        "--patience",
        str(args.dist_epochs),
        "--space",
        space,
        "--dir",
        directory,
        "--workers",
        str(workers),
        "--seed",
        str(args.seed),
    ]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": REPO_ROOT}
    subprocess.run(command, env=env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=3600)
    span, trials = search_span(directory)
    return trials, span, 60.0 * trials / span


def compare_workers(args, root):
    rates = {}
    for workers in (1, 2):
        trials, span, rates[workers] = trials_per_minute(workers, args, root)
        print(
            f"distributed workers={workers} trials={trials} span={span:.1f}s "
            f"trials_per_min={rates[workers]:.2f} vs_1_worker={rates[workers] / rates[1]:.2f}x"
        )
    ratio = rates[2] / rates[1]
    print(
        f"target 2 workers >= 1.5x trials/min of 1 worker: {'MET' if ratio >= 1.5 else 'NOT MET'} "
        f"({ratio:.2f}x; {os.cpu_count()} CPU cores on this machine)"
    )


PHONE_SPACE = os.path.join(REPO_ROOT, "tuning", "digits_phone.toml")


def budget_search(kind, args, root):
    """One `run_search` under the budget; its numbers for the table."""
    start = time.perf_counter()
    outcome = search.run_search(
        space=PHONE_SPACE,
        tuner=kind,
        max_trials=args.budget_trials,
        max_epochs=args.max_epochs,
        seed=args.seed,
        directory=os.path.join(root, f"budget-{kind}"),
        max_tflite_kb=args.max_tflite_kb,
        max_latency_ms=args.max_latency_ms,
        quantize=args.quantize,
        log=lambda line: None,
    )
    wall = time.perf_counter() - start
    measured = [row for row in outcome.rows if row.get("measure_seconds") is not None]
    fitting = [row for row in search.ranked(outcome.rows) if row.get("budget") == "fits"]
    best = fitting[0] if fitting else None
    return {
        "best": best["score"] if best else float("nan"),
        "best_arch": best.get("arch", "-") if best else "-",
        "best_kb": best["tflite_kb"] if best else float("nan"),
        "trials": len(outcome.rows),
        "fitting": len(fitting),
        "wall": wall,
        "measure_s": statistics.median(row["measure_seconds"] for row in measured),
        "measure_fraction": statistics.median(
            row["measure_seconds"] / row["seconds"] for row in measured
        ),
    }


def compare_tuners_under_budget(args, root):
    print(
        f"budget: {args.max_tflite_kb:g} KiB, {args.max_latency_ms:g} ms, {args.quantize}; "
        f"space {os.path.relpath(PHONE_SPACE, REPO_ROOT)}; max_trials={args.budget_trials} "
        f"max_epochs={args.max_epochs} ({keras.backend.backend()} backend)"
    )
    results = {
        kind: budget_search(kind, args, root) for kind in ("random", "bayesian", "hyperband")
    }
    anchor = results["random"]
    for kind, r in results.items():
        print(
            f"budget tuner={kind:<9} best_feasible_val_accuracy={r['best']:.4f} "
            f"(arch {r['best_arch']}, {r['best_kb']:.1f} KiB) fitting={r['fitting']}/{r['trials']} "
            f"wall={r['wall']:6.1f}s wall_vs_random={r['wall'] / anchor['wall']:.2f}x "
            f"measure_per_trial={r['measure_s']:.1f}s "
            f"measure_vs_training={r['measure_fraction']:.2f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--hyperband-max-trials", type=int, default=200)
    parser.add_argument("--dist-trials", type=int, default=6)
    parser.add_argument("--dist-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-tuners", action="store_true")
    parser.add_argument("--skip-distributed", action="store_true")
    parser.add_argument(
        "--budget", action="store_true", help="only the device-budget comparison (item 3)"
    )
    parser.add_argument("--budget-trials", type=int, default=8)
    parser.add_argument("--max-tflite-kb", type=float, default=100)
    parser.add_argument("--max-latency-ms", type=float, default=1.0)
    parser.add_argument("--quantize", default="int8")
    args = parser.parse_args()
    if keras.backend.backend() != "tensorflow":
        print(f"note: measured on the {keras.backend.backend()} backend")
    with tempfile.TemporaryDirectory() as root:
        if args.budget:
            compare_tuners_under_budget(args, root)
            return
        if not args.skip_tuners:
            compare_tuners(args, root)
        if not args.skip_distributed:
            compare_workers(args, root)


if __name__ == "__main__":
    main()
