"""Distillation benchmark on digits and texts, against the teacher and the
same student trained from scratch in the same run.

Three parts:
- `accuracy` (TensorFlow backend, it exports): a teacher `hlkeras train`
  run (resnet, the digits' best), then for each seed `hlkeras distill
  --baseline` of a phone-sized student (resnet width 8, depth 1): the
  distilled and the from-scratch student (same initial weights, same recipe
  and epochs), means over the seeds, and the size of the student's verified
  int8 `.tflite`.
- `overhead` (any backend): a distillation training step against a student
  step plus a teacher forward pass (interleaved, median of per-round
  ratios); against `keras.distillation.Distiller` on the same pair; with
  `cache_teacher`'s cached logits against a plain student step.
- `text` (TensorFlow backend): a GRU student of the transformer text model
  on the keyword CSV of the text tests.

Usage:

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/distill.py --part accuracy
    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/distill.py --part overhead
"""

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from hlkeras import _timing  # noqa: E402
from hlkeras import distill  # noqa: E402
from hlkeras import models  # noqa: E402
from hlkeras import training  # noqa: E402
from hlkeras.training import distill_run  # noqa: E402
from hlkeras.training import runs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = {"arch": "resnet", "width": 8, "depth": 1}
TARGETS = {  # name: (bound, "<=" or ">=")
    "int8_student_kib": (30.0, "<="),
    "distilled_minus_scratch_points": (0.5, ">="),
    "teacher_minus_distilled_points": (1.5, "<="),
    "step_ratio_to_student_plus_teacher_forward": (1.1, "<="),
    "cached_step_ratio_to_student_step": (1.1, "<="),
    "text_teacher_minus_student_points": (1.0, "<="),
}


def report(name, value):
    line = f"{name} {value:.4f}"
    if name in TARGETS:
        bound, sense = TARGETS[name]
        met = value <= bound if sense == "<=" else value >= bound
        line += f" target {sense} {bound} {'MET' if met else 'NOT MET'}"
    print(line, flush=True)


def quiet(line):
    del line


def train_teacher(work_dir, flags):
    run_dir, _ = runs.RunDir.open(os.path.join(work_dir, "teacher"))
    settings = runs.settings_for(run_dir, False, flags)
    metrics = runs.train_run(settings, run_dir, log=quiet).metrics
    print(
        f"teacher {metrics['arch']}: test accuracy {metrics['test_accuracy']:.4f} after "
        f"{metrics['epochs']} epochs, {metrics['params']:,} params",
        flush=True,
    )
    return run_dir, metrics


def distil(teacher_dir, work_dir, name, given, **options):
    """`hlkeras distill --baseline` of the teacher run: its metrics."""
    run_dir, _ = runs.RunDir.open(os.path.join(work_dir, name))
    outcome = distill_run.distill_run(
        teacher_dir.path, run_dir, given, baseline=True, log=quiet, **options
    )
    return run_dir, outcome.metrics


def int8_kib(run_dir):
    """The size of a verified int8 export of the run's model, in KiB."""
    from benchmarks.prune import int8_bytes

    return int8_bytes(run_dir) / 1024


def measure_accuracy(teacher_epochs, epochs, seeds, work_dir):
    teacher_dir, teacher = train_teacher(work_dir, {"arch": "resnet", "epochs": teacher_epochs})
    distilled, scratch = [], []
    for seed in range(seeds):
        # The digits' split is TFDS', the same for every seed: the seed only
        # draws the student's initial weights and the batches.
        run_dir, metrics = distil(
            teacher_dir, work_dir, f"student_{seed}", {**STUDENT, "epochs": epochs, "seed": seed}
        )
        distilled.append(metrics["test_accuracy"])
        scratch.append(metrics["scratch_test_accuracy"])
        print(
            f"seed {seed}: distilled {metrics['test_accuracy']:.4f}, from scratch "
            f"{metrics['scratch_test_accuracy']:.4f}, {metrics['params']:,} params",
            flush=True,
        )
    report("teacher_test_accuracy", teacher["test_accuracy"])
    report("distilled_mean_test_accuracy", statistics.mean(distilled))
    report("scratch_mean_test_accuracy", statistics.mean(scratch))
    report("distilled_minus_scratch_points", 100 * statistics.mean(np.subtract(distilled, scratch)))
    report(
        "teacher_minus_distilled_points",
        100 * (teacher["test_accuracy"] - statistics.mean(distilled)),
    )
    report("int8_student_kib", int8_kib(run_dir))


def measure_overhead(repeats):
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype("float32")
    y = np.arange(64) % 10
    teacher = training.compile_model(models.resnet((8, 8, 1), 10))
    student = training.compile_model(models.resnet((8, 8, 1), 10, width=8, depth=1))
    ours = distill.Distiller(teacher, student)
    ours.compile(optimizer="adam")
    theirs = keras.distillation.Distiller(
        teacher,
        keras.models.clone_model(student),
        keras.distillation.LogitsDistillation(4.0, loss=keras.losses.KLDivergence()),
    )
    theirs.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    cached = {"labels": y, "teacher_logits": ours.teacher_logits(x)}
    steps = [
        lambda: ours.train_on_batch(x, y),
        lambda: theirs.train_on_batch(x, y),
        lambda: student.train_on_batch(x, y),
        lambda: teacher.predict_on_batch(x),
        lambda: ours.train_on_batch(x, cached),
    ]
    distil_step, keras_step, student_step, teacher_forward, cached_step = _timing.time_interleaved(
        steps, repeats, warmup=5
    )
    both = [s + t for s, t in zip(student_step, teacher_forward)]
    print(
        f"{keras.backend.backend()}: resnet teacher ({teacher.count_params():,} params), "
        f"resnet student ({student.count_params():,}), batch 64",
        flush=True,
    )
    report(
        "step_ratio_to_student_plus_teacher_forward", _timing.median_pair_ratio(distil_step, both)
    )
    report("step_ratio_to_keras_distiller", _timing.median_pair_ratio(distil_step, keras_step))
    report(
        "cached_step_ratio_to_student_step", _timing.median_pair_ratio(cached_step, student_step)
    )


def measure_text(epochs, work_dir):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from texts_testing import write_keyword_csv

    path = os.path.join(work_dir, "tickets.csv")
    write_keyword_csv(path, 900)
    teacher_dir, teacher = train_teacher(
        work_dir, {"data": path, "text_column": "text", "epochs": epochs}
    )
    _, metrics = distil(
        teacher_dir, work_dir, "gru", {"arch": "text", "encoder": "gru", "epochs": epochs}
    )
    report("text_teacher_test_accuracy", teacher["test_accuracy"])
    report("text_student_test_accuracy", metrics["test_accuracy"])
    report("text_scratch_test_accuracy", metrics["scratch_test_accuracy"])
    report(
        "text_teacher_minus_student_points",
        100 * (teacher["test_accuracy"] - metrics["test_accuracy"]),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("accuracy", "overhead", "text", "all"), default="all")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=30, help="the students' epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.part in ("overhead", "all"):
        measure_overhead(args.repeats)
    with tempfile.TemporaryDirectory() as work_dir:
        if args.part in ("accuracy", "all"):
            measure_accuracy(args.teacher_epochs, args.epochs, args.seeds, work_dir)
        if args.part in ("text", "all"):
            measure_text(min(args.epochs, 10), work_dir)


if __name__ == "__main__":
    main()
