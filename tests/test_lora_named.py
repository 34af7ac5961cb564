"""Several named adapters on one model: `add_adapter`, `set_adapter`,
`save_adapters` / `load_adapters` / `merge_lora` by name. Oracles: each
adapter's outputs recorded right after it trained, reproduced exactly after
switching; a fresh adapter computes the base model."""

import os

import keras
import numpy as np
import pytest

from hlkeras import lora

RNG = np.random.default_rng(0)
VECTORS = RNG.normal(size=(16, 6)).astype("float32")


def _numpy(value):
    return np.array(keras.ops.convert_to_numpy(value))


def _predict(model, inputs=VECTORS):
    return _numpy(model(inputs, training=False))


def _pretrained(dora=False):
    inputs = keras.Input(shape=(6,), name="features")
    x = keras.layers.Dense(16, activation="relu", name="hidden_1")(inputs)
    x = keras.layers.Dense(12, activation="relu", name="hidden_2")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.set_weights([RNG.normal(size=w.shape).astype("float32") for w in model.weights])
    return model


def _train(model, targets):
    # A fresh optimizer per adapter: its moments belong to one adapter.
    model.compile(optimizer=keras.optimizers.Adam(3e-2), loss="mse")
    model.fit(VECTORS, targets, batch_size=8, epochs=5, verbose=0)
    return _predict(model)


def _two_task_model(dora=False):
    """`default` trained on task A, `b` on task B; `b` left active."""
    pretrained = _pretrained()
    model = lora.apply_lora(pretrained, rank=2, dora=dora)
    task_a, task_b = RNG.normal(size=(2, len(VECTORS), 3)).astype("float32")
    outputs_a = _train(model, task_a)
    lora.add_adapter(model, "b")
    assert lora.active_adapter(model) == "default"  # added inactive
    lora.set_adapter(model, "b")
    # A fresh adapter computes the pretrained model.
    np.testing.assert_allclose(_predict(model), _predict(pretrained), rtol=1e-5, atol=1e-5)
    outputs_b = _train(model, task_b)
    return pretrained, model, outputs_a, outputs_b


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_switching_reproduces_each_adapter_exactly(dora):
    _, model, outputs_a, outputs_b = _two_task_model(dora)
    assert lora.adapter_names(model) == ["b", "default"]
    assert not np.allclose(outputs_a, outputs_b, atol=1e-2)
    lora.set_adapter(model, "default")
    np.testing.assert_array_equal(_predict(model), outputs_a)
    lora.set_adapter(model, "b")
    np.testing.assert_array_equal(_predict(model), outputs_b)
    # The compiled predict function follows the switch (nothing rebuilt).
    predicted_b = model.predict(VECTORS, verbose=0)
    lora.set_adapter(model, "default")
    predicted_a = model.predict(VECTORS, verbose=0)
    np.testing.assert_allclose(predicted_a, outputs_a, rtol=1e-5, atol=1e-5)
    lora.set_adapter(model, "b")
    np.testing.assert_array_equal(model.predict(VECTORS, verbose=0), predicted_b)


def test_only_the_active_adapter_trains():
    _, model, outputs_a, _ = _two_task_model()
    trained_b = _predict(model)
    _train(model, RNG.normal(size=(len(VECTORS), 3)))  # b trains more
    assert not np.array_equal(_predict(model), trained_b)
    lora.set_adapter(model, "default")
    np.testing.assert_array_equal(_predict(model), outputs_a)


def test_save_load_and_merge_by_name(tmp_path):
    pretrained, model, outputs_a, outputs_b = _two_task_model()
    path_a = os.path.join(tmp_path, "a.lora.npz")
    lora.save_adapters(model, path_a, name="default")  # inactive: from the bank
    assert lora.active_adapter(model) == "b"
    np.testing.assert_array_equal(_predict(model), outputs_b)

    served = lora.apply_lora(pretrained, rank=2)
    lora.load_adapters(served, path_a, name="task_a")  # a new, inactive name
    assert lora.adapter_names(served) == ["default", "task_a"]
    np.testing.assert_allclose(_predict(served), _predict(pretrained), rtol=1e-5, atol=1e-5)
    lora.set_adapter(served, "task_a")
    np.testing.assert_array_equal(_predict(served), outputs_a)

    merged_a = lora.merge_lora(model, name="default")
    np.testing.assert_allclose(_predict(merged_a), outputs_a, rtol=1e-5, atol=1e-5)
    assert lora.active_adapter(model) == "b"
    np.testing.assert_array_equal(_predict(model), outputs_b)


def test_a_model_loaded_from_a_keras_file_takes_named_adapters(tmp_path):
    _, model, _, outputs_b = _two_task_model()
    path = os.path.join(tmp_path, "adapted.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert lora.adapter_names(reloaded) == ["default"]  # what it computes: b's values
    np.testing.assert_array_equal(_predict(reloaded), outputs_b)
    lora.add_adapter(reloaded, "fresh")
    lora.set_adapter(reloaded, "fresh")
    np.testing.assert_allclose(
        _numpy(reloaded.get_layer("hidden_1").lora_kernel_b), np.zeros((2, 16))
    )


def _weights(model):
    return [_numpy(w) for w in model.weights]


def _assert_unchanged(model, before):
    for value, variable in zip(before, model.weights):
        np.testing.assert_array_equal(_numpy(variable), value)


def test_wrong_names_and_shapes_fail_before_anything_changes(tmp_path):
    pretrained, model, _, _ = _two_task_model()
    before = _weights(model)
    with pytest.raises(ValueError, match=r"`name` must be one of .*\['b', 'default'\].*'c'"):
        lora.set_adapter(model, "c")
    with pytest.raises(ValueError, match=r"`name` must be one of .*'c'"):
        lora.merge_lora(model, name="c")
    with pytest.raises(ValueError, match=r"`name` must be one of .*'c'"):
        lora.save_adapters(model, os.path.join(tmp_path, "c.npz"), name="c")
    with pytest.raises(ValueError, match=r"`name` must be a new adapter name.*'b'"):
        lora.add_adapter(model, "b")
    with pytest.raises(ValueError, match=r"`name` must be a non-empty string"):
        lora.add_adapter(model, "")
    rank_4 = os.path.join(tmp_path, "rank4.lora.npz")
    lora.save_adapters(lora.apply_lora(pretrained, rank=4), rank_4)
    with pytest.raises(ValueError, match=r"shape \(6, 4\).*in the file but \(6, 2\)"):
        lora.load_adapters(model, rank_4, name="default")
    _assert_unchanged(model, before)
    assert lora.adapter_names(model) == ["b", "default"]
    with pytest.raises(ValueError, match="`model` has no LoRA layer"):
        lora.add_adapter(pretrained, "b")
    with pytest.raises(ValueError, match=r"`adapter_name` must be a non-empty string.*None"):
        lora.apply_lora(pretrained, adapter_name=None)


def test_switching_after_the_trainable_layers_changed_is_refused():
    _, model, _, outputs_b = _two_task_model()
    model.get_layer("head").trainable = False  # the head no longer switches
    with pytest.raises(ValueError, match=r"no longer has the layout .* Nothing was switched"):
        lora.set_adapter(model, "default")
    assert lora.active_adapter(model) == "b"
    np.testing.assert_array_equal(_predict(model), outputs_b)
