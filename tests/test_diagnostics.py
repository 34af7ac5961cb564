"""`hlkeras.diagnostics` against independent oracles on every backend: each
layer's statistics against NumPy on its output taken through a sub-model
(or the sublayer called directly), gradient norms against the analytic
softmax cross-entropy gradient, routing and attention entropies against
NumPy and Keras' own MultiHeadAttention, and the monitor's warnings on
models broken on purpose."""

import glob
import math
import os

import keras
import numpy as np
import pytest
from keras import ops

from hlkeras import HlkerasWarning
from hlkeras import diagnostics
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import MultiHeadAttention
from hlkeras.layers import TransformerBlock

RNG = np.random.default_rng(0)


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def _expected_statistics(values, zero_floor=False, bounds=None):
    """The NumPy formulas of `output_statistics`' documentation."""
    values = _numpy(values)
    units = values.reshape(-1, values.shape[-1])
    off = units <= 0 if zero_floor else units == 0
    counts, edges = np.histogram(values, bins=32)
    expected = dict(
        mean=values.mean(),
        std=values.std(),
        p01=np.percentile(values, 1),
        p50=np.percentile(values, 50),
        p99=np.percentile(values, 99),
        abs_max=np.abs(values).max(),
        dead_fraction=np.all(off, axis=0).mean(),
        counts=counts,
        edges=edges,
    )
    if bounds:
        low, high = bounds
        expected["saturated_fraction"] = np.mean((values <= low + 1e-3) | (values >= high - 1e-3))
    return expected


def _assert_statistics(stats, expected, path):
    for key, value in expected.items():
        if key == "counts":
            np.testing.assert_array_equal(stats["histogram"]["counts"], value, err_msg=path)
        elif key == "edges":
            np.testing.assert_allclose(stats["histogram"]["edges"], value, atol=1e-5)
        else:
            np.testing.assert_allclose(
                stats[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{path} {key}"
            )


def _nested_model():
    """Dense(relu) -> TransformerBlock -> a nested model (LayerNorm,
    Dense(sigmoid)) -> pooling -> softmax head."""
    inner_inputs = keras.Input((6, 16))
    normed = keras.layers.LayerNormalization(name="norm")(inner_inputs)
    gate = keras.layers.Dense(16, activation="sigmoid", name="gate")(normed)
    backbone = keras.Model(inner_inputs, gate, name="backbone")
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16, activation="relu", name="proj")(inputs)
    x = TransformerBlock(2, 32, name="block")(x)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs), backbone


def test_layer_statistics_equal_numpy_on_each_layer_output():
    model, backbone = _nested_model()
    x = RNG.normal(size=(10, 6, 8)).astype("float32")
    before = _numpy(model(x))
    stats = diagnostics.layer_statistics(model, x)

    assert {
        "proj",
        "block",
        "block/attention_norm",
        "block/ffn",
        "backbone/norm",
        "backbone/gate",
        "head",
    } <= set(stats)
    assert "pool" not in stats and "backbone" not in stats  # not hidden layers
    for name in ("proj", "block", "head"):
        output = keras.Model(model.input, model.get_layer(name).output)(x)
        _assert_statistics(
            stats[name], _expected_statistics(output, zero_floor=name == "proj"), name
        )
    # A nested model's layer, through the nested model's own sub-model.
    block_output = keras.Model(model.input, model.get_layer("block").output)(x)
    gate = keras.Model(backbone.input, backbone.get_layer("gate").output)(block_output)
    _assert_statistics(
        stats["backbone/gate"], _expected_statistics(gate, bounds=(0.0, 1.0)), "backbone/gate"
    )
    # A composite layer's sublayer, called directly on the block's input.
    proj_output = keras.Model(model.input, model.get_layer("proj").output)(x)
    normed = model.get_layer("block").attention_norm(proj_output)
    _assert_statistics(
        stats["block/attention_norm"], _expected_statistics(normed), "block/attention_norm"
    )
    # The model is left as it was: no recording call remains, same outputs.
    assert not [layer for layer in model._flatten_layers() if "call" in vars(layer)]
    np.testing.assert_array_equal(_numpy(model(x)), before)


def _dead_relu_model():
    inputs = keras.Input((5,))
    x = keras.layers.Dense(
        8, activation="relu", bias_initializer=keras.initializers.Constant(-100.0), name="dead"
    )(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def test_a_relu_layer_with_bias_minus_100_is_dead_and_warned_about():
    model = _dead_relu_model()
    x = RNG.normal(size=(16, 5)).astype("float32")
    y = RNG.integers(0, 3, 16)
    stats = diagnostics.layer_statistics(model, x)
    assert stats["dead"]["dead_fraction"] == 1.0
    assert stats["head"]["dead_fraction"] == 0.0
    lines = [
        line
        for _, line in diagnostics.findings(stats, diagnostics.gradient_statistics(model, x, y), 3)
    ]
    assert (
        "dead: 100% dead units (relu) since epoch 3: try gelu/leaky_relu or a lower --lr" in lines
    )


def test_gradient_norms_equal_the_analytic_softmax_cross_entropy_gradient():
    inputs = keras.Input((5,))
    logits = keras.layers.Dense(3, name="logits")(inputs)
    model = keras.Model(inputs, keras.layers.Activation("softmax", name="probabilities")(logits))
    x = RNG.normal(size=(12, 5)).astype("float32")
    y = RNG.integers(0, 3, 12)
    stats = diagnostics.gradient_statistics(model, x, y)

    kernel, bias = (_numpy(w) for w in model.get_layer("logits").weights)
    z = x @ kernel + bias
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    dz = (probs - np.eye(3)[y]) / len(x)  # d mean(CE) / d logits
    gradient_norm = math.sqrt(np.sum((x.T @ dz) ** 2) + np.sum(dz.sum(0) ** 2))
    weight_norm = math.sqrt(np.sum(kernel**2) + np.sum(bias**2))
    assert list(stats) == ["logits"]
    assert stats["logits"]["gradient_norm"] == pytest.approx(gradient_norm, rel=1e-4)
    assert stats["logits"]["weight_norm"] == pytest.approx(weight_norm, rel=1e-5)
    assert stats["logits"]["ratio"] == pytest.approx(gradient_norm / weight_norm, rel=1e-4)


def test_moe_expert_load_and_router_entropy_equal_numpy():
    inputs = keras.Input((4, 8))
    moe = MixtureOfExperts(num_experts=4, top_k=2, hidden_units=16, name="moe")
    model = keras.Model(inputs, moe(inputs))
    x = RNG.normal(size=(6, 4, 8)).astype("float32")
    stats = diagnostics.layer_statistics(model, x)["moe"]

    (kernel,) = (_numpy(w) for w in moe.router.weights)  # a bias-free router
    logits = x.reshape(-1, 8) @ kernel
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    load = np.bincount(chosen.ravel(), minlength=4) / chosen.size
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(stats["expert_load"], load)
    assert stats["max_expert_load"] == pytest.approx(load.max())
    assert stats["router_entropy"] == pytest.approx(
        -np.sum(probs * np.log(probs), 1).mean(), rel=1e-4
    )


def test_attention_entropy_per_head_equals_keras_mha_with_copied_weights():
    inputs = keras.Input((5, 8))
    attention = MultiHeadAttention(num_heads=2, key_dim=4, name="attention")
    model = keras.Model(inputs, attention(inputs, inputs))
    x = RNG.normal(size=(3, 5, 8)).astype("float32")
    stats = diagnostics.layer_statistics(model, x)["attention"]

    reference = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    reference(x, x)
    reference.set_weights(attention.get_weights())
    _, scores = reference(x, x, return_attention_scores=True)
    scores = _numpy(scores)
    expected = -np.sum(scores * np.log(scores), axis=-1).mean(axis=(0, 2))
    np.testing.assert_allclose(stats["attention_entropy"], expected, rtol=1e-4)


def _deep_sigmoid_mlp(depth=12):
    x = inputs = keras.Input((16,))
    for i in range(depth):
        x = keras.layers.Dense(32, activation="sigmoid", name=f"hidden_{i}")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))


def test_a_12_layer_sigmoid_mlp_warns_of_vanishing_gradients_naming_its_first_layer():
    model = _deep_sigmoid_mlp()
    x = RNG.normal(size=(32, 16)).astype("float32")
    y = RNG.integers(0, 3, 32)
    found = dict(
        diagnostics.findings(
            diagnostics.layer_statistics(model, x), diagnostics.gradient_statistics(model, x, y), 1
        )
    )
    line = found[("hidden_0", "vanishing")]
    assert (
        line.startswith("gradient norm of hidden_0 is ")
        and "of head's at epoch 1: vanishing" in line
    )


def _small_classifier():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    return model


def _fit(callbacks, x, y):
    keras.utils.set_random_seed(7)
    model = _small_classifier()
    history = model.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=callbacks
    )
    return model, history.history


class _WeightSnapshots(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.snapshots = [[_numpy(w) for w in self.model.trainable_weights]]

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append([_numpy(w) for w in self.model.trainable_weights])


def test_the_monitor_leaves_training_alone_and_records_each_epoch():
    x = RNG.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 1).astype("int32")
    _, plain = _fit([], x, y)
    snapshots = _WeightSnapshots()
    monitor = diagnostics.HiddenLayerMonitor((x[:32], y[:32]))
    model, monitored = _fit([snapshots, monitor], x, y)

    np.testing.assert_array_equal(monitored["loss"], plain["loss"])
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]
    last = monitor.history[-1]
    assert set(last["layers"]) == {"hidden", "head"} and set(last["gradients"]) == {
        "hidden",
        "head",
    }
    # The update ratio of the head over epoch 2, from the weights themselves.
    old = snapshots.snapshots[1][2:]
    new = snapshots.snapshots[2][2:]
    expected = math.sqrt(sum(np.sum((n - o) ** 2) for n, o in zip(new, old))) / math.sqrt(
        sum(np.sum(o**2) for o in old)
    )
    assert last["updates"]["head"] == pytest.approx(expected, rel=1e-5)
    assert monitor.warnings == []
    # The probe is the trained model's: its statistics are the final weights'.
    direct = diagnostics.layer_statistics(model, x[:32])
    assert last["layers"]["hidden"]["mean"] == pytest.approx(direct["hidden"]["mean"], rel=1e-6)


def test_the_monitor_warns_once_per_layer_and_condition():
    model = _dead_relu_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = RNG.normal(size=(32, 5)).astype("float32")
    y = RNG.integers(0, 3, 32)
    monitor = diagnostics.HiddenLayerMonitor((x, y))
    with pytest.warns(HlkerasWarning, match="dead: 100% dead units"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[monitor])
    assert len(monitor.history) == 3
    assert monitor.warnings == [
        "dead: 100% dead units (relu) since epoch 1: try gelu/leaky_relu or a lower --lr"
    ]


@pytest.mark.neutral
def test_the_monitor_writes_tensorboard_scalars_and_histograms(tmp_path):
    import tensorflow as tf

    model = _small_classifier()
    x = RNG.normal(size=(32, 6)).astype("float32")
    y = RNG.integers(0, 3, 32)
    monitor = diagnostics.HiddenLayerMonitor((x, y), log_dir=str(tmp_path))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    tags = set()
    for path in glob.glob(os.path.join(tmp_path, "events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert {
        "activations/hidden/mean",
        "activations/hidden",
        "gradients/head/norm",
        "updates/head/ratio",
    } <= tags


@pytest.mark.neutral
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(probe_data=np.zeros((2, 6))), "Argument `probe_data` must be a tuple `(x, y)`"),
        (
            dict(probe_data=(0, 0), every_n_epochs=0),
            "Argument `every_n_epochs` must be a positive integer. Received: every_n_epochs=0",
        ),
    ],
)
def test_bad_monitor_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        diagnostics.HiddenLayerMonitor(**kwargs)


@pytest.mark.neutral
def test_a_bad_loss_is_named():
    model = _small_classifier()
    with pytest.raises(ValueError, match="Argument `loss` must be a Keras loss name"):
        diagnostics.gradient_statistics(model, np.zeros((2, 6)), np.zeros(2), loss=[1, 2])


def test_layer_table_counts_each_layers_parameters_and_flops_by_formula():
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16, name="proj")(inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(6, 4), name="einsum")(x)
    x = MultiHeadAttention(num_heads=2, key_dim=4, name="attention")(x, x)
    x = MixtureOfExperts(num_experts=4, top_k=2, hidden_units=16, name="moe")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    x = RNG.normal(size=(4, 6, 8)).astype("float32")
    statistics = diagnostics.layer_statistics(model, x)
    rows = {row["path"]: row for row in diagnostics.layer_table(model, statistics, {})}

    tokens, projection = 6, 2 * 4 * (6 * 2 * 4)  # q/k/v: 4 inputs into 2 heads x 4
    expected_flops = {
        "proj": 2 * 8 * 16 * tokens,
        "einsum": 2 * 16 * 4 * tokens,
        # scores and weighted values per head, the q/k/v and output projections
        "attention": 2 * 2 * tokens * tokens * (4 + 4) + 3 * projection + 2 * 8 * 4 * tokens,
        # two of four experts per token (4 -> 16 -> 4) and the router (4 -> 4)
        "moe": 2 * tokens * 2 * (4 * 16 + 16 * 4) + 2 * 4 * 4 * tokens,
        "head": 2 * 24 * 3,
    }
    for path, flops in expected_flops.items():
        assert rows[path]["flops"] == flops, path
        assert rows[path]["params"] == model.get_layer(path).count_params(), path
        assert rows[path]["shape"] == list(statistics[path]["shape"])
    assert rows["attention"]["shape"] == [6, 4] and rows["head"]["shape"] == [3]


def test_a_mixed_bfloat16_model_is_measured_like_any_other():
    keras.config.set_dtype_policy("mixed_bfloat16")  # conftest restores float32
    model = _dead_relu_model()
    x = RNG.normal(size=(16, 5)).astype("float32")
    stats = diagnostics.layer_statistics(model, x)
    assert set(stats) == {"dead", "head"} and stats["dead"]["dead_fraction"] == 1.0
    head = keras.Model(model.input, model.get_layer("head").output)(x)
    _assert_statistics(stats["head"], _expected_statistics(head), "head")
