"""The search recipes in tuning/: every space file resolves and builds, and
`tuning/search_digits.py` runs a whole search through `run_search` (so it
gets the same directory fingerprint check as `hlkeras tune`)."""

import glob
import json
import os
import subprocess
import sys

import keras
import keras_tuner as kt
import pytest

from hlkeras import models
from hlkeras import search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE_FILES = sorted(glob.glob(os.path.join(ROOT, "tuning", "*.toml")))


def test_there_are_space_files():
    assert len(SPACE_FILES) >= 2


@pytest.mark.parametrize("path", SPACE_FILES, ids=os.path.basename)
def test_each_space_file_resolves_and_the_default_trial_of_each_arch_builds(path):
    arch, overrides = search.run.arch_and_space(None, path)
    assert arch == search.space_arch(overrides)
    hypermodel = search.SpecHyperModel(arch, (8, 8, 1), 10, overrides)
    # Every key the file names is searched as the file says (an arch's own
    # table, in a search over several, under the arch's prefix).
    names = search.space.arch_names(arch)
    for key, raw in overrides.items():
        own = raw.items() if key in names and len(names) > 1 else [(None, raw)]
        for own_key, own_raw in own:
            name = key if own_key is None else f"{key}.{own_key}"
            if key != "arch":
                entry = hypermodel.space[name]
                assert entry == search.parse_entry(name, own_raw, entry)
    for name in names:
        hp = kt.HyperParameters()
        if len(names) > 1:
            hp.Choice("arch", names)
            hp.values["arch"] = name
        model = hypermodel.build(hp)
        assert model.name == name
        expected = models.build(hypermodel.spec(hp.values))
        assert model.count_params() == expected.count_params()


def test_run_search_refuses_unknown_settings_and_names_flags():
    with pytest.raises(TypeError, match="unknown settings \\['epochs'\\]"):
        search.run_search(epochs=3)
    with pytest.raises(search.SearchError, match="--max-trials must be a positive integer, got 0"):
        search.run_search(max_trials=0)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_search_digits_runs_a_search_and_refuses_a_different_one_in_its_directory(tmp_path):
    directory = tmp_path / "search"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = ROOT
    script = os.path.join(ROOT, "tuning", "search_digits.py")
    mlp_space = os.path.join(ROOT, "tuning", "digits_mlp.toml")
    # Hyperband with a 2-epoch budget, capped at 2 trials.
    result = subprocess.run(
        [sys.executable, script, mlp_space, str(directory), "2", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = search.read_trials_csv(directory / search.TRIALS_CSV)
    assert [row["status"] for row in rows] == ["COMPLETED", "COMPLETED"]
    with open(directory / search.BEST_SPEC_JSON) as f:
        best_spec = json.load(f)
    best = keras.saving.load_model(directory / search.BEST_MODEL, safe_mode=True)
    assert best.count_params() == models.build(best_spec).count_params()
    assert f"best model: {directory / search.BEST_MODEL}" in result.stdout

    vit_space = os.path.join(ROOT, "tuning", "digits_vit.toml")
    with pytest.raises(search.SearchError, match="holds a different search, so it cannot resume"):
        search.run_search(space=vit_space, tuner="hyperband", max_epochs=2, directory=directory)
