"""Tests of `hlkeras tune`: one-line errors for bad input, resume after a
SIGKILL in the middle of a trial, and a chief + 2 workers search over
KerasTuner's gRPC mode. The subprocess tests exercise backend-independent
process behaviour and run on the tensorflow backend only."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
from digits_testing import digits_mlp_search_config

from hlkeras import cli
from hlkeras import search

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPACE = """\
arch = "mlp"
depth = 1
width = {values = [8, 16]}
dropout = 0.0
batch_size = 256
lr = [1e-3, 1e-2]
"""


@pytest.fixture
def tiny_space(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SPACE)
    return str(path)


def _tune_argv(tmp_path, space, directory, *extra):
    return [
        "tune",
        "--tuner",
        "random",
        "--max-epochs",
        "1",
        "--space",
        space,
        "--dir",
        str(directory),
        "--data-dir",
        str(tmp_path / "tfds"),
        "--seed",
        "3",
        *extra,
    ]


def _one_line_error(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hlkeras tune: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-trials", "0"], "--max-trials must be a positive integer, got 0"),
        (["--tuner", "grid"], "--tuner must be one of random, bayesian, hyperband, got 'grid'"),
        (["--max-epochs", "-1"], "--max-epochs must be a positive integer, got -1"),
        (["--workers", "-2"], "--workers must be >= 0, got -2"),
        (["--objective", "auc"], "--objective must be one of val_accuracy, val_loss"),
        (
            ["--arch", "transformer"],
            "--arch must be one of mlp, resnet, text, vit, got 'transformer'",
        ),
        (["--max-tflite-kb", "0"], "--max-tflite-kb must be a number > 0, got 0.0"),
        (["--max-latency-ms", "-2"], "--max-latency-ms must be a number > 0, got -2.0"),
        (["--quantize", "int4"], "--quantize must be one of none, float16, dynamic, int8"),
        (
            ["--max-latency-ms", "1", "--objective", "loss"],
            "a device budget needs an accuracy objective, got --objective loss",
        ),
        (["--teacher", "t.keras", "--alpha", "2"], "--alpha must be a float in [0, 1]"),
        (["--teacher", "t.keras", "--temperature", "0"], "--temperature must be a number > 0"),
        (["--teacher", "missing.keras"], "--teacher: Model file missing.keras does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert message in _one_line_error(["tune", *argv], capsys)


@pytest.mark.parametrize("flag", ["--max-tflite-kb", "--max-latency-ms", "--max-trials"])
def test_a_flag_value_that_does_not_parse_is_a_one_line_error(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", flag, "small"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"hlkeras tune: error: argument {flag}: invalid") and "'small'" in err
    assert err.count("\n") == 1, err


def test_a_malformed_space_file_is_a_one_line_error_naming_the_key(tmp_path, capsys):
    path = tmp_path / "space.toml"
    path.write_text('arch = "mlp"\ndepth = [4, 2]\n')
    err = _one_line_error(["tune", "--space", str(path)], capsys)
    assert "space['depth']" in err and "min=4, max=2" in err
    path.write_text('arch = "mlp"\n')
    err = _one_line_error(["tune", "--space", str(path), "--arch", "resnet"], capsys)
    assert "--arch resnet contradicts arch = 'mlp'" in err


def test_a_dir_holding_a_different_search_refuses_to_resume(tmp_path, tiny_space, capsys):
    directory = tmp_path / "search"
    recorded = digits_mlp_search_config(max_epochs=1)
    search.check_search_dir(str(directory), recorded)
    err = _one_line_error(_tune_argv(tmp_path, tiny_space, directory, "--max-trials", "1"), capsys)
    assert "holds a different search, so it cannot resume" in err
    assert "the space differs in ['batch_size', 'depth', 'dropout', 'lr', 'width']" in err


def _always_three(path):
    """A `.keras` teacher whose output is class 3 for every input (p=0.997)."""
    import keras

    inputs = keras.Input((8, 8, 1))
    bias = keras.initializers.Constant([8.0 if c == 3 else 0.0 for c in range(10)])
    head = keras.layers.Dense(10, kernel_initializer="zeros", bias_initializer=bias, name="head")
    probabilities = keras.layers.Activation("softmax", name="probabilities")
    keras.Model(inputs, probabilities(head(keras.layers.Flatten()(inputs)))).save(path)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_a_search_with_a_teacher_trains_students_that_follow_it(tmp_path, capsys):
    """With alpha=0 the labels do not count: every trial's student, and the
    retrained best, learn the teacher's answer (always 3), not the digits."""
    import keras
    import numpy as np

    from hlkeras import data

    _always_three(tmp_path / "teacher.keras")
    space = tmp_path / "space.toml"
    small_batches = TINY_SPACE.replace("batch_size = 256", "batch_size = 32")
    space.write_text(small_batches.replace("lr = [1e-3, 1e-2]", "lr = 1e-2"))
    directory = tmp_path / "search"
    argv = _tune_argv(tmp_path, str(space), directory, "--max-trials", "2", "--max-epochs", "3",
                      "--teacher", tmp_path / "teacher.keras", "--alpha", "0")  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    _, val_ds, test_ds, _ = data.load("digits", data_dir=str(tmp_path / "tfds"))
    val_labels, test_labels = data.to_numpy(val_ds)[1], data.to_numpy(test_ds)
    rows = list(csv.DictReader(open(directory / "trials.csv")))
    assert len(rows) == 2
    for row in rows:  # the share of 3s in the validation split, as the teacher scores
        assert float(row["score"]) == pytest.approx(np.mean(val_labels == 3), abs=1e-6)
    best = keras.saving.load_model(directory / "best.keras")  # the plain student
    predicted = np.argmax(best.predict(test_labels[0], verbose=0), axis=-1)
    assert np.all(predicted == 3)
    recorded = json.loads((directory / "search_config.json").read_text())
    assert recorded["distillation"] == {
        "teacher": str(tmp_path / "teacher.keras"), "temperature": 4.0, "alpha": 0.0
    }  # fmt: skip


# --- Subprocesses ---------------------------------------------------------------------


def _subprocess_env():
    return {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": REPO_ROOT,
    }


def _read_trial(directory, trial_id):
    with open(directory / "search" / f"trial_{trial_id}" / "trial.json") as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_sigkill_mid_trial_then_the_rerun_continues_without_losing_or_rerunning(
    tmp_path, tiny_space
):
    directory = tmp_path / "search"
    argv = _tune_argv(tmp_path, tiny_space, directory, "--max-trials", "2")
    command = [sys.executable, "-m", "hlkeras.cli"] + argv
    # The search kills itself at the first batch of the second trial's fit.
    killer = [sys.executable, os.path.join(REPO_ROOT, "tests", "kill_at_batch.py"), "2", "0", "0"]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.run(
            killer + ["--"] + argv,
            env=_subprocess_env(),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert first.returncode == -signal.SIGKILL
    assert _read_trial(directory, 0)["status"] == "COMPLETED"
    assert _read_trial(directory, 1)["status"] == "RUNNING"  # killed mid-trial
    completed_trial = directory / "search" / "trial_0"
    completed_record = (completed_trial / "trial.json").read_bytes()
    completed_checkpoint = (completed_trial / "checkpoint.weights.h5").stat().st_mtime_ns

    rerun = subprocess.run(
        command, env=_subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "(resuming)" in rerun.stdout
    assert "2 trials, 2 completed, 0 failed or unfinished" in rerun.stdout, rerun.stdout
    rows = search.read_trials_csv(directory / search.TRIALS_CSV)
    assert [(row["trial"], row["status"]) for row in rows] == [
        ("0", "COMPLETED"),
        ("1", "COMPLETED"),
    ]
    # The trial completed before the kill was neither lost nor run again.
    assert (completed_trial / "trial.json").read_bytes() == completed_record
    assert (completed_trial / "checkpoint.weights.h5").stat().st_mtime_ns == completed_checkpoint
    assert (directory / search.BEST_MODEL).exists()


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.serial
def test_a_chief_and_two_workers_share_one_oracle(tmp_path, tiny_space, monkeypatch, capfd):
    monkeypatch.setenv("PYTHONPATH", REPO_ROOT)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.chdir(REPO_ROOT)
    directory = tmp_path / "search"
    # Under a device budget, so the workers measure their trials too.
    code = cli.main(
        _tune_argv(
            tmp_path,
            tiny_space,
            directory,
            "--max-trials",
            "4",
            "--workers",
            "2",
            "--max-tflite-kb",
            "100",
            "--quantize",
            "dynamic",
        )  # fmt: skip
    )
    output = capfd.readouterr()
    assert code == 0, output.out + output.err
    # trials.csv is written by the chief from its own oracle.
    rows = search.read_trials_csv(directory / search.TRIALS_CSV)
    assert [row["trial"] for row in rows] == ["0", "1", "2", "3"]
    assert all(row["status"] == "COMPLETED" for row in rows)
    assert {row["tuner"] for row in rows} == {"worker0", "worker1"}
    with open(directory / "search" / "oracle.json") as f:
        oracle_state = json.load(f)
    assert sorted(oracle_state["end_order"]) == ["0", "1", "2", "3"]
    assert oracle_state["ongoing_trials"] == {}
    assert (directory / search.BEST_MODEL).exists()
    # Each worker's measurements reached the chief's report.
    for row in rows:
        tflite = directory / "search" / f"trial_{row['trial']}" / "tflite" / "model_dynamic.tflite"
        assert float(row["tflite_kb"]) == pytest.approx(tflite.stat().st_size / 1024)
        assert row["budget"] == "fits" and float(row["latency_ms"]) > 0
    assert (directory / search.run.BEST_TFLITE).stat().st_size <= 100 * 1024
