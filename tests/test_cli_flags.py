"""Every `hlkeras train` / `tune` data and model flag reaches what it sets:
parsed by the CLI's parser, turned into settings as `hlkeras train` turns
them (`given_settings`, `runs.settings_for`), then loaded
(`hlkeras.data.load_for`) or built (`runs.model_spec`, `models.build`) and
checked against what the flag asked for. End to end: `--verbose` and
`tune --tuner bayesian|hyperband`. (`train --distribute model` end to end
is left out: its 4-device JAX process cost 60-78 s; test_distribute checks
model-parallel training against one device, and `--distribute data` end to
end with two processes.)"""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from texts_testing import write_keyword_csv

from hlkeras import cli
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
    """About 10 s (one process importing TensorFlow). Without --verbose the
    same script prints only its own lines
    (test_cli.test_the_console_script_prints_one_error_line_and_no_native_logs)."""
    import hlkeras_launcher

    result = console_script("info", "--verbose")
    assert result.returncode == 0, result.stderr[-2000:]
    # Importing TensorFlow prints its oneDNN notice from C++ before any
    # Python logging applies: only the filter keeps it out.
    lines = result.stderr.splitlines()
    assert any(hlkeras_launcher.NATIVE_LOG_LINE.match(line) for line in lines), lines


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["bayesian", "hyperband"])
def test_tune_with_each_tuner_through_the_cli(tmp_path, tuner, capsys):
    """About 8 s each, in this process: two short trials of a tiny mlp (the
    tuners themselves: test_search)."""
    space = tmp_path / "tiny.toml"
    space.write_text('arch = "mlp"\ndepth = 1\nwidth = [8, 16]\nbatch_size = 256\n')
    directory = tmp_path / "search"
    argv = ["tune", "--tuner", tuner, "--max-trials", "2", "--max-epochs", "2"]
    argv += ["--space", str(space), "--dir", str(directory), "--data-dir", str(tmp_path / "tfds")]
    assert cli.main(argv) == 0, capsys.readouterr().err
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
