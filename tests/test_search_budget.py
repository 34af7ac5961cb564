"""Tests of a search under a device budget (`hlkeras.search.budget`): the
verdicts, scores and ranking against a hand-computed table, the Pareto
front, searches over several architectures, and a real search whose
largest trials must be rejected, resumed, with `best.tflite` checked on
disk."""

import json
import os

import keras
import keras_tuner as kt
import pytest
from digits_testing import digits_mlp_search_config

from hlkeras import models
from hlkeras import search
from hlkeras.search import budget

# (trial, tflite KiB, latency ms, val_accuracy) -> verdict and oracle score
# against 100 KiB and 1 ms, computed by hand: the score of a trial over
# budget is -(worst measurement / its budget - 1), capped at -1.
BUDGET = budget.DeviceBudget(max_tflite_kb=100, max_latency_ms=1.0, quantization="int8")
TABLE = [
    ("0", 50.0, 0.5, 0.90, "fits", 0.90),
    ("1", 130.0, 0.5, 0.95, "over size: 130 KiB > 100 KiB", -0.3),
    ("2", 80.0, 1.5, 0.97, "over latency: 1.5 ms > 1 ms", -0.5),
    ("3", 300.0, 1.2, 0.99, "over size: 300 KiB > 100 KiB; over latency: 1.2 ms > 1 ms", -1.0),
    ("4", 100.0, 1.0, 0.80, "fits", 0.80),
]


def _measured(kb, ms):
    return {"tflite_kb": kb, "latency_ms": ms, "refused": ""}


@pytest.mark.parametrize("trial, kb, ms, accuracy, verdict, score", TABLE)
def test_verdict_and_oracle_score_follow_the_hand_computed_table(
    trial, kb, ms, accuracy, verdict, score
):
    measured = _measured(kb, ms)
    assert BUDGET.verdict(measured) == verdict
    measured["budget"] = verdict
    assert budget.oracle_score(accuracy, measured, BUDGET) == pytest.approx(score)


def test_an_export_that_failed_scores_below_every_trial_over_budget():
    refused = {**_measured(None, None), "refused": "export refused: ...", "budget": "x"}
    assert budget.oracle_score(0.99, refused, BUDGET) == -1.0


def test_one_budget_alone_ignores_the_other_measurement():
    size_only = budget.DeviceBudget(max_tflite_kb=100)
    assert size_only.verdict(_measured(80.0, 50.0)) == "fits"
    assert size_only.overshoot(_measured(150.0, 50.0)) == pytest.approx(0.5)


def _rows():
    rows = []
    for trial, kb, ms, accuracy, verdict, score in TABLE:
        rows.append(
            {
                "trial": trial,
                "status": "COMPLETED",
                "score": accuracy,
                "oracle_score": score,
                "epochs": 3,
                "seconds": 1.0,
                "budget": verdict,
                "tflite_kb": kb,
                "latency_ms": ms,
                "tflite_accuracy": accuracy,
                "width": int(kb),
            }
        )
    rows.append({"trial": "5", "status": "FAILED", "score": None, "width": 1})
    return rows


def test_ranking_puts_the_trials_that_fit_first_and_the_best_is_the_best_that_fits():
    rows = _rows()
    # Fits, by accuracy: 0 (0.90), 4 (0.80); then over budget, nearest first:
    # 1 (-0.3), 2 (-0.5), 3 (-1.0). Trial 3 has the best accuracy of all.
    assert [row["trial"] for row in search.ranked(rows)] == ["0", "4", "1", "2", "3"]
    space = {"width": {"values": [50, 80, 100, 130, 300]}}
    assert search.best_values(rows, space) == {"width": 50}
    lines = search.leaderboard(rows, space, "val_accuracy")
    assert lines[1].split()[:3] == ["1", "0", "0.9000"] and lines[1].endswith("fits")
    assert lines[3].endswith("over size: 130 KiB > 100 KiB")
    assert lines[-1] == "6 trials, 5 completed (2 fit the budget), 1 failed or unfinished"


def test_when_no_trial_fits_the_message_names_the_smallest():
    rows = [row for row in _rows() if row.get("budget", "fits") != "fits"]
    assert search.best_values(rows, {"width": {"values": [1]}}) is None
    message = search.run.no_best_message(rows, BUDGET, "runs/x")
    assert message.startswith("no trial fits the device budget --max-tflite-kb 100")
    assert "the smallest, trial 2, is 80.0 KiB and 1.500 ms (over latency" in message


def test_pareto_front_of_a_hand_made_table():
    # (cost, accuracy): 1 is dominated by 0 (costs more, less accurate), 3
    # by 2 (same cost, less accurate); 4 is the most accurate, at a cost.
    points = [(1.0, 0.9), (2.0, 0.8), (3.0, 0.95), (3.0, 0.93), (9.0, 0.99)]
    assert budget.pareto_front(points) == [0, 2, 4]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_tflite_kb": 0}, "--max-tflite-kb must be a number > 0, got 0"),
        ({"max_latency_ms": -1.5}, "--max-latency-ms must be a number > 0, got -1.5"),
        ({"max_latency_ms": "fast"}, "--max-latency-ms must be a number > 0, got 'fast'"),
        ({"quantize": "int4"}, "--quantize must be one of none, float16, dynamic, int8"),
        (
            {"max_tflite_kb": 10, "objective": "val_loss"},
            "a device budget needs an accuracy objective, got --objective val_loss",
        ),
    ],
)
def test_bad_budgets_are_refused_before_anything_runs(tmp_path, settings, message):
    with pytest.raises(search.SearchError, match=message):
        search.run_search(directory=str(tmp_path / "s"), **settings)
    assert not (tmp_path / "s").exists()


def test_a_budget_on_a_directory_searched_without_one_is_refused(tmp_path):
    config = digits_mlp_search_config(max_epochs=2)
    search.check_search_dir(str(tmp_path), config)
    with_budget = {**config, "device_budget": BUDGET.to_config()}
    with pytest.raises(
        ValueError,
        match="it was searched without a device budget, this run is with the device budget "
        "--max-tflite-kb 100 --max-latency-ms 1 --quantize int8",
    ):
        search.check_search_dir(str(tmp_path), with_budget)


# --- Several architectures in one search ---------------------------------------------


def test_a_space_over_several_archs_prefixes_each_archs_keys_and_shares_training():
    space = search.resolve_space(
        "mlp,vit", {"lr": 1e-3, "mlp": {"depth": 2}, "vit": {"num_experts": {"values": [0, 4]}}}
    )
    assert space["arch"] == {"values": ["mlp", "vit"]}
    assert space["lr"] == {"fixed": 1e-3}
    assert space["mlp.depth"] == {"fixed": 2}
    assert space["vit.num_experts"] == {"values": [0, 4]}
    # The other keys keep each arch's own defaults.
    assert space["vit.width"] == search.resolve_space("vit")["width"]
    assert space["mlp.width"] == search.resolve_space("mlp")["width"]
    assert not any(key.startswith("mlp.") and key[4:] in search.TRAINING_KEYS for key in space)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"depth": 2}, r"space\['depth'\]: a search over several archs"),
        ({"vit": {"lr": 1e-3}}, r"space\['vit'\]\['lr'\]: training keys are shared"),
        ({"vit": {"experts": 4}}, r"space\['experts'\] is not a hyperparameter of arch='vit'"),
    ],
)
def test_a_malformed_space_over_several_archs_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        search.resolve_space("mlp,vit", overrides)


def test_an_arch_choice_names_only_known_archs():
    assert search.space_arch({"arch": {"values": ["mlp", "vit"]}}) == "mlp,vit"
    with pytest.raises(ValueError, match=r"space\['arch'\] must be one of"):
        search.space_arch({"arch": {"values": ["mlp", "cnn"]}})


@pytest.mark.parametrize("arch", ["mlp", "resnet", "vit"])
def test_each_arch_of_the_choice_builds_its_own_spec_from_its_own_keys(arch):
    hypermodel = search.SpecHyperModel(
        "mlp,resnet,vit", (8, 8, 1), 10, {"mlp": {"depth": 3}, "vit": {"num_experts": 4}}
    )
    hp = kt.HyperParameters()
    hp.Choice("arch", ["mlp", "resnet", "vit"])
    hp.values["arch"] = arch
    model = hypermodel.build(hp)
    values = hypermodel.values(hp)
    # Only the chosen arch's keys are active.
    assert {key.split(".")[0] for key in values if "." in key} == {arch}
    own = {
        key.split(".", 1)[1]: value for key, value in values.items() if key.startswith(arch + ".")
    }
    expected = models.build({"arch": arch, "input_shape": [8, 8, 1], "num_classes": 10, **own})
    assert model.name == expected.name == arch
    assert model.count_params() == expected.count_params()
    overridden = {"mlp": ("depth", 3), "vit": ("num_experts", 4)}
    if arch in overridden:
        key, value = overridden[arch]
        assert own[key] == value


# --- A real search under a budget ------------------------------------------------------

# Width 256 makes a .tflite of about 260 KiB, width 8 one of about 8 KiB.
TWO_SIZES_SPACE = {
    "arch": "mlp",
    "depth": 1,
    "width": {"values": [8, 256]},
    "lr": {"values": [1e-3, 3e-3]},
    "dropout": 0.0,
    "batch_size": 128,
}
MAX_KB = 40


def _search(directory, max_trials):
    return search.run_search(
        space=TWO_SIZES_SPACE,
        tuner="random",
        max_trials=max_trials,
        max_epochs=2,
        patience=1,
        seed=1,
        directory=str(directory),
        max_tflite_kb=MAX_KB,
        quantize="dynamic",
        log=lambda line: None,
    )


def _device_files(directory):
    found = {}
    for trial_dir in sorted((directory / "search").glob("trial_*")):
        path = trial_dir / budget.DEVICE_JSON
        found[trial_dir.name] = (path.read_text(), path.stat().st_mtime_ns)
    return found


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_a_search_rejects_the_largest_trials_resumes_with_their_measurements_ships_one_that_fits(
    tmp_path,
):
    directory = tmp_path / "search"
    first = _search(directory, max_trials=2)
    measured_before = _device_files(directory)
    assert len(measured_before) == 2
    # The resumed search runs one more trial and measures only that one.
    outcome = _search(directory, max_trials=3)
    assert outcome.error is None, outcome.error
    measured_after = _device_files(directory)
    assert len(measured_after) == 3
    assert {k: measured_after[k] for k in measured_before} == measured_before
    assert [row["trial"] for row in first.rows] == ["0", "1"]

    rows = search.read_trials_csv(directory / search.TRIALS_CSV)
    assert {row["width"] for row in rows} == {"8", "256"}  # 3 of the 4 combinations
    for row in rows:
        size = os.path.getsize(
            directory / "search" / f"trial_{row['trial']}" / budget.TRIAL_EXPORT_DIR
            / "model_dynamic.tflite"
        )  # fmt: skip
        assert float(row["tflite_kb"]) == pytest.approx(size / 1024)
        if row["width"] == "256":
            assert size > MAX_KB * 1024
            assert row["budget"] == f"over size: {size / 1024:.4g} KiB > {MAX_KB} KiB"
            assert float(row["oracle_score"]) < 0
        else:
            assert row["budget"] == "fits"
            assert float(row["oracle_score"]) == pytest.approx(float(row["score"]))
    with open(directory / search.BEST_TRIAL_JSON) as f:
        best_trial = json.load(f)
    fitting = [row for row in rows if row["budget"] == "fits"]
    assert best_trial["trial"] == max(fitting, key=lambda row: float(row["score"]))["trial"]
    assert best_trial["hyperparameters"]["width"] == 8

    assert outcome.best_tflite == str(directory / search.run.BEST_TFLITE)
    assert os.path.getsize(outcome.best_tflite) <= MAX_KB * 1024
    with open(directory / search.run.BEST_EXPORT_DIR / "export.json") as f:
        report = json.load(f)
    with open(outcome.best_tflite, "rb") as f, open(report["artifacts"][0]["path"], "rb") as g:
        assert f.read() == g.read()  # best.tflite is the verified export of best.keras
    assert (directory / search.reports.PARETO_PNG).stat().st_size > 0


# A float16 mlp of width 256 is about 530 KiB dense, about 200 KiB when its
# kernels are 80% zeros (sparse-encoded): only the pruned trial fits.
PRUNING_SPACE = {**TWO_SIZES_SPACE, "width": 256, "lr": 3e-3, "sparsity": {"values": [0.0, 0.8]}}
PRUNED_MAX_KB = 320


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_a_search_trades_sparsity_for_size_under_the_budget(tmp_path):
    from hlkeras import prune

    directory = tmp_path / "search"
    outcome = search.run_search(
        space=PRUNING_SPACE,
        tuner="random",
        max_trials=2,
        max_epochs=2,
        patience=1,
        seed=1,
        directory=str(directory),
        max_tflite_kb=PRUNED_MAX_KB,
        quantize="float16",
        log=lambda line: None,
    )
    assert outcome.error is None, outcome.error
    rows = {row["sparsity"]: row for row in search.read_trials_csv(directory / search.TRIALS_CSV)}
    assert set(rows) == {"0.0", "0.8"}
    assert float(rows["0.0"]["tflite_kb"]) > PRUNED_MAX_KB >= float(rows["0.8"]["tflite_kb"])
    assert rows["0.8"]["budget"] == "fits" and rows["0.0"]["budget"].startswith("over size")
    with open(directory / search.BEST_TRIAL_JSON) as f:
        assert json.load(f)["hyperparameters"]["sparsity"] == 0.8
    # The retrained best has the sparsity, and so has the file shipped.
    best = keras.saving.load_model(directory / search.BEST_MODEL)
    assert prune.sparsity(best) == pytest.approx(0.8, abs=1e-3)
    assert os.path.getsize(outcome.best_tflite) <= PRUNED_MAX_KB * 1024
