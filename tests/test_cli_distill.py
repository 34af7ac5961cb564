"""`hlkeras distill`, end to end on one backend: a finished digits run
teaches a smaller student into a new run directory whose numbers are those
of the two models on the test split, whose `.tflite` passed the per-sample
gate, whose model is the plain student (no projector), with the baseline
from scratch beside it; a `.keras` teacher file; and the one-line errors."""

import json
import os

import keras
import numpy as np
import pytest

from hlkeras import cli
from hlkeras import data
from hlkeras import models

STUDENT = ["--arch", "mlp", "--depth", "1", "--width", "8", "--epochs", "2"]


def _cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished two-epoch resnet digits run, and its files' bytes."""
    root = tmp_path_factory.mktemp("teacher")
    run = root / "run"
    argv = ["train", "--data-dir", root / "tfds", "--out", run, "--epochs", "2", "--arch",
            "resnet", "--depth", "1", "--width", "8", "--no-augment"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    return run, {name: (run / name).read_bytes() for name in os.listdir(run)}


def _accuracy(model, images, labels):
    probabilities = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    return float(np.mean(np.argmax(probabilities, -1) == labels))


def _test_split(run):
    settings = json.loads((run / "train_config.json").read_text())
    _, _, test_ds, _ = data.load("digits", data_dir=settings["data_dir"])
    return data.to_numpy(test_ds)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_distill_writes_a_verified_student_run_beside_its_baseline(teacher_run, tmp_path, capsys):
    run, teacher_files = teacher_run
    out = tmp_path / "student"
    status, stdout, stderr = _cli(
        capsys, "distill", "--teacher", run, "--out", out, *STUDENT, "--features", "auto",
        "--temperature", "3", "--alpha", "0.3", "--baseline",
    )  # fmt: skip
    assert status == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    student = keras.saving.load_model(out / "model.keras")
    teacher = keras.saving.load_model(run / "model.keras")
    images, labels = _test_split(run)
    assert metrics["teacher_test_accuracy"] == pytest.approx(_accuracy(teacher, images, labels))
    assert metrics["test_accuracy"] == pytest.approx(_accuracy(student, images, labels))
    assert metrics["teacher_params"] == teacher.count_params()
    # The plain student the spec builds: the projector stayed in the distiller.
    spec = json.loads((out / "spec.json").read_text())
    assert spec["arch"] == "mlp" and spec["width"] == 8
    assert metrics["params"] == student.count_params() == models.build(spec).count_params()
    assert metrics["params"] < metrics["teacher_params"]
    # --features auto: the layers the heads read (the mlp's past its dropout).
    assert teacher.get_layer("head").input is teacher.get_layer("pool").output
    assert student.get_layer("head_dropout").input is student.get_layer("head_norm").output
    assert metrics["features"] == [["pool", "head_norm"]]
    assert metrics["temperature"] == 3.0 and metrics["alpha"] == 0.3 and metrics["epochs"] == 2
    # The published file passed the gate: its accuracy is Keras' at batch 1.
    assert metrics["tflite_bytes"] == (out / "model.tflite").stat().st_size
    assert metrics["tflite_accuracy"] == pytest.approx(metrics["keras_batch1_accuracy"])
    assert 0.0 <= metrics["scratch_test_accuracy"] <= 1.0
    lines = stdout.splitlines()
    for name, key in (("teacher", "teacher_test_accuracy"), ("student, distilled", "test_accuracy"),
                      ("student, from scratch", "scratch_test_accuracy")):  # fmt: skip
        (row,) = [line for line in lines if line.startswith(name + " ")]
        assert f"{metrics[key]:.2%}" in row
    assert json.loads((out / "class_names.json").read_text()) == json.loads(
        teacher_files["class_names.json"]
    )
    # The teacher's run is as it was.
    assert {n: (run / n).read_bytes() for n in os.listdir(run)} == teacher_files


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_a_teacher_file_smaller_than_its_student_is_a_warning_line(tmp_path, capsys):
    teacher = models.mlp((8, 8, 1), 10, depth=1, width=4)
    teacher.save(tmp_path / "teacher.keras")
    out = tmp_path / "student"
    status, _, stderr = _cli(
        capsys, "distill", "--teacher", tmp_path / "teacher.keras", "--data-dir",
        tmp_path / "tfds", "--out", out, "--arch", "mlp", "--depth", "1", "--width", "32",
        "--epochs", "1",
    )  # fmt: skip
    assert status == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("hlkeras distill: warn")]
    assert len(warnings) == 1, stderr
    student = keras.saving.load_model(out / "model.keras")
    assert f"the student has {student.count_params():,} parameters" in warnings[0]
    assert f"its teacher's {teacher.count_params():,}" in warnings[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher_params"] == teacher.count_params() < metrics["params"]


def _copy_run(run, folder):
    folder.mkdir()
    for name in os.listdir(run):
        (folder / name).write_bytes((run / name).read_bytes())
    return folder


def _assert_one_line(status, stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("hlkeras distill: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--temperature", "0"], ["--temperature must be a number > 0", "temperature=0.0"]),
        (["--alpha", "1.5"], ["--alpha must be a float in [0, 1]", "alpha=1.5"]),
        (["--features", "all"], ["--features must be one of none, auto", "'all'"]),
        (["--width", "0"], ["--width must be a positive integer, got 0"]),
    ],
    ids=["temperature", "alpha", "features", "width"],
)
def test_a_bad_flag_is_one_line_and_writes_nothing(teacher_run, flags, fragments, tmp_path, capsys):
    run, _ = teacher_run
    out = tmp_path / "o"
    status, _, stderr = _cli(capsys, "distill", "--teacher", run, "--out", out, *flags)
    _assert_one_line(status, stderr, *fragments)
    assert not out.exists()


@pytest.mark.backends("tensorflow")
def test_a_teacher_of_other_classes_or_labels_is_one_line(teacher_run, tmp_path, capsys):
    run, _ = teacher_run
    other_classes = _copy_run(run, tmp_path / "five")
    models.mlp((8, 8, 1), 5, depth=1, width=8).save(other_classes / "model.keras")
    status, _, stderr = _cli(
        capsys, "distill", "--teacher", other_classes, "--out", tmp_path / "o1", *STUDENT
    )
    _assert_one_line(status, stderr, "--teacher predicts 5 classes", "has 10")
    relabelled = _copy_run(run, tmp_path / "relabelled")
    names = [f"digit {i}" for i in range(10)]
    (relabelled / "class_names.json").write_text(json.dumps(names))
    status, _, stderr = _cli(
        capsys, "distill", "--teacher", relabelled, "--out", tmp_path / "o2", *STUDENT
    )
    _assert_one_line(status, stderr, "class_names.json names the classes", "'digit 0'")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.backends("tensorflow")
def test_a_teacher_that_does_not_load_is_one_line(tmp_path, capsys):
    broken = tmp_path / "teacher.keras"
    broken.write_bytes(b"not a zip archive")
    status, _, stderr = _cli(capsys, "distill", "--teacher", broken, "--out", tmp_path / "o")
    _assert_one_line(status, stderr, "--teacher:", "is not a Keras model file")
    status, _, stderr = _cli(
        capsys, "distill", "--teacher", tmp_path / "missing.keras", "--out", tmp_path / "o"
    )
    _assert_one_line(status, stderr, "missing.keras does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, stderr = _cli(capsys, "distill", "--teacher", empty, "--out", tmp_path / "o")
    _assert_one_line(status, stderr, "holds no finished hlkeras train run")
    assert not (tmp_path / "o").exists()
