"""`hlkeras prune`, end to end on one backend: a finished digits run pruned
and fine-tuned into a new run directory whose model has the asked sparsity
(counted in NumPy), whose dense and pruned accuracies are those of the two
models on the test split, whose `.tflite` is verified and sparse-encoded,
and which leaves the source run as it was; and the one-line errors."""

import json
import os
import re

import keras
import numpy as np
import pytest

from hlkeras import cli
from hlkeras import data
from hlkeras.export import runtimes
from hlkeras.training import read_history_rows

SMALL = ["--arch", "mlp", "--depth", "1", "--width", "32", "--no-augment"]


def _cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished two-epoch digits run, and its files' bytes."""
    root = tmp_path_factory.mktemp("source")
    data_dir = str(root / "tfds")
    run = root / "run"
    argv = ["train", "--data-dir", data_dir, "--out", run, "--epochs", "2", *SMALL]
    assert cli.main([str(a) for a in argv]) == 0
    return run, data_dir, {name: (run / name).read_bytes() for name in os.listdir(run)}


def _test_split(data_dir):
    _, _, test_ds, _ = data.load("digits", data_dir=data_dir)
    return data.to_numpy(test_ds)


def _accuracy(model, images, labels):
    probabilities = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    return float(np.mean(np.argmax(probabilities, -1) == labels))


def _kernels_but_head(model):
    """Every matrix of the model (the mlp's Dense kernels, those inside its
    residual blocks too) but the head's."""
    head = model.get_layer("head").kernel.path
    return [
        keras.ops.convert_to_numpy(w) for w in model.weights if len(w.shape) == 2 and w.path != head
    ]


def _prune(capsys, run, out, *flags):
    """`hlkeras prune RUN *flags --out OUT` that succeeds, and the model it wrote."""
    status, stdout, stderr = _cli(capsys, "prune", run, *flags, "--out", out)
    assert status == 0, stderr
    return keras.saving.load_model(out / "model.keras"), stdout


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_prune_fine_tunes_into_a_sparse_verified_run(source_run, tmp_path, capsys):
    run, data_dir, source_files = source_run
    out = tmp_path / "pruned"
    model, stdout = _prune(capsys, run, out, "--sparsity", "0.6", "--epochs", "2")
    kernels = _kernels_but_head(model)
    zeros = sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
    metrics = json.loads((out / "metrics.json").read_text())
    assert zeros == pytest.approx(0.6, abs=1e-3) and metrics["sparsity"] == pytest.approx(zeros)
    assert metrics["nonzero_params"] == model.count_params() - sum(np.sum(k == 0) for k in kernels)

    images, labels = _test_split(data_dir)
    dense = keras.saving.load_model(run / "model.keras")
    assert metrics["dense_test_accuracy"] == pytest.approx(_accuracy(dense, images, labels))
    assert metrics["test_accuracy"] == pytest.approx(_accuracy(model, images, labels))
    flatbuffer = (out / "model.tflite").read_bytes()
    assert metrics["tflite_bytes"] == len(flatbuffer) < metrics["dense_tflite_bytes"]
    assert metrics["dense_tflite_bytes"] == len(source_files["model.tflite"])
    assert runtimes.tflite_sparse_tensor_count(flatbuffer) >= 1
    assert metrics["tflite_accuracy"] == pytest.approx(metrics["keras_batch1_accuracy"])
    assert [row["epoch"] for row in read_history_rows(str(out / "history.csv"))] == [0, 1]
    assert not (out / "best.keras").exists()  # it would be a less sparse epoch
    assert f"{metrics['test_accuracy']:.2%}" in stdout and "sparsity" in stdout
    assert re.search(r"model\.keras +the pruned model \(the last epoch: the fully sparse", stdout)
    # The source run is as it was.
    assert {n: (run / n).read_bytes() for n in os.listdir(run)} == source_files


def _run_with_model(run, folder, model):
    """A copy of the finished run `run` in `folder`, `model` its model.keras
    (compiled, as a run's model is)."""
    folder.mkdir()
    for name in os.listdir(run):
        (folder / name).write_bytes((run / name).read_bytes())
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.save(folder / "model.keras")
    return folder


def _conv_stem_model(hidden=True):
    """A digits model whose stem convolution has one input channel, which no
    m:n pattern fits, and (with `hidden`) a Dense of 144 inputs that 2:4 fits."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, name="stem")(inputs))
    if hidden:
        x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="head")(x))


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_one_shot_pattern_keeps_two_of_every_four_inputs(source_run, tmp_path, capsys):
    """2:4 on every weight it fits; the one-input-channel stem stays dense,
    said in one warning line."""
    run, _, _ = source_run
    dense = _conv_stem_model()
    source = _run_with_model(run, tmp_path / "conv", dense)
    out = tmp_path / "pattern"
    status, _, stderr = _cli(capsys, "prune", source, "--pattern", "2:4", "--epochs", "0",
                             "--out", out)  # fmt: skip
    assert status == 0, stderr
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("hlkeras prune: warning: "), stderr
    assert "leaves 1 weight(s) dense" in warnings[0] and "stem/kernel (3, 3, 1, 4)" in warnings[0]
    model = keras.saving.load_model(out / "model.keras")
    kernel = keras.ops.convert_to_numpy(model.get_layer("hidden").kernel)
    groups = kernel.T.reshape(kernel.shape[1], -1, 4)  # 4 consecutive inputs per unit
    assert np.all(np.sum(groups != 0, axis=-1) == 2)
    for name in ("stem", "head"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(model.get_layer(name).kernel),
            keras.ops.convert_to_numpy(dense.get_layer(name).kernel),
        )
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 0


@pytest.mark.backends("tensorflow")
def test_a_pattern_no_weight_fits_is_one_line_before_any_work(source_run, tmp_path, capsys):
    run, _, _ = source_run
    source = _run_with_model(run, tmp_path / "conv", _conv_stem_model(hidden=False))
    status, _, stderr = _cli(capsys, "prune", source, "--pattern", "2:4", "--out", tmp_path / "o")
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("hlkeras prune: error: ")
    assert "--pattern: '2:4' fits no selected weight" in lines[0] and "stem/kernel" in lines[0]
    assert not (tmp_path / "o").exists()


def _hidden_units(model):
    return [layer.hidden_units for layer in model.layers if hasattr(layer, "hidden_units")]


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_structured_writes_a_smaller_verified_run(source_run, tmp_path, capsys):
    run, data_dir, source_files = source_run
    out = tmp_path / "structured"
    model, stdout = _prune(capsys, run, out, "--structured", "0.5", "--epochs", "1")
    dense = keras.saving.load_model(run / "model.keras")
    assert _hidden_units(model) == [units - units // 2 for units in _hidden_units(dense)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"] == model.count_params() < metrics["dense_params"]
    assert metrics["dense_params"] == dense.count_params() and metrics["structured"] == 0.5
    images, labels = _test_split(data_dir)
    assert metrics["test_accuracy"] == pytest.approx(_accuracy(model, images, labels))
    assert metrics["tflite_accuracy"] == pytest.approx(metrics["keras_batch1_accuracy"])
    assert metrics["tflite_bytes"] == (out / "model.tflite").stat().st_size
    assert metrics["tflite_bytes"] < metrics["dense_tflite_bytes"]
    assert "units removed" in stdout and re.search(r"spec\.json +the spec of the dense", stdout)
    assert {n: (run / n).read_bytes() for n in os.listdir(run)} == source_files


@pytest.mark.backends("tensorflow")
def test_structured_on_a_model_without_units_names_its_layers(source_run, tmp_path, capsys):
    run, _, _ = source_run
    inputs = keras.Input((8, 8, 1))
    flat = keras.layers.Flatten(name="flatten")(inputs)
    plain = _run_with_model(
        run, tmp_path / "plain", keras.Model(inputs, keras.layers.Dense(10, name="head")(flat))
    )
    status, _, stderr = _cli(capsys, "prune", plain, "--structured", "0.5", "--out", tmp_path / "o")
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1, stderr
    assert "found nothing to prune" in lines[0] and "flatten" in lines[0] and "head" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--sparsity", "1.5"], ["--sparsity must be a float in [0, 1)", "1.5"]),
        (["--pattern", "3:2"], ["--pattern must be 'm:n'", "'3:2'"]),
        (["--sparsity", "0.5", "--scope", "model"], ["--scope", "'model'", "layer", "global"]),
        (["--sparsity", "0.5", "--epochs", "-1"], ["--epochs must be an integer >= 0", "-1"]),
        (["--structured", "1"], ["--structured must be a float in [0, 1)", "1.0"]),
    ],
    ids=["sparsity", "pattern", "scope", "epochs", "structured"],
)
def test_a_bad_flag_is_one_line_and_writes_nothing(flags, fragments, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    status, stdout, stderr = _cli(
        capsys, "prune", tmp_path / "run", *flags, "--out", tmp_path / "o"
    )
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("hlkeras prune: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.backends("tensorflow")
def test_a_folder_without_a_finished_run_is_named(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.keras").write_text("")
    status, _, stderr = _cli(capsys, "prune", tmp_path / "run", "--sparsity", "0.5")
    assert status == 2
    assert stderr.strip() == (
        f"hlkeras prune: error: {tmp_path / 'run'} holds no finished hlkeras train run "
        "(missing: train_config.json, spec.json)"
    )
    status, _, stderr = _cli(capsys, "prune", tmp_path / "model.keras", "--sparsity", "0.5")
    assert status == 2 and "is not a run directory" in stderr and "hlkeras train" in stderr


@pytest.mark.backends("tensorflow")
def test_out_may_not_be_the_source_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    status, _, stderr = _cli(
        capsys, "prune", tmp_path / "run", "--sparsity", "0.5", "--out", tmp_path / "run"
    )
    assert status == 2 and "is the run being pruned" in stderr
