"""`hlkeras.training.runs.RunDir` and the settings of a run: create, refuse, overwrite
only the run's own files, resume with the recorded settings. (The training
flow itself, `train_run`, is exercised end to end by tests/test_cli_train.py.)
"""

import json

import pytest

from hlkeras import data
from hlkeras.training import runs

# Argument checks, files and tf.data: the same on every backend.
pytestmark = pytest.mark.neutral


def test_a_new_directory_is_created_by_prepare_not_by_open(tmp_path, monkeypatch):
    run_dir, resuming = runs.RunDir.open(str(tmp_path / "new"))
    assert not resuming and not (tmp_path / "new").exists()
    run_dir.prepare()
    assert (tmp_path / "new").is_dir()
    assert run_dir.file("metrics.json") == str(tmp_path / "new" / "metrics.json")
    monkeypatch.chdir(tmp_path)
    unnamed, _ = runs.RunDir.open(None)
    assert unnamed.path is None
    unnamed.prepare()
    assert unnamed.path.startswith("runs") and (tmp_path / unnamed.path).is_dir()


def test_a_non_empty_directory_is_refused_and_overwrite_deletes_only_run_files(tmp_path):
    (tmp_path / "model.keras").write_text("old model")
    (tmp_path / "backup").mkdir()
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(runs.RunError, match="already exists and is not empty.*--overwrite"):
        runs.RunDir.open(str(tmp_path))
    assert (tmp_path / "model.keras").read_text() == "old model"

    run_dir, _ = runs.RunDir.open(str(tmp_path), overwrite=True)
    assert (tmp_path / "model.keras").read_text() == "old model"  # not yet
    run_dir.prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_needs_an_unfinished_recorded_run(tmp_path):
    with pytest.raises(runs.RunError, match="no hlkeras run"):
        runs.RunDir.open(str(tmp_path), resume=True)
    (tmp_path / runs.RunDir.CONFIG).write_text(json.dumps({**runs.TRAIN_DEFAULTS, "epochs": 7}))
    run_dir, resuming = runs.RunDir.open(str(tmp_path), resume=True)
    assert resuming
    assert runs.settings_for(run_dir, True, {"data_dir": "/d"})["epochs"] == 7
    with pytest.raises(runs.RunError, match="recorded run, which has --epochs 7; got 9"):
        runs.settings_for(run_dir, True, {"epochs": 9})
    (tmp_path / runs.RunDir.METRICS).write_text("{}")
    with pytest.raises(runs.RunError, match="already finished"):
        runs.RunDir.open(str(tmp_path), resume=True)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"epochs": 0}, "--epochs must be a positive integer, got 0"),
        ({"lr": -1.0}, "--lr must be a positive number, got -1.0"),
        ({"dropout": 1.0}, r"--dropout must be in \[0, 1\), got 1.0"),
        ({"experts": -1}, "--experts must be >= 0, got -1"),
    ],
)
def test_settings_out_of_range_name_the_flag(tmp_path, given, message):
    run_dir, _ = runs.RunDir.open(str(tmp_path / "run"))
    with pytest.raises(runs.RunError, match=message):
        runs.settings_for(run_dir, False, given)


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(runs.RunError, match="exclude each other"):
        runs.RunDir.open(str(tmp_path), resume=True, overwrite=True)


def _info(kind):
    shape = (8, 8, 1) if kind == "images" else (4,)
    return data.DatasetInfo("x", shape, 3, ("a", "b", "c"), 10, 0, 0, kind=kind)


@pytest.mark.parametrize("kind, arch", [("images", "resnet"), ("table", "mlp")])
def test_the_default_arch_follows_the_kind_of_data(kind, arch):
    spec = runs.model_spec(dict(runs.TRAIN_DEFAULTS), _info(kind))
    assert spec["arch"] == arch and "num_experts" not in spec


def test_a_vit_gets_moe_ffns_unless_experts_is_zero():
    settings = {**runs.TRAIN_DEFAULTS, "arch": "vit"}
    assert runs.model_spec(settings, _info("images"))["num_experts"] == runs.MOE_EXPERTS_DEFAULT
    assert runs.model_spec({**settings, "experts": 0}, _info("images"))["num_experts"] == 0
