import os

import keras
import numpy as np
import pytest
from digits_testing import load_digits_arrays
from layer_testing import heavy

from hlkeras import lora
from hlkeras.layers import LoRADense

RNG = np.random.default_rng(0)
VECTORS = RNG.normal(size=(8, 6)).astype("float32")


def _numpy(value):
    return np.array(keras.ops.convert_to_numpy(value))


def _predict(model, inputs):
    return _numpy(model(inputs, training=False))


def _mlp(name_prefix=""):
    """A small trained-looking model: random non-zero biases everywhere."""
    inputs = keras.Input(shape=(6,), name="features")
    x = keras.layers.Dense(16, activation="relu", name=f"{name_prefix}hidden_1")(inputs)
    x = keras.layers.LayerNormalization(name=f"{name_prefix}norm")(x)
    x = keras.layers.Dense(12, activation="relu", name=f"{name_prefix}hidden_2")(x)
    outputs = keras.layers.Dense(3, name=f"{name_prefix}head")(x)
    model = keras.Model(inputs, outputs)
    model.set_weights([RNG.normal(size=w.shape).astype("float32") for w in model.weights])
    return model


def _randomize_adapters(model):
    # Only what trains: DoRA's kept kernel norms are derived from the kernel.
    for variable in [
        w
        for _, layer in lora.layer_paths(model)
        if not isinstance(layer, keras.Model)
        for w in lora.adapter_weights(layer)
        if w.trainable
    ]:
        variable.assign(RNG.normal(scale=0.3, size=variable.shape).astype("float32"))


def _fit(model, epochs=2):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    targets = RNG.normal(size=(len(VECTORS),) + tuple(model.output_shape[1:]))
    model.fit(VECTORS, targets, batch_size=4, epochs=epochs, verbose=0)


@keras.saving.register_keras_serializable(package="hlkeras_tests")
class LoRAProtocolProbe(keras.layers.Layer):
    """Test double for a LoRA-capable hlkeras layer (as attention will be):
    a norm and two projections; with `lora_rank` set, the projections are
    `LoRADense` and the norm is frozen, as the protocol asks."""

    def __init__(self, units, lora_rank=None, lora_alpha=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha

    def _projection(self, name):
        if self.lora_rank is None:
            return keras.layers.Dense(self.units, name=name)
        return LoRADense(self.units, rank=self.lora_rank, alpha=self.lora_alpha, name=name)

    def build(self, input_shape):
        self.norm = keras.layers.LayerNormalization(trainable=self.lora_rank is None, name="norm")
        self.first = self._projection("first")
        self.second = self._projection("second")
        self.norm.build(input_shape)
        self.first.build(input_shape)
        self.second.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, inputs):
        return self.second(keras.ops.relu(self.first(self.norm(inputs))))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"units": self.units, "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}
        )
        return config


def _probe_model():
    inputs = keras.Input(shape=(6,), name="features")
    x = LoRAProtocolProbe(8, name="block")(inputs)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.set_weights([RNG.normal(size=w.shape).astype("float32") for w in model.weights])
    return model


# apply_lora


def test_apply_lora_keeps_outputs_and_trains_only_adapters_and_head():
    model = _mlp()
    adapted = lora.apply_lora(model, rank=2)
    assert [type(layer).__name__ for layer in adapted.layers] == [
        "InputLayer",
        "LoRADense",
        "LayerNormalization",
        "LoRADense",
        "Dense",
    ]
    assert [w.path for w in adapted.trainable_weights] == [
        "hidden_1/lora_kernel_a",
        "hidden_1/lora_kernel_b",
        "hidden_2/lora_kernel_a",
        "hidden_2/lora_kernel_b",
        "head/kernel",
        "head/bias",
    ]
    assert [layer.name for layer in adapted.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(
        _predict(adapted, VECTORS), _predict(model, VECTORS), rtol=1e-6, atol=1e-6
    )
    # The original is untouched.
    assert all(type(layer) is not LoRADense for layer in model.layers)
    assert len(model.trainable_weights) == 8


def test_apply_lora_carries_the_trained_weights_and_fit_keeps_them():
    model = _mlp()
    adapted = lora.apply_lora(model, rank=2, alpha=4.0)
    hidden = adapted.get_layer("hidden_1")
    assert hidden.rank == 2 and hidden.alpha == 4.0
    assert hidden.activation == "relu"
    frozen_before = {w.path: _numpy(w) for w in adapted.non_trainable_weights}
    original = {w.path: _numpy(w) for w in model.weights}
    for path, value in frozen_before.items():
        np.testing.assert_array_equal(value, original[path])
    head_before = _numpy(adapted.get_layer("head").kernel)
    _fit(adapted)
    for w in adapted.non_trainable_weights:
        np.testing.assert_array_equal(_numpy(w), frozen_before[w.path])
    assert not np.array_equal(_numpy(adapted.get_layer("head").kernel), head_before)


def test_targets_by_name_and_by_predicate():
    model = _mlp()
    by_name = lora.apply_lora(model, rank=2, targets=["hidden_2"])
    assert [type(by_name.get_layer(n)).__name__ for n in ("hidden_1", "hidden_2")] == [
        "Dense",
        "LoRADense",
    ]
    assert not by_name.get_layer("hidden_1").trainable
    by_predicate = lora.apply_lora(model, rank=2, targets=lambda layer: layer.units >= 12)
    assert [
        type(layer).__name__ for layer in by_predicate.layers if "Dense" in type(layer).__name__
    ] == ["LoRADense", "LoRADense", "Dense"]
    # Naming the last Dense adapts it too (then no head trains in full).
    with_head = lora.apply_lora(model, rank=2, targets=["hidden_1", "head"])
    assert type(with_head.get_layer("head")) is LoRADense
    assert all("lora_kernel" in w.name for w in with_head.trainable_weights)


def test_apply_lora_on_sequential():
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(2, name="b")]
    )
    adapted = lora.apply_lora(model, rank=2)
    assert type(adapted.get_layer("a")) is LoRADense
    np.testing.assert_allclose(
        _predict(adapted, VECTORS), _predict(model, VECTORS), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"targets": ["hidden_1", "no_such_layer"]},
            r"`targets`: pattern 'no_such_layer' matches no layer .*"
            r"Layers: features, hidden_1, norm, hidden_2, head",
        ),
        (
            {"targets": ["norm*"]},
            r"pattern 'norm\*' matches only layers that cannot take an adapter: "
            r"norm \(LayerNormalization\)",
        ),
        ({"targets": 3}, r"`targets` must be None, 'all-linear', a glob pattern"),
        ({"targets": lambda layer: False}, r"`targets` selected no layer"),
        ({"rank": 0}, r"`rank`"),
        ({"alpha": 0.0}, r"`alpha`"),
        ({"dropout": -0.1}, r"`dropout`"),
    ],
    ids=["unknown-name", "not-adaptable", "bad-type", "empty", "rank", "alpha", "dropout"],
)
def test_apply_lora_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.apply_lora(_mlp(), **kwargs)


def test_apply_lora_rank_too_large_for_a_layer():
    message = r"'hidden_1': argument `rank` must be <= min\(d_in, units\) = min\(6, 16\)"
    with pytest.raises(ValueError, match=message):
        lora.apply_lora(_mlp(), rank=7)


def test_apply_lora_rejects_subclassed_models():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, inputs):
            return self.dense(inputs)

    model = Subclassed()
    model(VECTORS)
    with pytest.raises(ValueError, match="`model` must be a built functional or Sequential"):
        lora.apply_lora(model)


def test_adapted_model_saves_to_keras_file(tmp_path):
    adapted = lora.apply_lora(_mlp(), rank=2)
    _randomize_adapters(adapted)
    path = os.path.join(tmp_path, "adapted.keras")
    adapted.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        _predict(reloaded, VECTORS), _predict(adapted, VECTORS), rtol=0, atol=1e-6
    )
    # The frozen state survives the file.
    assert [w.path for w in reloaded.trainable_weights] == [
        w.path for w in adapted.trainable_weights
    ]


# Nested models and target patterns


def _nested_model():
    """A functional backbone (with a Sequential inside) used as a layer,
    then a LoRA-protocol block and a head."""
    pixels = keras.Input(shape=(6,), name="pixels")
    x = keras.layers.Dense(10, activation="relu", name="dense_1")(pixels)
    inner = keras.Sequential(
        [keras.layers.Dense(9, activation="relu", name="dense_1")], name="inner"
    )
    x = inner(x)
    x = keras.layers.Dense(8, name="dense_2")(x)
    backbone = keras.Model(pixels, x, name="backbone")
    inputs = keras.Input(shape=(6,), name="features")
    x = LoRAProtocolProbe(8, name="block")(backbone(inputs))
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.set_weights([RNG.normal(size=w.shape).astype("float32") for w in model.weights])
    return model


def _leaf_types(model):
    return {
        path: type(layer).__name__
        for path, layer in lora.layer_paths(model)
        if not isinstance(layer, (keras.Model, keras.layers.InputLayer))
    }


@pytest.mark.parametrize(
    "targets, expected",
    [
        (None, ["backbone/dense_1", "backbone/inner/dense_1", "backbone/dense_2", "block"]),
        ("all-linear", ["backbone/dense_1", "backbone/inner/dense_1", "backbone/dense_2", "block"]),
        ("backbone/*", ["backbone/dense_1", "backbone/inner/dense_1", "backbone/dense_2"]),
        ("*dense_1", ["backbone/dense_1", "backbone/inner/dense_1"]),
        (["block", "backbone/dense_?"], ["backbone/dense_1", "backbone/dense_2", "block"]),
        (lambda layer: getattr(layer, "units", 0) == 9, ["backbone/inner/dense_1"]),
    ],
    ids=["default", "all-linear", "glob-backbone", "glob-suffix", "list", "predicate"],
)
def test_targets_reach_nested_models_by_path_pattern(targets, expected):
    model = _nested_model()
    assert lora.select_targets(model, targets) == expected
    adapted = lora.apply_lora(model, rank=2, targets=targets)
    adapted_paths = [
        path for path, layer in lora.layer_paths(adapted) if lora.adapter_weights(layer)
    ]
    # Each nested model counts its own layers' adapters too.
    assert [path for path in adapted_paths if path not in ("backbone", "backbone/inner")] == (
        expected
    )
    np.testing.assert_allclose(
        _predict(adapted, VECTORS), _predict(model, VECTORS), rtol=1e-6, atol=1e-6
    )
    # Only the targets' adapters and the head train.
    layers = dict(lora.layer_paths(adapted))
    expected_trainable = [w for path in expected for w in lora.adapter_weights(layers[path])]
    expected_trainable += layers["head"].weights
    assert {id(w) for w in adapted.trainable_weights} == {id(w) for w in expected_trainable}


def test_nested_adapters_train_merge_and_round_trip(tmp_path):
    model = _nested_model()
    adapted = lora.apply_lora(model, rank=2, targets="all-linear")
    frozen = {w.path: _numpy(w) for w in adapted.non_trainable_weights}
    _fit(adapted)
    for w in adapted.non_trainable_weights:
        np.testing.assert_array_equal(_numpy(w), frozen[w.path])
    _randomize_adapters(adapted)
    expected = _predict(adapted, VECTORS)
    assert not np.allclose(expected, _predict(model, VECTORS), atol=1e-3)

    merged = lora.merge_lora(adapted)
    assert _leaf_types(merged) == _leaf_types(model)
    assert [w.shape for w in merged.trainable_weights] == [w.shape for w in model.trainable_weights]
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(_predict(merged, VECTORS), expected, rtol=1e-5, atol=1e-5)

    path = os.path.join(tmp_path, "nested.lora.npz")
    lora.save_adapters(adapted, path)
    restored = lora.apply_lora(model, rank=2, targets="all-linear")
    lora.load_adapters(restored, path)
    np.testing.assert_array_equal(_predict(restored, VECTORS), expected)
    # A model adapted at other paths refuses the file, naming the path.
    elsewhere = lora.apply_lora(model, rank=2, targets="backbone/*")
    with pytest.raises(ValueError, match=r"layer 'block' has adapter weights in the file but"):
        lora.load_adapters(elsewhere, path)


def _ffn_model():
    from hlkeras.layers import FeedForward

    inputs = keras.Input(shape=(6,), name="features")
    x = FeedForward(12, name="ffn")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["mlp", "ffn"])
def test_composite_dense_layers_take_adapters_and_merge(arch, dora):
    from hlkeras import models
    from hlkeras.layers import FeedForward
    from hlkeras.layers import ResidualBlock

    model = models.mlp((6,), 3, depth=2, width=8) if arch == "mlp" else _ffn_model()
    model.set_weights([RNG.normal(size=w.shape).astype("float32") for w in model.weights])
    adapted = lora.apply_lora(model, rank=2, targets="all-linear", dora=dora)
    composites = [
        layer for layer in adapted.layers if isinstance(layer, (ResidualBlock, FeedForward))
    ]
    assert len(composites) == (2 if arch == "mlp" else 1)
    for layer in composites:
        projections = lora.adapted_projections(layer)
        assert [(type(p), p.dora) for p in projections] == [(LoRADense, dora)] * 2
        # Only the adapters train: the norm and the shortcut are frozen.
        assert {id(w) for w in layer.trainable_weights} == {
            id(w) for w in lora.adapter_weights(layer) if w.trainable
        }
    np.testing.assert_allclose(
        _predict(adapted, VECTORS), _predict(model, VECTORS), rtol=1e-5, atol=1e-5
    )
    _randomize_adapters(adapted)
    merged = lora.merge_lora(adapted)
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(
        _predict(merged, VECTORS), _predict(adapted, VECTORS), rtol=1e-5, atol=1e-5
    )


# merge_lora


def test_merge_lora_gives_plain_dense_same_outputs_and_parameter_count():
    model = _mlp()
    adapted = lora.apply_lora(model, rank=2)
    _fit(adapted)
    _randomize_adapters(adapted)
    merged = lora.merge_lora(adapted)
    assert not any(lora.adapter_weights(layer) for layer in merged.layers)
    assert [type(layer) for layer in merged.layers] == [type(layer) for layer in model.layers]
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(
        _predict(merged, VECTORS), _predict(adapted, VECTORS), rtol=1e-5, atol=1e-5
    )
    # It really merged something: the outputs moved away from the original's.
    assert not np.allclose(_predict(merged, VECTORS), _predict(model, VECTORS), atol=1e-3)


# The LoRA protocol for hlkeras layers (attention, transformer blocks)


def test_protocol_layer_is_rebuilt_with_lora_rank_and_merged_back():
    model = _probe_model()
    adapted = lora.apply_lora(model, rank=2, alpha=3.0)
    block = adapted.get_layer("block")
    assert block.lora_rank == 2 and block.lora_alpha == 3.0
    assert [w.path for w in adapted.trainable_weights] == [
        "block/first/lora_kernel_a",
        "block/first/lora_kernel_b",
        "block/second/lora_kernel_a",
        "block/second/lora_kernel_b",
        "head/kernel",
        "head/bias",
    ]
    np.testing.assert_allclose(
        _predict(adapted, VECTORS), _predict(model, VECTORS), rtol=1e-6, atol=1e-6
    )
    _randomize_adapters(adapted)
    merged = lora.merge_lora(adapted)
    assert merged.get_layer("block").lora_rank is None
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(
        _predict(merged, VECTORS), _predict(adapted, VECTORS), rtol=1e-5, atol=1e-5
    )


@keras.saving.register_keras_serializable(package="hlkeras_tests")
class LeakyProbe(LoRAProtocolProbe):
    """Breaks protocol rule 2: its norm stays trainable next to the adapters."""

    def build(self, input_shape):
        super().build(input_shape)
        self.norm.trainable = True


def test_protocol_layer_that_leaves_a_base_weight_trainable_is_refused():
    inputs = keras.Input(shape=(6,))
    model = keras.Model(inputs, keras.layers.Dense(2)(LeakyProbe(8, name="leaky")(inputs)))
    message = r"'leaky'.*only its adapters may be trainable.*leaky/norm/gamma"
    with pytest.raises(ValueError, match=message):
        lora.apply_lora(model, rank=2)


# save_adapters / load_adapters


def test_adapter_round_trip_holds_only_adapters_and_head(tmp_path):
    model = _mlp()
    adapted = lora.apply_lora(model, rank=2)
    _fit(adapted)
    _randomize_adapters(adapted)
    path = os.path.join(tmp_path, "task.lora.npz")
    lora.save_adapters(adapted, path)
    assert os.path.exists(path)  # exactly the given path, no extra suffix
    with np.load(path) as data:
        stored = sum(data[key].size for key in data.files if key != lora.METADATA_KEY)
    adapter_and_head = sum(int(np.prod(w.shape)) for w in adapted.trainable_weights)
    assert stored == adapter_and_head
    fresh = lora.apply_lora(model, rank=2)
    lora.load_adapters(fresh, path)
    np.testing.assert_allclose(
        _predict(fresh, VECTORS), _predict(adapted, VECTORS), rtol=0, atol=1e-6
    )


def test_adapter_round_trip_through_protocol_layer(tmp_path):
    model = _probe_model()
    adapted = lora.apply_lora(model, rank=2)
    _randomize_adapters(adapted)
    path = os.path.join(tmp_path, "block.lora.npz")
    lora.save_adapters(adapted, path)
    fresh = lora.apply_lora(model, rank=2)
    lora.load_adapters(fresh, path)
    np.testing.assert_allclose(
        _predict(fresh, VECTORS), _predict(adapted, VECTORS), rtol=0, atol=1e-6
    )


def _weights_snapshot(model):
    return [_numpy(w) for w in model.weights]


@pytest.mark.parametrize(
    "make_other, message",
    [
        (
            lambda model: lora.apply_lora(model, rank=4),
            r"layer 'hidden_1' weight 'lora_kernel_a': shape \(6, 2\).*"
            r"in the file but \(6, 4\) in the model",
        ),
        (
            lambda model: lora.apply_lora(model, rank=2, targets=["hidden_2"]),
            r"layer 'hidden_1' has adapter weights in the file but is frozen",
        ),
    ],
    ids=["rank", "different-targets"],
)
def test_load_adapters_refuses_other_architectures_untouched(tmp_path, make_other, message):
    model = _mlp()
    adapted = lora.apply_lora(model, rank=2)
    _randomize_adapters(adapted)
    path = os.path.join(tmp_path, "task.lora.npz")
    lora.save_adapters(adapted, path)
    other = make_other(model)
    before = _weights_snapshot(other)
    with pytest.raises(ValueError, match=message):
        lora.load_adapters(other, path)
    for value, variable in zip(before, other.weights):
        np.testing.assert_array_equal(value, _numpy(variable))


# DoRA


def test_apply_lora_dora_keeps_outputs_trains_magnitudes_and_merges_exactly():
    model = _mlp()
    adapted = lora.apply_lora(model, rank=2, dora=True)
    assert [w.path for w in adapted.trainable_weights] == [
        "hidden_1/lora_kernel_a", "hidden_1/lora_kernel_b", "hidden_1/lora_magnitude",
        "hidden_2/lora_kernel_a", "hidden_2/lora_kernel_b", "hidden_2/lora_magnitude",
        "head/kernel", "head/bias",
    ]  # fmt: skip
    # The magnitudes start at the trained kernels' column norms: same outputs.
    trained_kernel = _numpy(model.get_layer("hidden_1").kernel)
    np.testing.assert_allclose(
        _numpy(adapted.get_layer("hidden_1").lora_magnitude),
        np.linalg.norm(trained_kernel, axis=0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        _predict(adapted, VECTORS), _predict(model, VECTORS), rtol=1e-5, atol=1e-5
    )
    _fit(adapted)
    _randomize_adapters(adapted)
    merged = lora.merge_lora(adapted)
    assert [type(layer).__name__ for layer in merged.layers[1:]] == [
        "Dense", "LayerNormalization", "Dense", "Dense"
    ]  # fmt: skip
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(
        _predict(merged, VECTORS), _predict(adapted, VECTORS), rtol=1e-5, atol=1e-5
    )


def test_dora_on_a_layer_that_takes_lora_only_is_refused():
    with pytest.raises(
        ValueError, match=r"dora=True.*LoRA only: \['block \(LoRAProtocolProbe\)'\]"
    ):
        lora.apply_lora(_probe_model(), rank=2, dora=True)


def test_dora_adapters_round_trip_and_do_not_load_into_lora_slots(tmp_path):
    model = _mlp()
    dora_model = lora.apply_lora(model, rank=2, dora=True)
    _randomize_adapters(dora_model)
    path = os.path.join(tmp_path, "task.dora.npz")
    lora.save_adapters(dora_model, path)
    fresh = lora.apply_lora(model, rank=2, dora=True)
    lora.load_adapters(fresh, path)
    np.testing.assert_allclose(
        _predict(fresh, VECTORS), _predict(dora_model, VECTORS), rtol=0, atol=1e-6
    )
    lora_model = lora.apply_lora(model, rank=2)
    before = _weights_snapshot(lora_model)
    message = "layer 'hidden_1' holds DoRA adapters in the file but LoRA adapters in the model"
    with pytest.raises(ValueError, match=message):
        lora.load_adapters(lora_model, path)
    for value, variable in zip(before, lora_model.weights):
        np.testing.assert_array_equal(value, _numpy(variable))


def test_load_adapters_refuses_a_head_of_another_shape(tmp_path):
    model = _mlp()
    adapted = lora.apply_lora(model, rank=2)
    path = os.path.join(tmp_path, "task.lora.npz")
    lora.save_adapters(adapted, path)
    other_base = keras.Model(
        model.input, keras.layers.Dense(5, name="head")(model.get_layer("hidden_2").output)
    )
    other = lora.apply_lora(other_base, rank=2)
    before = _weights_snapshot(other)
    message = r"layer 'head' weight 'kernel': shape \(12, 3\).*\(12, 5\) in the model"
    with pytest.raises(ValueError, match=message):
        lora.load_adapters(other, path)
    for value, variable in zip(before, other.weights):
        np.testing.assert_array_equal(value, _numpy(variable))


def test_save_and_load_adapters_bad_input(tmp_path):
    with pytest.raises(ValueError, match="`model` has no LoRA layer"):
        lora.save_adapters(_mlp(), os.path.join(tmp_path, "none.npz"))
    not_adapters = os.path.join(tmp_path, "plain.npz")
    np.savez(not_adapters, weights=np.zeros(3))
    with pytest.raises(ValueError, match="`path` is not an hlkeras adapter file"):
        lora.load_adapters(lora.apply_lora(_mlp(), rank=2), not_adapters)


# Fine-tune on real data: pretrain on digits 0-4, adapt to 5-9, merge, ship.


def _digits_splits():
    images, labels = load_digits_arrays()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    low, high = labels < 5, labels >= 5
    high_images, high_labels = images[high], labels[high] - 5
    split = len(high_labels) * 3 // 4
    return (
        (images[low], labels[low]),
        (high_images[:split], high_labels[:split]),
        (high_images[split:], high_labels[split:]),
    )


def _accuracy(model, images, labels):
    return float(np.mean(np.argmax(_predict(model, images), axis=-1) == labels))


def _fine_tune_on_digits():
    pretrain, train, test = _digits_splits()
    inputs = keras.Input(shape=(8, 8, 1), name="pixels")
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(64, activation="relu", name="hidden_1")(x)
    x = keras.layers.Dense(32, activation="relu", name="hidden_2")(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    pretrained = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    pretrained.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    pretrained.fit(*pretrain, batch_size=128, epochs=4, verbose=0)

    adapted = lora.apply_lora(pretrained, rank=4)
    features = adapted.get_layer("hidden_2").output
    new_head = keras.layers.Dense(5, name="new_head")(features)
    fine_tuned = keras.Model(adapted.input, new_head)
    fine_tuned.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    fine_tuned.fit(*train, batch_size=128, epochs=6, verbose=0)
    return pretrained, fine_tuned, lora.merge_lora(fine_tuned), test


@heavy
def test_digits_fine_tune_then_merge_keeps_accuracy():
    pretrained, fine_tuned, merged, (images, labels) = _fine_tune_on_digits()
    # The adapters trained and the base did not.
    for name in ("hidden_1", "hidden_2"):
        np.testing.assert_array_equal(
            _numpy(fine_tuned.get_layer(name).kernel), _numpy(pretrained.get_layer(name).kernel)
        )
    adapted_accuracy = _accuracy(fine_tuned, images, labels)
    assert adapted_accuracy > 0.8, f"fine-tuned accuracy {adapted_accuracy:.3f} on digits 5-9"
    assert not any(isinstance(layer, LoRADense) for layer in merged.layers)
    np.testing.assert_allclose(
        _predict(merged, images), _predict(fine_tuned, images), rtol=1e-5, atol=1e-5
    )
    assert _accuracy(merged, images, labels) == adapted_accuracy


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_digits_fine_tuned_merged_model_exports_to_tflite_builtins():
    from hlkeras import export

    _, fine_tuned, merged, (images, labels) = _fine_tune_on_digits()
    tflite_logits = export.run_tflite(export.model_to_tflite(merged), images)
    np.testing.assert_allclose(tflite_logits, _predict(fine_tuned, images), rtol=0, atol=1e-4)
    tflite_accuracy = float(np.mean(np.argmax(tflite_logits, axis=-1) == labels))
    assert tflite_accuracy == _accuracy(fine_tuned, images, labels)


def test_docstring_examples_run():
    import doctest

    import hlkeras.layers.lora_dense

    for module in (hlkeras.layers.lora_dense, lora):
        result = doctest.testmod(module, extraglobs={"keras": keras})
        assert result.attempted > 0 and result.failed == 0, module.__name__


def _unnamed_nested_model():
    """Nested two deep with unnamed `keras.Input`s and auto-named layers, as
    users write them; every name depends on what the session built before."""
    deep_inputs = keras.Input((6,))
    deep = keras.Model(deep_inputs, keras.layers.Dense(8, activation="relu")(deep_inputs))
    inner_inputs = keras.Input((6,))
    inner = keras.Model(inner_inputs, keras.layers.Dense(5)(deep(inner_inputs)), name="backbone")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inner(inputs)))
    model.set_weights([RNG.normal(size=w.shape).astype("float32") for w in model.weights])
    return model


def test_nested_models_with_unnamed_inputs_keep_their_paths_through_lora(tmp_path):
    _mlp(), _unnamed_nested_model()  # other models first: other auto-names
    model = _unnamed_nested_model()
    paths = [path for path, _ in lora.layer_paths(model)]
    adapted = lora.apply_lora(model, rank=2, targets="backbone/*")
    assert [path for path, _ in lora.layer_paths(adapted)] == paths
    np.testing.assert_allclose(_predict(adapted, VECTORS), _predict(model, VECTORS), atol=1e-6)
    _randomize_adapters(adapted)
    # Oracle of the merge: the adapted model's own outputs.
    merged = lora.merge_lora(adapted)
    assert [path for path, _ in lora.layer_paths(merged)] == paths
    np.testing.assert_allclose(_predict(merged, VECTORS), _predict(adapted, VECTORS), atol=1e-5)
    # An adapter file and a named adapter round-trip on a fresh adaptation.
    lora.save_adapters(adapted, tmp_path / "a.lora.npz")
    again = lora.apply_lora(model, rank=2, targets="backbone/*")
    lora.add_adapter(again, "other")
    lora.set_adapter(again, "other")
    lora.load_adapters(again, tmp_path / "a.lora.npz")
    np.testing.assert_allclose(_predict(again, VECTORS), _predict(adapted, VECTORS), atol=1e-6)


def test_the_protocol_is_a_registered_layer_with_a_lora_rank_key_not_a_keras_built_in():
    # Keras' Dense and EinsumDense with Keras' own LoRA have `lora_rank` in
    # their configs too, but they are built-ins, never rebuilt as protocol layers.
    einsum = keras.layers.EinsumDense("ab,bc->ac", output_shape=4, lora_rank=2)
    dense = keras.layers.Dense(4, lora_rank=2)
    assert "lora_rank" in einsum.get_config() and "lora_rank" in dense.get_config()
    assert not lora.follows_lora_protocol(einsum)
    assert not lora.follows_lora_protocol(dense)
    # A user's registered layer follows it, whatever its package.
    assert keras.saving.get_registered_name(LoRAProtocolProbe) == "hlkeras_tests>LoRAProtocolProbe"
    assert lora.follows_lora_protocol(LoRAProtocolProbe(4))
