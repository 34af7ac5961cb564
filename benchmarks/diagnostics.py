"""Benchmark of looking inside the hidden layers (issue 37).

Prints, each against its target:
- the cost of `hlkeras train --diagnose` (its default frequency) on the main
  job (its defaults, all 60 epochs): wall seconds of `hlkeras train` with
  and without it, each in a fresh subprocess, alternating, median of
  `--repeats`, per backend (target <= 1.05x);
- `hlkeras inspect` of the main job's run: seconds from the call to its
  end, imports excluded (target <= 10 s).

Usage:
    python benchmarks/diagnostics.py [--backends tensorflow,jax,torch] [--repeats 1]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERHEAD_TARGET = 1.05
INSPECT_TARGET_SECONDS = 10.0

# Imports first, then `hlkeras inspect` timed alone.
INSPECT_TIMED = """
import sys, time
import keras, tensorflow
from hlkeras import cli, diagnostics
start = time.perf_counter()
status = cli.main(["inspect", sys.argv[1]])
print(f"INSPECT_SECONDS {time.perf_counter() - start:.3f} status={status}")
"""


def _env(backend):
    return {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _prepare(data_dir):
    """The digits written into `data_dir` before any timed run."""
    command = [
        sys.executable,
        "-c",
        f"from hlkeras import data; data.prepare('digits', {data_dir!r})",
    ]
    subprocess.run(command, env=_env("tensorflow"), check=True, capture_output=True)


def _epochs(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)["epochs"]


def _train_seconds(backend, data_dir, out, flags):
    command = [sys.executable, "-m", "hlkeras.cli", "train", "--data-dir", data_dir]
    command += ["--out", out, "--overwrite", *flags]
    start = time.perf_counter()
    result = subprocess.run(command, env=_env(backend), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"hlkeras train {flags} failed on {backend}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def report_overhead(backend, data_dir, repeats):
    root = tempfile.mkdtemp(prefix=f"bench-diagnose-{backend}-")
    runs = {"plain": os.path.join(root, "plain"), "diagnose": os.path.join(root, "diagnose")}
    seconds = {"plain": [], "diagnose": []}
    for _ in range(repeats):
        # --patience 60: both train all 60 epochs (early stopping would end
        # them at different epochs: training is not bitwise reproducible on
        # this machine from one process to the next, with or without it).
        for mode, flags in (("plain", []), ("diagnose", ["--diagnose"])):
            flags = ["--patience", "60", *flags]
            seconds[mode].append(_train_seconds(backend, data_dir, runs[mode], flags))
    plain, diagnose = (statistics.median(seconds[m]) for m in ("plain", "diagnose"))
    ratio = diagnose / plain
    verdict = "MET" if ratio <= OVERHEAD_TARGET else "NOT MET"
    # The monitor leaves training alone: both runs train the same epochs.
    epochs = {mode: _epochs(run) for mode, run in runs.items()}
    print(
        f"diagnose_overhead [{backend}] main job ({epochs['plain']} and {epochs['diagnose']} "
        f"epochs): train {plain:.1f}s, train --diagnose {diagnose:.1f}s, ratio {ratio:.4f} "
        f"target <= {OVERHEAD_TARGET} {verdict}",
        flush=True,
    )
    return runs["plain"]


def report_inspect(backend, run):
    result = subprocess.run(
        [sys.executable, "-c", INSPECT_TIMED, run],
        env=_env(backend),
        capture_output=True,
        text=True,
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("INSPECT_SECONDS")]
    if result.returncode != 0 or not line:
        raise SystemExit(f"hlkeras inspect failed on {backend}:\n{result.stderr[-3000:]}")
    seconds = float(line[0].split()[1])
    verdict = "MET" if seconds <= INSPECT_TARGET_SECONDS else "NOT MET"
    print(
        f"inspect_seconds [{backend}] main-job run, imports excluded: {seconds:.2f} "
        f"target <= {INSPECT_TARGET_SECONDS:.0f} {verdict}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", help="TFDS data directory (default: a temporary one)")
    args = parser.parse_args()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench-tfds-")
    _prepare(data_dir)
    for backend in args.backends.split(","):
        run = report_overhead(backend, data_dir, args.repeats)
        report_inspect(backend, run)


if __name__ == "__main__":
    main()
