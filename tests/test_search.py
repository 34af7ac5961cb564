"""Tests of hlkeras.search: the space table and its overrides, the
HyperModel's mapping to `hlkeras.models.build`, and a tiny search with a
failing trial, its reports and the retrained best model."""

import json
import math
import os

import keras
import keras_tuner as kt
import numpy as np
import pytest
from digits_testing import digits_mlp_search_config
from digits_testing import load_digits_arrays

from hlkeras import data
from hlkeras import models
from hlkeras import prune
from hlkeras import search


def _declared(space):
    hp = kt.HyperParameters()
    for key, entry in space.items():
        search.declare(hp, key, entry)
    return {p.name: p for p in hp.space}


# --- Space overrides ---------------------------------------------------------------


@pytest.mark.neutral
def test_overrides_narrow_fix_and_choose_in_kerastuner_terms():
    space = search.resolve_space(
        "mlp",
        {
            "depth": [2, 6],
            "lr": {"min": 1e-4, "max": 3e-3, "log": True},
            "width": {"values": [64, 128]},
            "dropout": 0.1,
            "arch": "mlp",
        },
    )
    declared = _declared(space)
    depth = declared["depth"]
    assert isinstance(depth, kt.engine.hyperparameters.Int)
    assert (depth.min_value, depth.max_value) == (2, 6)
    lr = declared["lr"]
    assert isinstance(lr, kt.engine.hyperparameters.Float)
    assert (lr.min_value, lr.max_value, lr.sampling) == (1e-4, 3e-3, "log")
    assert declared["width"].values == [64, 128]
    assert isinstance(declared["dropout"], kt.engine.hyperparameters.Fixed)
    assert declared["dropout"].value == 0.1
    # Keys left alone keep the table's defaults.
    assert space["batch_size"] == search.parse_entry(
        "batch_size", search.SEARCH_SPACES["mlp"]["batch_size"]
    )


@pytest.mark.neutral
def test_a_narrowed_range_keeps_the_tables_log_scale():
    space = search.resolve_space("mlp", {"lr": [1e-4, 1e-3]})
    assert space["lr"]["log"] is True
    assert _declared(space)["lr"].sampling == "log"


@pytest.mark.neutral
def test_toml_json_and_dict_give_the_same_space(tmp_path):
    overrides = {
        "arch": "resnet",
        "depth": [1, 2],
        "lr": {"min": 1e-4, "max": 1e-3, "log": True},
        "width": {"values": [8, 16]},
    }
    toml_path = tmp_path / "space.toml"
    toml_path.write_text(
        'arch = "resnet"\ndepth = [1, 2]\nlr = {min = 1e-4, max = 1e-3, log = true}\n'
        "width = {values = [8, 16]}\n"
    )
    json_path = tmp_path / "space.json"
    json_path.write_text(json.dumps(overrides))
    expected = search.resolve_space("resnet", overrides)
    assert search.resolve_space("resnet", search.load_space(str(toml_path))) == expected
    assert search.resolve_space("resnet", search.load_space(str(json_path))) == expected


@pytest.mark.neutral
@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"dpeth": 3}, "'dpeth'"),
        ({"depth": [1, 2, 3]}, "'depth'"),
        ({"depth": [4, 2]}, "'depth'"),
        ({"depth": [1.5, 3]}, "'depth'"),
        ({"depth": {"min": 1, "max": 3, "stride": 2}}, "'depth'"),
        ({"depth": {"values": []}}, "'depth'"),
        ({"width": {"values": [32, 32]}}, "'width'"),
        ({"lr": {"min": 0.0, "max": 1e-2, "log": True}}, "'lr'"),
        ({"lr": {"min": 1e-4, "max": 1e-2, "log": "yes"}}, "'lr'"),
        ({"dropout": {"min": 0.0, "max": 0.5, "step": -0.1}}, "'dropout'"),
        ({"dropout": None}, "'dropout'"),
        ({"input_shape": [8, 8, 1]}, "'input_shape'"),
        ({"arch": "transformer"}, "'arch'"),
        ({"arch": "resnet"}, "'arch'"),
    ],
)
def test_malformed_space_names_the_key(overrides, named):
    with pytest.raises(ValueError, match=named):
        search.resolve_space("mlp", overrides)


@pytest.mark.neutral
def test_a_space_file_that_does_not_parse_is_a_value_error(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text("depth = [2, \n")
    with pytest.raises(ValueError, match="does not parse"):
        search.load_space(str(path))
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        search.load_space(str(tmp_path / "space.yaml"))
    with pytest.raises(ValueError, match="does not exist"):
        search.load_space(str(tmp_path / "missing.json"))


# --- The HyperModel ---------------------------------------------------------------


def test_build_is_models_build_of_the_sampled_spec_compiled_at_the_sampled_lr():
    hypermodel = search.SpecHyperModel(
        "mlp",
        (8, 8, 1),
        10,
        {"depth": 2, "width": 24, "dropout": 0.0, "lr": 2e-3, "weight_decay": 0.0},
    )
    model = hypermodel.build(kt.HyperParameters())
    reference = models.build(
        {
            "arch": "mlp",
            "input_shape": [8, 8, 1],
            "num_classes": 10,
            "depth": 2,
            "width": 24,
            "dropout": 0.0,
        }
    )
    assert [layer.get_config() | {"name": ""} for layer in model.layers] == [
        layer.get_config() | {"name": ""} for layer in reference.layers
    ]
    assert model.count_params() == reference.count_params()
    assert math.isclose(
        float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 2e-3, rel_tol=1e-6
    )


def test_fit_trains_with_the_sampled_batch_size():
    images, labels = load_digits_arrays()
    images, labels = images[:100], labels[:100]
    hypermodel = search.SpecHyperModel(
        "mlp", (8, 8, 1), 10, {"depth": 1, "width": 8, "batch_size": {"values": [32, 64]}}
    )
    hp = kt.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    hp.values["batch_size"] = 32
    model = hypermodel.build(hp)

    class CountBatches(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            CountBatches.batches += 1

    hypermodel.fit(hp, model, images, labels, epochs=1, verbose=0, callbacks=[CountBatches()])
    assert CountBatches.batches == math.ceil(100 / 32)


def test_vit_space_maps_every_key_to_the_builder(monkeypatch):
    """The vit space works once `build({"arch": "vit", ...})` exists; a stand-in
    builder with vit's keyword arguments shows what it will receive."""
    received = {}

    def vit(
        input_shape,
        num_classes,
        *,
        depth=2,
        width=64,
        num_heads=2,
        patch_size=2,
        dropout=0.0,
        num_experts=0,
        top_k=2,
    ):
        received.update(
            depth=depth,
            width=width,
            num_heads=num_heads,
            patch_size=patch_size,
            dropout=dropout,
            num_experts=num_experts,
            top_k=top_k,
        )
        if width % num_heads:
            raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
        inputs = keras.Input(input_shape)
        outputs = keras.layers.Dense(num_classes, activation="softmax")(
            keras.layers.Flatten()(inputs)
        )
        return keras.Model(inputs, outputs)

    monkeypatch.setitem(models.ARCHITECTURES, "vit", vit)
    hypermodel = search.SpecHyperModel("vit", (8, 8, 1), 10, {"num_heads": 4, "num_experts": 4})
    hp = kt.HyperParameters()
    hypermodel.build(hp)
    expected = {key: hp.values[key] for key in received}
    assert received == expected
    assert (received["num_heads"], received["num_experts"]) == (4, 4)
    assert set(search.SEARCH_SPACES["vit"]) >= {
        "num_heads",
        "num_experts",
        "top_k",
        "patch_size",
    }
    bad = search.SpecHyperModel("vit", (8, 8, 1), 10, {"width": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="divisible"):
        bad.build(kt.HyperParameters())


def test_a_directory_with_another_search_refuses_and_says_why(tmp_path):
    config = digits_mlp_search_config(max_epochs=2)
    assert search.check_search_dir(str(tmp_path), config) is False
    assert search.check_search_dir(str(tmp_path), config) is True
    other_space = search.resolve_space("mlp", {"depth": [1, 2]})
    with pytest.raises(ValueError, match=r"space differs in \['depth'\]"):
        search.check_search_dir(str(tmp_path), {**config, "space": other_space})
    with pytest.raises(ValueError, match="tuner='random', this run asks for 'hyperband'"):
        search.check_search_dir(str(tmp_path), {**config, "tuner": "hyperband"})


# --- A tiny search ------------------------------------------------------------------


@pytest.mark.slow
def test_search_records_a_failed_trial_goes_on_and_retrains_the_best(tmp_path):
    images, labels = load_digits_arrays()
    x_train, y_train = images[:400], labels[:400]
    x_val, y_val = images[1500:1600], labels[1500:1600]
    # depth 0 makes `mlp` raise: that trial fails and the search goes on.
    hypermodel = search.SpecHyperModel(
        "mlp",
        (8, 8, 1),
        10,
        {"depth": {"values": [0, 1]}, "width": 8, "dropout": 0.0, "batch_size": 128, "lr": 3e-3},
        num_train=len(x_train),
        epochs=1,
    )
    directory = str(tmp_path)
    tuner = search.make_tuner("random", hypermodel, directory=directory, max_trials=2, seed=1)
    search.run_trials(tuner, x_train, y_train, validation_data=(x_val, y_val), epochs=1)
    rows, best = search.write_reports(tuner, hypermodel, directory)

    written = search.read_trials_csv(os.path.join(directory, search.TRIALS_CSV))
    by_depth = {int(row["depth"]): row for row in written}
    assert set(by_depth) == {0, 1}
    assert by_depth[0]["status"] == "FAILED"
    assert "depth" in by_depth[0]["error"] and "ValueError" in by_depth[0]["error"]
    completed = by_depth[1]
    assert completed["status"] == "COMPLETED" and completed["epochs"] == "1"
    assert float(completed["seconds"]) > 0
    # The recorded score is the accuracy of the trial's saved checkpoint.
    trial = tuner.oracle.trials[completed["trial"]]
    checkpoint = tuner.load_model(trial)
    _, accuracy = checkpoint.evaluate(x_val, y_val, verbose=0)
    assert float(completed["score"]) == pytest.approx(accuracy, abs=1e-6)
    assert os.path.getsize(os.path.join(directory, search.TRIALS_PNG)) > 0

    with open(os.path.join(directory, search.BEST_SPEC_JSON)) as f:
        best_spec = json.load(f)
    assert best_spec == models.resolve_spec(
        {
            "arch": "mlp",
            "input_shape": [8, 8, 1],
            "num_classes": 10,
            "depth": 1,
            "width": 8,
            "dropout": 0.0,
        }
    )
    train_ds, val_ds, _, _ = data.load(
        "digits", batch_size=best["batch_size"], data_dir=str(tmp_path / "tfds")
    )
    search.retrain_best(hypermodel, best, train_ds.take(2), val_ds, directory, epochs=1)
    retrained = keras.saving.load_model(os.path.join(directory, search.BEST_MODEL), safe_mode=True)
    assert retrained.count_params() == models.build(best_spec).count_params()
    probabilities = retrained.predict(x_val[:4], verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tuner_name", ["hyperband", "bayesian"])
def test_hyperband_and_bayesian_search_the_real_vit_builder(tmp_path, tuner_name):
    images, labels = load_digits_arrays()
    x_train, y_train = images[:256], labels[:256]
    x_val, y_val = images[1500:1564], labels[1500:1564]
    space = {
        "depth": 1,
        "width": 8,
        "num_heads": 2,
        "num_experts": {"values": [0, 2]},
        "dropout": 0.0,
        "batch_size": 64,
        "lr": 3e-3,
    }
    hypermodel = search.SpecHyperModel("vit", (8, 8, 1), 10, space, num_train=256, epochs=2)
    directory = str(tmp_path)
    tuner = search.make_tuner(
        tuner_name, hypermodel, directory=directory, max_trials=2, max_epochs=2, seed=1
    )
    search.run_trials(tuner, x_train, y_train, validation_data=(x_val, y_val), epochs=2)
    rows, best = search.write_reports(tuner, hypermodel, directory)

    written = search.read_trials_csv(os.path.join(directory, search.TRIALS_CSV))
    assert written and all(row["status"] == "COMPLETED" for row in written)
    assert {int(row["num_experts"]) for row in written} <= {0, 2}
    assert all(1 <= int(row["epochs"]) <= 2 for row in written)
    # The reported best is the oracle's best trial, and the best score in the CSV.
    best_trial = tuner.oracle.get_best_trials(1)[0]
    assert best["num_experts"] == best_trial.hyperparameters.values["num_experts"]
    assert max(float(row["score"]) for row in written) == pytest.approx(best_trial.score)


@pytest.mark.slow
def test_a_search_on_a_csv_normalizes_features_inside_every_model(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(50.0, 10.0, size=(120, 3))
    labels = (features[:, 0] > 50).astype(int)
    path = tmp_path / "table.csv"
    rows = ["a,b,c,kind"] + [f"{a},{b},{c},{y}" for (a, b, c), y in zip(features, labels)]
    path.write_text("\n".join(rows) + "\n")
    space = {"depth": 1, "width": 8, "dropout": 0.0, "batch_size": 32, "lr": 3e-3}
    outcome = search.run_search(
        data=str(path), label="kind", space=space, tuner="random", max_trials=1,
        max_epochs=1, directory=str(tmp_path / "search"),
    )  # fmt: skip
    assert outcome.error is None
    _, _, _, info = data.load_path(path, label="kind")
    assert outcome.best_spec["feature_mean"] == pytest.approx(info.feature_mean)
    best = keras.saving.load_model(outcome.best_path, safe_mode=True)
    normalize = best.get_layer("normalize")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(normalize.mean).ravel(), info.feature_mean, rtol=1e-5
    )
    with pytest.raises(
        search.SearchError,
        match=r"--arch vit takes images, but the data is a table \(use --arch mlp\)",
    ):
        search.run_search(data=str(path), label="kind", arch="vit", directory=str(tmp_path / "s2"))


@pytest.mark.slow
def test_a_search_on_texts_saves_the_tokenizer_its_trials_used(tmp_path):
    from texts_testing import write_keyword_csv

    from hlkeras import predict
    from hlkeras.data import texts

    path = tmp_path / "tickets.csv"
    write_keyword_csv(path, 300)
    space = {"encoder": "gru", "depth": 1, "width": 16, "dropout": 0.0, "batch_size": 32}
    outcome = search.run_search(
        data=str(path), text_column="text", space=space, tuner="random", max_trials=1,
        max_epochs=1, directory=str(tmp_path / "search"),
    )  # fmt: skip
    assert outcome.error is None and outcome.best_spec["arch"] == "text"
    _, _, _, info = data.load_path(path, text_column="text")
    saved = texts.Tokenizer.load(tmp_path / "search" / texts.VOCABULARY_FILE)
    assert saved.vocabulary == info.vocabulary
    assert outcome.best_spec["vocabulary_size"] == saved.vocabulary_size
    # hlkeras predict on best.keras finds the tokenizer and the class names.
    predictor = predict.load_predictor(outcome.best_path)
    assert predictor.class_names == ["billing", "sales", "tech"]
    assert predictor.tokenizer.vocabulary == saved.vocabulary


# --- Pruning as a hyperparameter -------------------------------------------------


def test_a_sparsity_value_prunes_the_trial_to_it_within_the_first_epoch():
    images, labels = load_digits_arrays()
    images, labels = images[:128], labels[:128]
    hypermodel = search.SpecHyperModel(
        "mlp", (8, 8, 1), 10, {"depth": 1, "width": 32, "sparsity": 0.75, "batch_size": 16}
    )
    hp = kt.HyperParameters()
    model = hypermodel.build(hp)
    dense_zeros = prune.sparsity(model)
    hypermodel.fit(hp, model, images, labels, epochs=1, verbose=0)
    assert dense_zeros == 0.0 and prune.sparsity(model) == pytest.approx(0.75, abs=1e-3)
    # The head keeps its weights (pruning's default targets).
    assert np.all(keras.ops.convert_to_numpy(model.get_layer("head").kernel) != 0)


def test_sparsity_is_shared_by_every_arch_and_checked():
    space = search.resolve_space("mlp,vit", {"sparsity": {"values": [0.0, 0.8]}})
    assert space["sparsity"] == {"values": [0.0, 0.8]} and "vit.sparsity" not in space
    with pytest.raises(ValueError, match=r"space\['sparsity'\] takes fractions in \[0, 1\)"):
        search.resolve_space("mlp", {"sparsity": {"values": [0.5, 1.0]}})
    assert search.trial_pruning({"sparsity": 0.0}, 10) == []
