"""`hlkeras train --diagnose` and `hlkeras inspect`, end to end on one
backend: the main job's resnet probed every epoch raises no warning and
writes diagnostics.json keyed by the model's hidden layers and a PNG; a
model broken on purpose is flagged; inspect's one-line errors.

Costs about 30 s here: one 3-epoch main-job resnet run (with its export),
one inspect of it."""

import json
import os

import keras
import numpy as np
import pytest

from hlkeras import cli
from hlkeras import diagnostics

pytestmark = pytest.mark.slow


def _cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _is_png(path):
    from matplotlib import image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width, _ = image.imread(path).shape
    return height > 100 and width > 100


@pytest.fixture(scope="module")
def diagnosed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnosed")
    run = root / "run"
    argv = ["train", "--data-dir", root / "tfds", "--out", run, "--epochs", "3", "--diagnose"]
    assert cli.main([str(a) for a in argv]) == 0
    return run


def test_the_main_job_diagnosed_every_epoch_raises_no_warning(diagnosed_run):
    with open(diagnosed_run / "diagnostics.json") as f:
        report = json.load(f)
    with open(diagnosed_run / "metrics.json") as f:
        metrics = json.load(f)
    model = keras.saving.load_model(diagnosed_run / "model.keras")
    hidden = [path for path, _ in diagnostics.hidden_layers(model)]
    assert list(report["layers"]) == hidden
    assert report["epochs"] == [0, 1, 2]  # 3 epochs: one probe each
    assert report["warnings"] == [] and metrics["warnings"] == []
    conv = report["layers"]["stem_conv"]["epochs"]
    assert [probe["epoch"] for probe in conv] == [0, 1, 2]
    assert all(probe["gradient_norm"] > 0 and probe["update_ratio"] > 0 for probe in conv)
    assert _is_png(diagnosed_run / "hidden_layers.png")


def test_inspect_prints_a_row_per_hidden_layer_of_a_run(capsys, diagnosed_run, tmp_path):
    png = tmp_path / "layers.png"
    status, out, err = _cli(capsys, "inspect", diagnosed_run, "--plot", png)
    assert status == 0, err
    model = keras.saving.load_model(diagnosed_run / "model.keras")
    lines = out.splitlines()
    assert lines[0] == "hlkeras inspect: resnet, 128 examples of the run's data"
    assert lines[1].split()[:5] == ["layer", "class", "shape", "params", "FLOPs"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split()}
    for path, layer in diagnostics.hidden_layers(model):
        assert rows[path][1] == type(layer).__name__
    # stem_conv: a 3x3 convolution of 1 channel into 32 on 8x8 digits.
    stem = model.get_layer("stem_conv")
    assert rows["stem_conv"][2:5] == ["8x8x32", str(stem.count_params()), str(2 * 9 * 32 * 64)]
    assert "warning" not in out and _is_png(png)


def _dead_relu_file(path):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(
        8, activation="relu", bias_initializer=keras.initializers.Constant(-100.0), name="dead"
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(hidden))
    model.save(path)
    return path


def test_inspect_flags_a_dead_relu_layer_with_a_random_probe(capsys, tmp_path):
    path = _dead_relu_file(tmp_path / "dead.keras")
    status, out, err = _cli(capsys, "inspect", path, "--random-probe")
    assert status == 0, err
    assert (
        "hlkeras inspect: warning: dead: 100% dead units (relu) on the probe: "
        "try gelu/leaky_relu or a lower --lr"
    ) in out.splitlines()


def test_inspect_mistakes_get_one_line(capsys, tmp_path):
    model_file = _dead_relu_file(tmp_path / "dead.keras")
    not_a_model = tmp_path / "notes.keras"
    not_a_model.write_text("not a model")
    table = tmp_path / "table.npz"
    np.savez(table, x=np.zeros((20, 7), "float32"), y=np.arange(20) % 3)
    cases = [
        ((model_file,), "is a model file without its data: give --data or --dataset"),
        ((not_a_model,), "is not a Keras model file"),
        ((model_file, "--data", table), "gives inputs of shape (7,) per example, but the "
                                        "model takes (5,)"),
        ((model_file, "--random-probe", "--data", table), "--random-probe excludes --data"),
    ]  # fmt: skip
    for argv, message in cases:
        status, out, err = _cli(capsys, "inspect", *argv)
        assert status == 2 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and out == ""


def test_diagnose_mistakes_get_one_line_and_write_nothing(capsys, tmp_path):
    for flags, message in [
        (["--diagnose", "0"], "--diagnose EVERY must be a positive number of epochs"),
        (["--diagnose", "--distribute", "data"], "--diagnose does not run with --distribute"),
    ]:
        status, _, err = _cli(capsys, "train", "--out", tmp_path / "run", *flags)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not os.path.exists(tmp_path / "run")
