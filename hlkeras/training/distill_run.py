"""`hlkeras distill`: a student trained by a frozen teacher into a new run
directory, its `.tflite` verified like any other (`distill_run`).

The teacher is a finished `hlkeras train` run (its recorded data, split seed
and tokenizer are the student's) or a `.keras` file (then the data is the
command's `--data`/`--dataset`, the embedded digits by default). The student
is built from the same settings as an `hlkeras train` run's (`--arch`,
`--width`, ...) and trained with the same recipe, through
`hlkeras.distill.Distiller`; `best.keras` and `model.keras` hold the student
alone. With `baseline=True` the same student, from the same initial weights,
is also trained from scratch with the same recipe, and its test accuracy is
recorded beside the distilled one's.

`metrics.json` holds what `hlkeras train` writes, and
`teacher_test_accuracy`, `teacher_params`, `tflite_bytes`, `temperature`,
`alpha`, `features` and (with the baseline) `scratch_test_accuracy`.
"""

import json
import operator
import os
import tempfile
import time
import warnings

from hlkeras import _files
from hlkeras._validation import HlkerasWarning
from hlkeras.data.settings import DATA_FILE_DEFAULTS
from hlkeras.training import runs
from hlkeras.training.runs import TRAIN_DEFAULTS
from hlkeras.training.runs import RunDir
from hlkeras.training.runs import RunError

FEATURES = ("none", "auto")
# The settings a teacher run fixes for its student: the same examples, the
# same split (its seed) and, for texts, the same tokenizer.
DATA_KEYS = ("dataset", "data", "data_dir", "seed", *DATA_FILE_DEFAULTS)
FILE_ROLES = {
    RunDir.MODEL: "the distilled student (weights of the best epoch)",
    "best.keras": "the student at its best epoch (by validation loss)",
    RunDir.SPEC: "the student's spec: hlkeras.models.build(spec) rebuilds it",
    RunDir.CONFIG: "the student's settings (the teacher run's data)",
}


def check_distillation(temperature, alpha, error=RunError):
    """Raises `error` in the flags' words for a `temperature` or `alpha` out
    of range."""
    from hlkeras import distill

    try:
        distill.check_temperature(temperature)
        distill.check_alpha(alpha)
    except ValueError as bad:
        raise error(str(bad).replace("Argument `", "--").replace("`", "")) from None


def load_teacher(path):
    """`(teacher, run)`: the model of the finished run directory or `.keras`
    file at `path`, and its `RunDir` (None for a file). Raises `RunError`."""
    from hlkeras import export

    run = runs.finished_run(path) if os.path.isdir(path) else None
    try:
        return export.load_keras_model(run.file(RunDir.MODEL) if run else path), run
    except export.ExportError as error:
        raise RunError(f"--teacher: {error}") from None


def student_settings(teacher_run, given):
    """The student's settings: `hlkeras train`'s defaults, the teacher run's
    data settings, then the flags given. Checked; raises `RunError`."""
    recorded = teacher_run.recorded_settings() if teacher_run else {}
    settings = {**TRAIN_DEFAULTS, **{k: recorded[k] for k in DATA_KEYS if k in recorded}}
    settings.update(given, distribute=None, mesh=None)
    runs.check_settings(settings)
    return settings


def check_pair(teacher, teacher_run, info):
    """Raises `RunError` when the teacher does not take the data's inputs or
    predicts other classes."""
    from hlkeras import distill

    expected = tuple(info.input_shape)
    if tuple(teacher.inputs[0].shape[1:]) != expected:
        raise RunError(
            f"--teacher takes inputs of shape {tuple(teacher.inputs[0].shape[1:])}; the data "
            f"({info.name}) gives {expected}: distil on the data the teacher was trained on"
        )
    classes = distill.logits_layer_output(teacher).shape[-1]
    if classes != info.num_classes:
        raise RunError(
            f"--teacher predicts {classes} classes; the data ({info.name}) has "
            f"{info.num_classes}: distillation needs the teacher's classes"
        )
    names_path = teacher_run and teacher_run.file(RunDir.CLASS_NAMES)
    if names_path and os.path.exists(names_path):
        with open(names_path) as file:
            names = json.load(file)
        if list(names) != list(info.class_names):
            raise RunError(
                f"--teacher's {RunDir.CLASS_NAMES} names the classes {names}; the data "
                f"({info.name}) has {list(info.class_names)}: distillation needs the same labels"
            )


def _fit(model, train_ds, val_ds, run_dir, settings, **kwargs):
    from hlkeras import training

    return training.compile_and_fit(
        model,
        train_ds,
        val_ds,
        run_dir=run_dir,
        epochs=settings["epochs"],
        learning_rate=settings["lr"],
        weight_decay=settings["weight_decay"],
        clipnorm=settings["clipnorm"],
        patience=settings["patience"],
        **kwargs,
    )


def distill_run(
    teacher_path,
    run_dir,
    given,
    *,
    temperature=4.0,
    alpha=0.5,
    features="none",
    baseline=False,
    log=print,
):
    """Trains a student of the teacher at `teacher_path` into `run_dir`.

    Args:
        teacher_path: A finished `hlkeras train` run directory or a `.keras`
            file.
        run_dir: The new run's `RunDir` (`RunDir.open`).
        given: The student's settings given as flags (`hlkeras train`'s keys).
        temperature, alpha: As in `hlkeras.distill.Distiller`.
        features: `"none"` (logits only) or `"auto"` (also the features the
            two heads read, through a projector).
        baseline: Also train the student from scratch, for comparison.
        log: Where the one-line progress messages go.

    Returns:
        A `runs.RunOutcome`; its `metrics` also hold the teacher's numbers.
    """
    import keras

    from hlkeras import data
    from hlkeras import distill
    from hlkeras import models
    from hlkeras import training

    started = time.perf_counter()
    check_distillation(temperature, alpha)
    if features not in FEATURES:
        raise RunError(f"--features must be one of {', '.join(FEATURES)}; got {features!r}")
    teacher, teacher_run = load_teacher(teacher_path)
    settings = student_settings(teacher_run, given)
    (train_ds, val_ds, test_ds), info = runs.load_data(settings, teacher_run)
    check_pair(teacher, teacher_run, info)
    spec = runs.model_spec(settings, info)
    student = models.build(spec)
    if student.count_params() > teacher.count_params():
        warnings.warn(
            f"the student has {student.count_params():,} parameters, more than its teacher's "
            f"{teacher.count_params():,}: distillation usually trains a smaller model",
            HlkerasWarning,
            stacklevel=2,
        )
    initial_weights = student.get_weights()
    distiller = distill.Distiller(
        teacher,
        student,
        temperature=temperature,
        alpha=alpha,
        features=None if features == "none" else distill.AUTO_FEATURES,
    )
    run_dir.prepare()
    run_dir.record(spec, settings, info)
    log(
        f"hlkeras distill: {spec['arch']} student ({student.count_params():,} params) of "
        f"{teacher_path} ({teacher.count_params():,} params) on {info.name} -> {run_dir.path}"
    )

    result = _fit(
        distiller,
        train_ds,
        val_ds,
        run_dir.path,
        settings,
        checkpoint_of=operator.attrgetter("student"),
    )
    if result.nan_epoch is not None:
        return runs.RunOutcome(run_dir, nan_message=training.nan_message(result))
    if result.best_path:
        student.load_weights(result.best_path)
    metrics = runs.evaluate_and_export(training.compile_model(student), settings, run_dir, test_ds)
    images, labels = data.to_numpy(test_ds)
    best_row = min(result.rows, key=lambda row: row.get("val_loss", row["loss"]))
    metrics.update(
        {
            "teacher_test_accuracy": _accuracy(teacher, images, labels),
            "teacher_params": int(teacher.count_params()),
            "params": int(student.count_params()),
            "tflite_bytes": runs.file_size(run_dir.file(RunDir.TFLITE)),
            "temperature": float(temperature),
            "alpha": float(alpha),
            "features": [list(pair) for pair in distiller.features],
            "epochs": len(result.rows),
            "best_epoch": int(best_row["epoch"]) + 1,
            "seconds": round(result.seconds, 2),
        }
    )
    if baseline:
        log("hlkeras distill: the same student from scratch (--baseline)")
        scratch = models.build(spec)
        scratch.set_weights(initial_weights)
        with tempfile.TemporaryDirectory(dir=run_dir.path) as scratch_dir:
            scratch_result = _fit(scratch, train_ds, val_ds, scratch_dir, settings)
            if scratch_result.best_path:
                scratch.load_weights(scratch_result.best_path)
        metrics["scratch_test_accuracy"] = _accuracy(scratch, images, labels)
    metrics.update(
        {
            "total_seconds": round(time.perf_counter() - started, 2),
            "backend": keras.backend.backend(),
            "dataset": info.name,
            "arch": spec["arch"],
            "distilled_from": os.path.abspath(teacher_path),
        }
    )
    _files.atomic_write_json(run_dir.file(RunDir.METRICS), metrics)
    return runs.RunOutcome(run_dir, metrics=metrics, refused=metrics["tflite_refused"])


def _accuracy(model, images, labels):
    import keras
    import numpy as np

    # One batch: a second predict function traced per model is all it costs.
    probabilities = model.predict(images, batch_size=len(images), verbose=0)
    probabilities = keras.ops.convert_to_numpy(probabilities)
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def comparison_table(metrics):
    """The printed teacher / distilled / from-scratch lines of a run's metrics."""

    rows = [
        ("", "test accuracy", "params", "model.tflite"),
        (
            "teacher",
            f"{metrics['teacher_test_accuracy']:.2%}",
            f"{metrics['teacher_params']:,}",
            "-",
        ),
        (
            "student, distilled",
            f"{metrics['test_accuracy']:.2%}",
            f"{metrics['params']:,}",
            runs.kilobytes(metrics["tflite_bytes"]),
        ),
    ]
    if "scratch_test_accuracy" in metrics:
        rows.append(
            (
                "student, from scratch",
                f"{metrics['scratch_test_accuracy']:.2%}",
                f"{metrics['params']:,}",
                "-",
            )
        )
    return runs.aligned_rows(rows)
