"""Every `hlkeras train` / `tune` data and model flag reaches what it sets:
parsed by the CLI's parser, turned into settings as `hlkeras train` turns
them (`given_settings`, `runs.settings_for`), then loaded
(`hlkeras.data.load_for`) or built (`runs.model_spec`, `models.build`) and
checked against what the flag asked for. End to end: `--verbose`,
`train --distribute model` and `tune --tuner bayesian|hyperband`."""

import csv
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from texts_testing import write_keyword_csv

from hlkeras import data
from hlkeras import models
from hlkeras import search
from hlkeras.cli import build_parser
from hlkeras.cli.common import given_settings
from hlkeras.training import runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_settings(*argv):
    """The settings `hlkeras train ARGV` runs with."""
    args = build_parser().parse_args(["train", *argv])
    return runs.settings_for(None, False, given_settings(args, runs.TRAIN_DEFAULTS))


def write_image_folder(root, per_class=10, size=(6, 5)):
    """Two classes of RGB PNGs of `size` whose red channel holds the class."""
    for class_id, name in enumerate(("cat", "dog")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = np.full((*size, 3), 20 * i, "uint8")
            image[..., 0] = 200 * class_id
            keras.utils.save_img(folder / f"{i}.png", image)
    return root


@pytest.mark.neutral
def test_image_size_color_mode_and_split_flags_reach_the_loader(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    settings = train_settings(
        "--data", str(folder), "--image-size", "4", "3", "--color-mode", "grayscale",
        "--val-split", "0.2", "--test-split", "0.3",
    )  # fmt: skip
    assert (settings["image_size"], settings["color_mode"]) == ([4, 3], "grayscale")
    train_ds, val_ds, test_ds, info = data.load_for(settings, batch_size=4)
    assert info.input_shape == (4, 3, 1)
    # 20 images: round(20 * 0.3) for test, then round(20 * 0.2) for validation.
    assert (info.num_test, info.num_val, info.num_train) == (6, 4, 10)
    assert data.to_numpy(test_ds)[0].shape == (6, 4, 3, 1)
    assert data.to_numpy(val_ds)[0].shape == (4, 4, 3, 1)


@pytest.mark.neutral
def test_text_length_and_vocabulary_flags_reach_the_tokenizer(tmp_path):
    path = tmp_path / "tickets.csv"
    write_keyword_csv(path, rows=60)
    settings = train_settings(
        "--data", str(path), "--text-column", "text", "--max-length", "7", "--vocab-size", "12"
    )
    _, _, test_ds, info = data.load_for(settings, batch_size=8)
    assert info.kind == "text" and info.input_shape == (7,)
    # The vocabulary counts padding and the unknown word among its 12 ids.
    assert info.spec_entries()["vocabulary_size"] == 12
    ids = data.to_numpy(test_ds)[0]
    assert ids.shape[1] == 7 and ids.max() < 12


@pytest.mark.neutral
def test_capacity_factor_and_experts_reach_every_moe_layer():
    from hlkeras.layers import MixtureOfExperts

    settings = train_settings("--arch", "vit", "--experts", "2", "--capacity-factor", "1.5")
    info = data.DatasetInfo("digits", (8, 8, 1), 10, tuple("0123456789"), 10, 0, 0)
    spec = runs.model_spec(settings, info)
    assert (spec["num_experts"], spec["capacity_factor"]) == (2, 1.5)
    moe_layers = [
        layer
        for layer in models.build(spec)._flatten_layers()
        if isinstance(layer, MixtureOfExperts)
    ]
    assert moe_layers and all(
        (layer.num_experts, layer.capacity_factor) == (2, 1.5) for layer in moe_layers
    )


def console_script(*argv):
    launch = "import sys, hlkeras_launcher; sys.exit(hlkeras_launcher.main())"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_BACKEND"] = "tensorflow"
    return subprocess.run(
        [sys.executable, "-c", launch, *argv], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.slow
def test_verbose_shows_the_native_log_lines_the_console_script_filters():
    import hlkeras_launcher

    def native_lines(result):
        assert result.returncode == 0, result.stderr[-2000:]
        return [
            line
            for line in result.stderr.splitlines()
            if hlkeras_launcher.NATIVE_LOG_LINE.match(line)
        ]

    # Importing TensorFlow prints its oneDNN notice from C++ before any
    # Python logging applies: only the filter keeps it out.
    assert native_lines(console_script("info")) == []
    assert native_lines(console_script("info", "--verbose"))


def cli_subprocess(argv, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hlkeras.cli", *argv],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.backends("jax")
def test_train_distribute_model_shards_the_experts_and_publishes_a_verified_run(tmp_path):
    """About 40 s: one epoch of a one-block vit+MoE on 4 simulated devices."""
    out = tmp_path / "run"
    result = cli_subprocess(
        [
            "train",
            "--arch",
            "vit",
            "--experts",
            "2",
            "--depth",
            "1",
            "--width",
            "16",
            "--epochs",
            "1",
            "--no-augment",
            "--data-dir",
            str(tmp_path / "tfds"),
            "--out",
            str(out),
            "--distribute",
            "model",
            "--mesh",
            "2x2",
        ],  # fmt: skip
        env={"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"ModelParallel.*2x2|2x2.*ModelParallel", result.stdout, re.S), result.stdout
    metrics = json.loads((out / runs.RunDir.METRICS).read_text())
    # The run's .tflite passed the per-sample gate against the sharded model.
    assert (out / "model.tflite").exists() and metrics["tflite_refused"] is None
    assert metrics["tflite_top1_agreement"] >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["bayesian", "hyperband"])
def test_tune_with_each_tuner_through_the_cli(tmp_path, tuner):
    """About 15 s each: two one-epoch trials of a tiny mlp on the digits."""
    space = tmp_path / "tiny.toml"
    space.write_text('arch = "mlp"\ndepth = 1\nwidth = [8, 16]\nbatch_size = 256\n')
    directory = tmp_path / "search"
    result = cli_subprocess(
        [
            "tune",
            "--tuner",
            tuner,
            "--max-trials",
            "2",
            "--max-epochs",
            "2",
            "--space",
            str(space),
            "--dir",
            str(directory),
            "--data-dir",
            str(tmp_path / "tfds"),
        ]  # fmt: skip
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    config = json.loads((directory / search.SEARCH_CONFIG_JSON).read_text())
    assert config["tuner"] == tuner
    # The oracle that ran is the one asked for: each saves state only it has.
    oracle = json.loads((directory / search.SEARCH_PROJECT / "oracle.json").read_text())
    own_state = {"bayesian": "num_initial_points", "hyperband": "brackets"}
    assert own_state[tuner] in oracle
    assert own_state[{"bayesian": "hyperband", "hyperband": "bayesian"}[tuner]] not in oracle
    with open(directory / search.TRIALS_CSV) as file:
        rows = list(csv.DictReader(file))
    assert 1 <= len(rows) and all(row["status"] == "COMPLETED" for row in rows)
    assert (directory / search.BEST_MODEL).exists()
