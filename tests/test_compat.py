"""Each private Keras / KerasTuner / LiteRT API that `hlkeras._compat` wraps still does
what hlkeras relies on. A failure here means an upstream release changed it:
fix `_compat.py`, not the callers."""

import os

import keras
import pytest

from hlkeras import _compat
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import TransformerBlock


def test_sublayers_reaches_layers_nested_in_layers_and_models():
    inner_inputs = keras.Input((4, 8))
    block = TransformerBlock(2, 16, num_experts=2, name="block")
    inner = keras.Model(inner_inputs, block(inner_inputs), name="inner")
    inputs = keras.Input((4, 8))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="head")(inner(inputs)))

    found = _compat.sublayers(outer)
    names = [layer.name for layer in found]
    assert {"inner", "block", "block_moe", "head"} <= set(names)
    assert outer not in found
    assert outer in _compat.sublayers(outer, include_self=True)
    moe_layers = [layer for layer in found if isinstance(layer, MixtureOfExperts)]
    assert [layer.name for layer in moe_layers] == ["block_moe"]
    direct = [layer.name for layer in _compat.sublayers(outer, recursive=False)]
    assert "inner" in direct and "head" in direct and "block" not in direct


def test_keras_mask_helpers_attach_read_and_clear_a_mask():
    tensor = keras.ops.ones((2, 3, 4))
    mask = keras.ops.convert_to_tensor([[True, True, False], [True, False, False]])
    _compat.set_keras_mask(tensor, mask)
    assert keras.ops.convert_to_numpy(_compat.get_keras_mask(tensor)).tolist() == [
        [True, True, False],
        [True, False, False],
    ]
    _compat.set_keras_mask(tensor, None)
    assert _compat.get_keras_mask(tensor) is None


def test_lora_base_kernel_is_the_frozen_kernel_variable():
    dense = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3))
    dense.build((None, 5, 4))
    before = keras.ops.convert_to_numpy(dense.kernel)
    dense.enable_lora(2)
    kernel = _compat.lora_base_kernel(dense)
    assert isinstance(kernel, keras.Variable) and not kernel.trainable
    assert kernel.shape == (4, 2, 3)
    assert (keras.ops.convert_to_numpy(kernel) == before).all()


def test_is_graph_model_tells_functional_and_sequential_from_subclassed():
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    class Subclassed(keras.Model):
        def call(self, inputs):
            return inputs

    assert _compat.is_graph_model(functional)
    assert _compat.is_graph_model(sequential)
    assert not _compat.is_graph_model(Subclassed())


@pytest.mark.backends("tensorflow")
def test_tflite_op_details_lists_every_op_by_name():
    from ai_edge_litert.interpreter import Interpreter

    from hlkeras import export

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(2)(inputs)))
    interpreter = Interpreter(model_content=export.model_to_tflite(model))
    names = [op["op_name"] for op in _compat.tflite_op_details(interpreter)]
    assert "FULLY_CONNECTED" in names and "SOFTMAX" in names


# --- KerasTuner ----------------------------------------------------------------


def test_kerastuner_role_follows_the_kerastuner_environment(monkeypatch):
    for name in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert _compat.kerastuner_role() is None
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    assert _compat.kerastuner_role() == "chief"
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "worker3")
    assert _compat.kerastuner_role() == "worker"


def test_trial_metrics_takes_each_metric_at_the_objectives_best_epoch():
    import keras_tuner as kt

    history = keras.callbacks.History()
    history.history = {"val_accuracy": [0.5, 0.9, 0.7], "val_loss": [1.0, 0.2, 0.1]}
    history.epoch = [0, 1, 2]
    metrics = _compat.trial_metrics([history], kt.Objective("val_accuracy", "max"))
    assert metrics == {"val_accuracy": 0.9, "val_loss": 0.2}


def _tiny_random_tuner(directory, max_trials=1):
    """A one-trial search through `TunerOverrides` (without it, every trial
    fails on the TF backend importing `tensorboard`)."""
    import keras_tuner as kt

    class TinyHyperModel(kt.HyperModel):
        def declare_hyperparameters(self, hp):
            hp.Choice("units", [1, 2])

        def build(self, hp):
            inputs = keras.Input((2,))
            model = keras.Model(inputs, keras.layers.Dense(hp.Choice("units", [1, 2]))(inputs))
            model.compile("sgd", "mse")
            return model

    class TinyTuner(_compat.TunerOverrides, kt.RandomSearch):
        pass

    return TinyTuner(
        TinyHyperModel(),
        objective="loss",
        max_trials=max_trials,
        directory=str(directory),
        project_name="p",
    )


def test_save_tuner_state_with_routes_every_state_file_through_the_given_writer(tmp_path):
    import json

    import numpy as np

    tuner = _tiny_random_tuner(tmp_path)
    written = []

    def save_json(path, state):
        written.append(os.path.relpath(path, tmp_path / "p"))
        with open(path, "w") as f:
            json.dump(state, f)

    _compat.save_tuner_state_with(tuner, save_json)
    x = np.zeros((4, 2), "float32")
    tuner.search(x, x[:, :1], epochs=1, verbose=0)
    assert {"oracle.json", "tuner0.json", os.path.join("trial_0", "trial.json")} <= set(written)
    # KerasTuner reloads what the writer wrote.
    reloaded = _tiny_random_tuner(tmp_path)
    assert reloaded.oracle.trials["0"].status == "COMPLETED"


def test_record_only_running_trials_as_ongoing_drops_finished_ones(tmp_path):
    tuner = _tiny_random_tuner(tmp_path)
    oracle = tuner.oracle
    _compat.record_only_running_trials_as_ongoing(oracle)
    trial = oracle.create_trial("tuner0")
    assert oracle.get_state()["ongoing_trials"] == {"tuner0": trial.trial_id}
    trial.status = "COMPLETED"  # as `end_trial` sets it before its save
    assert oracle.get_state()["ongoing_trials"] == {}


def test_retry_orphaned_running_trials_reruns_a_trial_oracle_json_missed(tmp_path):
    tuner = _tiny_random_tuner(tmp_path, max_trials=2)
    oracle = tuner.oracle
    first = oracle.create_trial("tuner0")
    oracle.update_trial(first.trial_id, {"loss": 1.0})
    first.status = "COMPLETED"
    oracle.end_trial(first)
    tuner.save()  # tuner0.json: a new tuner in the directory reloads
    saved = (tmp_path / "p" / "oracle.json").read_bytes()
    second = oracle.create_trial("tuner0")
    # Killed after create_trial wrote the trial's file, before oracle.json.
    (tmp_path / "p" / "oracle.json").write_bytes(saved)
    reloaded = _tiny_random_tuner(tmp_path, max_trials=2).oracle
    assert reloaded.trials[second.trial_id].status == "RUNNING"
    _compat.retry_orphaned_running_trials(reloaded)
    assert reloaded.create_trial("tuner0").trial_id == second.trial_id


def test_the_kerastuner_internals_hlkeras_serves_and_overrides_still_exist():
    """`serve_oracle` and `TunerOverrides` rely on these names; an override of
    a renamed method would silently stop applying."""
    import keras_tuner as kt
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    assert callable(oracle_chief.OracleServicer) and callable(oracle_chief.exit_chief)
    assert hasattr(protos.get_service_grpc(), "add_OracleServicer_to_server")
    for name in ("_populate_initial_space", "_configure_tensorboard_dir"):
        assert callable(getattr(kt.Tuner, name)), name
