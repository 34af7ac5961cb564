"""`hlkeras train`: a short run on every backend, the run directory it
writes, one-line user errors, NaN handling, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from hlkeras import _compat
from hlkeras import cli
from hlkeras import data
from hlkeras import models
from hlkeras import training
from hlkeras.training import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--depth", "1", "--width", "16"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    data.load("digits", data_dir=path)  # prepare once for the module
    return path


def _train(capsys, *flags):
    status = cli.main(["train", *flags])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.backends("tensorflow", "jax", "torch")  # fit and export differ by backend
def test_short_run_writes_a_verified_run_directory(capsys, data_dir, tmp_path):
    out = str(tmp_path / "run")
    status, stdout, stderr = _train(
        capsys, "--data-dir", data_dir, "--out", out, "--epochs", "2", "--arch", "vit", *SMALL
    )
    assert status == 0, stderr
    for name in ("model.keras", "spec.json", "history.csv", "curves.png", "metrics.json"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out, "spec.json")) as f:
        spec = json.load(f)
    # A vit gets MoE FFNs by default.
    assert spec["arch"] == "vit" and spec["depth"] == 1 and spec["width"] == 16
    assert spec["num_experts"] == runs.MOE_EXPERTS_DEFAULT
    assert metrics["backend"] == keras.backend.backend() and metrics["epochs"] == 2
    assert [
        row["epoch"] for row in training.read_history_rows(os.path.join(out, "history.csv"))
    ] == [0, 1]
    # The recorded accuracy is model.keras's accuracy on the test split.
    model = keras.saving.load_model(os.path.join(out, "model.keras"))
    _, _, test_ds, _ = data.load("digits", data_dir=data_dir)
    images, labels = data.to_numpy(test_ds)
    probabilities = model.predict(images, batch_size=len(images), verbose=0)
    predicted = np.argmax(keras.ops.convert_to_numpy(probabilities), axis=-1)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-6)
    # A sample's prediction does not depend on its batch-mates (MoE
    # capacity is per example): batch 1 is the whole-batch accuracy.
    one_at_a_time = model.predict(images, batch_size=1, verbose=0)
    np.testing.assert_allclose(one_at_a_time, probabilities, rtol=0, atol=1e-5)
    assert metrics["keras_batch1_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    # The MoE routing statistics reach the history on every backend.
    rows = training.read_history_rows(os.path.join(out, "history.csv"))
    # The default MoE is dropless: no token may be dropped.
    assert spec["capacity_factor"] is None and rows[-1]["block_0_moe_dropped_fraction"] == 0.0
    assert 1.0 <= rows[-1]["block_0_moe_max_expert_load"] <= runs.MOE_EXPERTS_DEFAULT
    # The progress bar's aggregates (one MoE layer here: the same values).
    assert rows[-1]["moe_dropped_fraction"] == rows[-1]["block_0_moe_dropped_fraction"]
    assert rows[-1]["moe_max_expert_load"] == rows[-1]["block_0_moe_max_expert_load"]
    assert not [name for name in rows[-1] if name.startswith("val_") and "moe" in name]
    # The training augmentation is in the data pipeline, never in the model.
    random_layers = [
        layer.name
        for layer in _compat.sublayers(model)
        if type(layer).__name__.startswith("Random")
    ]
    assert not random_layers
    # spec.json rebuilds the same architecture.
    rebuilt = models.build(spec)
    assert [w.shape for w in rebuilt.weights] == [w.shape for w in model.weights]
    # Every backend exports (JAX and torch through a TF subprocess).
    assert os.path.exists(os.path.join(out, "model.tflite"))
    # Verified per sample at batch 1, as a phone runs it.
    assert metrics["tflite_refused"] is None
    assert metrics["tflite_top1_agreement"] == 1.0
    assert metrics["tflite_max_abs_diff"] <= 1e-4
    assert metrics["tflite_gap_points"] == 0.0
    assert f"litert {metrics['tflite_accuracy']:.4f} at batch 1" in stdout
    # The closing block names the directory, then every file in it with its role.
    block = stdout[stdout.index(f"wrote {out}{os.sep}") :].splitlines()
    listed = [line.split()[0] for line in block[1:]]
    assert sorted(listed) == sorted(name for name in os.listdir(out) if name != "backup")
    assert all(runs.RunDir.FILE_ROLES[name] in line for name, line in zip(listed, block[1:]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--arch", "transformerish"],
            "--arch must be one of mlp, resnet, text, vit, got 'transformerish'",
        ),
        (["--epochs", "-3"], "--epochs must be a positive integer, got -3"),
        (["--batch-size", "5000"], "--batch-size 5000 is larger than the 1293 training examples"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (
            ["--arch", "mlp", "--experts", "4"],
            "--experts needs an arch with MoE FFNs; --arch mlp has none",
        ),
        (["--dataset", "no_such_set"], "unknown dataset 'no_such_set'"),
        (["--resume"], "--resume needs --out"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(capsys, data_dir, flags, message):
    status, _, stderr = _train(capsys, "--data-dir", data_dir, *flags)
    assert status == 2
    assert stderr.startswith("hlkeras train: error: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


@pytest.mark.slow
def test_existing_out_is_refused_unless_overwrite(capsys, data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.csv").write_text("epoch,loss\n0,1.0\n")
    (out / "notes.txt").write_text("mine")
    status, _, stderr = _train(
        capsys, "--data-dir", data_dir, "--out", str(out), "--epochs", "1", *SMALL
    )
    assert status == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert (out / "history.csv").read_text() == "epoch,loss\n0,1.0\n"
    status, _, stderr = _train(
        capsys, "--data-dir", data_dir, "--out", str(out), "--epochs", "1", "--overwrite", *SMALL
    )
    assert status == 0, stderr
    assert len(training.read_history_rows(str(out / "history.csv"))) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only run files are replaced


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_nan_loss_gives_a_clear_message(capsys, data_dir, tmp_path):
    out = str(tmp_path / "run")
    status, _, stderr = _train(
        capsys, "--data-dir", data_dir, "--out", out, "--epochs", "3", "--lr", "1e30", *SMALL
    )
    assert status == 1
    assert "loss became NaN in epoch 1" in stderr and "--lr" in stderr and "Traceback" not in stderr
    assert not os.path.exists(os.path.join(out, "best.keras"))
    assert not os.path.exists(os.path.join(out, "model.keras"))


# What a run starts from: its initial weights and its first augmented batches.
RUN_START = """
import itertools, sys
import numpy as np
from hlkeras import models
from hlkeras.training import runs
settings = {**runs.TRAIN_DEFAULTS, "data_dir": sys.argv[1], "seed": 0}
(train_ds, _, _), info = runs.load_data(settings)
weights = models.build(runs.model_spec(settings, info)).get_weights()
batches = [float(np.sum(images)) for images, _ in itertools.islice(train_ds, 8)]
print(repr([float(np.sum(w)) for w in weights] + batches))
"""


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_a_seed_starts_the_same_on_a_fresh_and_on_a_prepared_data_dir(tmp_path):
    """TFDS' first preparation of the digits draws from the global random
    states; a run must not start from other weights or augment otherwise
    because of it, nor because parallel augmentation calls race for the
    seed generator. Three processes, as three users' runs (18 s). (Training
    itself is not compared: it is not bitwise reproducible across
    processes on this CPU.)"""
    fresh = str(tmp_path / "tfds")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ROOT}
    starts = []
    for _ in range(3):  # the first one prepares the data directory
        run = subprocess.run(
            [sys.executable, "-c", RUN_START, fresh],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        starts.append(run.stdout.strip().splitlines()[-1])
    assert starts[0] == starts[1] == starts[2]


def _backup_epoch(out):
    path = os.path.join(out, "backup", "training_metadata.json")
    try:
        with open(path) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize(
    "backend, distribute",
    # The subprocess' backend: also a DataParallel run on 4 virtual devices.
    [("tensorflow", []), ("jax", ["--distribute", "data"])],
)
def test_resume_after_sigkill_continues_from_last_finished_epoch(
    data_dir, tmp_path, backend, distribute
):
    out = str(tmp_path / "run")
    epochs = 3
    argv = ["train", "--data-dir", data_dir, "--out", out, *distribute]
    argv += ["--epochs", str(epochs), "--batch-size", "32", *SMALL]
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
    if distribute:
        # Kept: the suite's compile flags (conftest.py); 4 devices added.
        env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4"
    # The run kills itself at batch 5 of its second epoch (of 40 steps).
    killed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "kill_at_batch.py"), "1", "1", "5", "--"]
        + argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    finished = _backup_epoch(out)
    assert finished == 1, "the kill did not land in the second epoch"
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    rows_before = training.read_history_rows(os.path.join(out, "history.csv"))

    resumed = subprocess.run(
        [sys.executable, "-m", "hlkeras.cli", *argv[: -len(SMALL) - 4], "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    epoch_lines = [line for line in resumed.stdout.splitlines() if line.startswith("Epoch ")]
    assert epoch_lines[0].startswith(f"Epoch {finished + 1}/{epochs}")
    rows = training.read_history_rows(os.path.join(out, "history.csv"))
    assert [row["epoch"] for row in rows] == list(range(epochs))
    # Finished epochs are kept as they were, not retrained.
    # assert_equal counts NaN == NaN (an MoE routing metric is NaN in validation).
    np.testing.assert_equal(rows[:finished], rows_before[:finished])
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["epochs"] == epochs


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_mixed_precision_trains_bfloat16_and_exports_float32(capsys, data_dir, tmp_path):
    from hlkeras import export

    out = str(tmp_path / "run")
    status, _, stderr = _train(
        capsys, "--data-dir", data_dir, "--out", out, "--epochs", "1", "--mixed-precision",
        "--arch", "vit", *SMALL,
    )  # fmt: skip
    assert status == 0, stderr
    assert keras.config.dtype_policy().name == "float32"  # restored afterwards
    model = keras.saving.load_model(os.path.join(out, "model.keras"))
    assert model.get_layer("block_0").dtype_policy.name == "mixed_bfloat16"
    # The .tflite is the float32 twin: same weights, float32 compute.
    with open(os.path.join(out, "spec.json")) as f:
        twin = models.build(json.load(f))
    twin.set_weights(model.get_weights())
    _, _, test_ds, _ = data.load("digits", data_dir=data_dir)
    images, _ = data.to_numpy(test_ds)
    with open(os.path.join(out, "model.tflite"), "rb") as f:
        litert = export.run_tflite(f.read(), images)
    expected = twin.predict(images, batch_size=len(images), verbose=0)
    np.testing.assert_allclose(litert, expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_optimizer_early_stopping_and_tensorboard_flags_reach_the_run(capsys, data_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--weight-decay", "0.02", "--clipnorm", "0.5", "--patience", "4", "--tensorboard"]
    status, _, stderr = _train(
        capsys, "--data-dir", data_dir, "--out", str(out), "--epochs", "1", *SMALL, *flags
    )
    assert status == 0, stderr
    model = keras.saving.load_model(out / "model.keras")
    assert model.optimizer.weight_decay == pytest.approx(0.02)
    assert model.optimizer.clipnorm == pytest.approx(0.5)
    with open(out / "train_config.json") as f:
        settings = json.load(f)
    assert (settings["weight_decay"], settings["clipnorm"], settings["patience"]) == (0.02, 0.5, 4)
    assert any(
        name.startswith("events.out.tfevents") for name in os.listdir(out / "logs" / "train")
    )


def test_overwrite_with_bad_data_keeps_the_previous_run(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.keras").write_text("the previous model")
    status, _, stderr = _train(capsys, "--data", str(tmp_path / "missing"), "--out", str(out),
                               "--overwrite")  # fmt: skip
    assert status == 2 and "no such file or folder" in stderr and stderr.count("\n") == 1
    assert (out / "model.keras").read_text() == "the previous model"
    status, _, _ = _train(capsys, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "n"))
    assert status == 2 and not (tmp_path / "n").exists()
