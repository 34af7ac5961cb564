import math
import tempfile

import keras
import numpy as np
import pytest
from layer_testing import heavy
from layer_testing import run_layer_test
from moe_testing import layer_weights
from moe_testing import np_kept
from moe_testing import np_moe
from moe_testing import np_route
from moe_testing import randomize_biases
from moe_testing import to_numpy

from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import moe_ops

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(0)
SEQUENCES = RNG.normal(size=(4, 5, 6)).astype("float32")
VECTORS = RNG.normal(size=(8, 6)).astype("float32")


# --- the layer contract -----------------------------------------------------------


@pytest.mark.parametrize(
    "init_kwargs, inputs, expected_shape",
    [
        # capacity_factor=2 keeps every token here: with drops, a bfloat16
        # rounding that flips one routing choice can change which later
        # token is dropped, and the bfloat16 parity check would compare two
        # different (both correct) routings.
        ({"num_experts": 4, "hidden_units": 8, "capacity_factor": 2.0}, SEQUENCES, (4, 5, 6)),
        (
            {
                "num_experts": 3,
                "hidden_units": 8,
                "capacity_factor": None,
                "top_k": 1,
                "activation": "relu",
                "output_units": 3,
                "dropout": 0.1,
                "router_jitter": 0.1,
            },
            VECTORS,
            (8, 3),
        ),
    ],
    ids=["capacity-sequences", "dropless-top1-vectors-projection-jitter"],
)
@heavy
def test_moe_contract(init_kwargs, inputs, expected_shape):
    run_layer_test(MixtureOfExperts, init_kwargs, inputs, expected_output_shape=expected_shape)


# --- oracle tests ---------------------------------------------------------------


@pytest.mark.parametrize(
    "capacity_factor, top_k, activation, output_units",
    [(100.0, 2, "gelu", None), (None, 2, "relu", 3), (None, 3, "gelu", None)],
    ids=["capacity-no-drops", "dropless-relu-projection", "dropless-top3"],
)
def test_equals_naive_all_experts_reference_when_nothing_drops(
    capacity_factor, top_k, activation, output_units
):
    layer = MixtureOfExperts(
        4,
        8,
        top_k=top_k,
        capacity_factor=capacity_factor,
        activation=activation,
        output_units=output_units,
    )
    layer.build(SEQUENCES.shape)
    randomize_biases(layer)
    output = to_numpy(layer(SEQUENCES))
    tokens = SEQUENCES.reshape(-1, 6)
    reference = np_moe(tokens, layer_weights(layer), top_k, activation)
    np.testing.assert_allclose(output.reshape(len(tokens), -1), reference, rtol=1e-5, atol=1e-5)


def test_per_expert_matmuls_equal_the_batched_matmul(monkeypatch):
    """The export trace's layout (`moe_ops.per_expert_matmuls`: one 2-D
    matmul per expert, which TFLite runs as FULLY_CONNECTED) computes what
    the batched matmul computes (tested against NumPy above and below), in
    capacity mode with drops (capacity 2 of 5 tokens, top-1)."""
    monkeypatch.setattr(MixtureOfExperts, "_runs_grouped_eager", lambda *_: False)
    per_expert_calls = []
    per_expert_matmul = moe_ops._per_expert_matmul
    monkeypatch.setattr(
        moe_ops,
        "_per_expert_matmul",
        lambda *args: per_expert_calls.append(1) or per_expert_matmul(*args),
    )
    layer = MixtureOfExperts(4, 8, top_k=1, capacity_factor=1.0, output_units=3)
    layer.build(SEQUENCES.shape)
    randomize_biases(layer)
    batched = to_numpy(layer(SEQUENCES))
    assert per_expert_calls == [], "outside the context, the batched matmul"
    with moe_ops.per_expert_matmuls():
        per_expert = to_numpy(layer(SEQUENCES))
    assert len(per_expert_calls) == 2  # the hidden and the output kernel
    assert np.mean(np.all(batched == 0.0, axis=-1)) > 0, "premise: some tokens dropped"
    np.testing.assert_allclose(per_expert, batched, rtol=1e-6, atol=1e-6)


def np_kept_per_example(expert_index, num_experts, capacity, group_size):
    """The slot rule applied to each example's tokens on its own."""
    return np.concatenate(
        [
            np_kept(expert_index[start : start + group_size], num_experts, capacity)
            for start in range(0, len(expert_index), group_size)
        ]
    )


def test_tiny_capacity_drops_exactly_the_numpy_slot_rule_per_example():
    num_experts, top_k, capacity_factor = 4, 2, 0.5
    layer = MixtureOfExperts(
        num_experts, 8, top_k=top_k, capacity_factor=capacity_factor, activation="relu"
    )
    layer.build(SEQUENCES.shape)
    # A router biased towards expert 0 makes its queues overflow.
    router = RNG.normal(size=(6, num_experts)).astype("float32")
    router[:, 0] += 1.0
    layer.router.kernel.assign(router)
    randomize_biases(layer)
    output = to_numpy(layer(SEQUENCES)).reshape(-1, 6)

    tokens = SEQUENCES.reshape(-1, 6)
    weights = layer_weights(layer)
    expert_index, _ = np_route(tokens @ weights["router"], top_k)
    group_size = SEQUENCES.shape[1]
    capacity = math.ceil(capacity_factor * group_size * top_k / num_experts)
    kept = np_kept_per_example(expert_index, num_experts, capacity, group_size)
    assert 0 < (~kept).sum() < kept.size, "the setup must drop some, not all"
    # The same rule over the whole batch would drop differently: the test
    # tells per-example capacity from per-batch capacity.
    whole_batch_capacity = math.ceil(capacity_factor * len(tokens) * top_k / num_experts)
    assert (np_kept(expert_index, num_experts, whole_batch_capacity) != kept).any()
    reference = np_moe(tokens, weights, top_k, "relu", kept=kept)
    np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-5)


def test_capacity_layout_keeps_the_numpy_slot_rule_assignments():
    expert_index = RNG.integers(0, 4, size=(30, 1))
    expert_index = np.concatenate([expert_index, (expert_index + 1) % 4], axis=1)
    capacity = 9
    positions = moe_ops.expert_positions(keras.ops.convert_to_tensor(expert_index, "int32"), 4)
    layout = moe_ops.capacity_layout(*positions, 30, capacity)
    assignment_kept = to_numpy(layout[1]).reshape(2, 30).T
    np.testing.assert_array_equal(assignment_kept, np_kept(expert_index, 4, capacity))


def test_grouped_capacity_layout_keeps_the_slot_rule_of_each_group():
    num_tokens, num_experts, group_size, capacity = 36, 4, 6, 2
    logits = RNG.normal(size=(num_tokens, num_experts)).astype("float32")
    logits[:, 1] += 1.0  # expert 1's queues overflow
    expert_index, _ = np_route(logits, 2)
    positions = moe_ops.expert_positions(
        keras.ops.convert_to_tensor(expert_index, "int32"), num_experts, group_size
    )
    layout = moe_ops.capacity_layout(*positions, num_tokens, capacity)
    row, kept, row_assignment, row_valid = (to_numpy(t) for t in layout[:4])
    kept = kept.reshape(2, num_tokens).T
    np.testing.assert_array_equal(
        kept, np_kept_per_example(expert_index, num_experts, capacity, group_size)
    )
    # Kept assignment a of token t (group t // group_size) sits in its
    # expert's run of rows, inside its group's block of `capacity` rows.
    kept_assignments = np.flatnonzero(kept.T.reshape(-1))
    token = kept_assignments % num_tokens
    expert = expert_index.T.reshape(-1)[kept_assignments]
    num_groups = num_tokens // group_size
    block = row[kept_assignments] // capacity
    np.testing.assert_array_equal(block, expert * num_groups + token // group_size)
    np.testing.assert_array_equal(row_assignment[row[kept_assignments]], kept_assignments)
    assert row_valid.sum() == len(kept_assignments)


def test_dropless_layout_places_every_assignment_in_its_experts_block():
    num_tokens, num_experts, top_k = 37, 5, 2
    logits = RNG.normal(size=(num_tokens, num_experts)).astype("float32")
    logits[:, 2] += 2.0  # a skewed load, so block counts differ per expert
    expert_index, _ = np_route(logits, top_k)
    positions = moe_ops.expert_positions(
        keras.ops.convert_to_tensor(expert_index, "int32"), num_experts
    )
    num_assignments = num_tokens * top_k
    block_size = moe_ops.dropless_block_size(num_assignments, num_experts)
    num_blocks = moe_ops.dropless_num_blocks(num_assignments, num_experts, block_size)
    layout = moe_ops.dropless_layout(*positions, num_tokens, block_size, num_blocks)
    row, kept, row_assignment, row_valid, block_expert = (to_numpy(t) for t in layout[:5])
    assert kept.all()
    assert len(set(row.tolist())) == num_assignments, "two assignments share a row"
    assignment_expert = expert_index.T.reshape(-1)
    # The two directions of the assignment <-> row map agree, and each
    # assignment's row lies in a block of its expert.
    np.testing.assert_array_equal(row_assignment[row], np.arange(num_assignments))
    assert row_valid[row].all()
    np.testing.assert_array_equal(block_expert[row // block_size], assignment_expert)
    assert row_valid.sum() == num_assignments


def test_aux_losses_equal_numpy_formulas():
    layer = MixtureOfExperts(4, 8, top_k=2, load_balance_weight=0.3, router_z_weight=0.07)
    layer.build(SEQUENCES.shape)
    # Large logits, so the z-loss is far from its value at zero logits.
    layer.router.kernel.assign(3.0 * RNG.normal(size=(6, 4)).astype("float32"))
    layer(SEQUENCES)
    load_balance, z_loss = (float(to_numpy(loss)) for loss in layer.losses)

    logits = SEQUENCES.reshape(-1, 6) @ to_numpy(layer.router.kernel)
    expert_index, _ = np_route(logits, 2)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assignment_fraction = np.bincount(expert_index.ravel(), minlength=4) / expert_index.size
    expected_load_balance = 0.3 * 4 * np.sum(assignment_fraction * probs.mean(axis=0))
    logsumexp = np.log(np.exp(logits).sum(axis=1))
    expected_z_loss = 0.07 * np.mean(logsumexp**2)
    np.testing.assert_allclose(load_balance, expected_load_balance, rtol=1e-5)
    np.testing.assert_allclose(z_loss, expected_z_loss, rtol=1e-5)


def test_aux_loss_weights_of_zero_add_no_loss():
    layer = MixtureOfExperts(4, 8, load_balance_weight=0.0, router_z_weight=0.0)
    layer(SEQUENCES)
    assert layer.losses == []


@heavy
def test_single_expert_top1_equals_its_ffn():
    layer = MixtureOfExperts(1, 9, top_k=1, activation="relu", output_units=5)
    layer.build(SEQUENCES.shape)
    randomize_biases(layer)
    hidden = keras.layers.Dense(9, activation="relu")
    out = keras.layers.Dense(5)
    hidden.build((None, 6))
    out.build((None, 9))
    weights = layer_weights(layer)
    hidden.set_weights([weights["w1"][0], weights["b1"][0]])
    out.set_weights([weights["w2"][0], weights["b2"][0]])
    np.testing.assert_allclose(
        to_numpy(layer(SEQUENCES)), to_numpy(out(hidden(SEQUENCES))), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
def test_gradients_reach_router_and_exactly_the_experts_that_got_tokens(capacity_factor):
    num_experts = 4
    inputs = keras.Input(shape=(5, 6))
    layer = MixtureOfExperts(
        num_experts,
        8,
        capacity_factor=capacity_factor,
        load_balance_weight=0.0,
        router_z_weight=0.0,
    )
    model = keras.Model(inputs, layer(inputs))
    # With positive inputs, experts 0-2 get logits > 0 and expert 3 gets 0:
    # expert 3 is never in the top 2.
    data = np.abs(SEQUENCES)
    rng = np.random.default_rng(7)  # its own draws: the premise below holds
    router = np.abs(rng.normal(size=(6, num_experts))).astype("float32") + 1.0
    router[:, 3] = 0.0
    layer.router.kernel.assign(router)
    expert_index, _ = np_route(data.reshape(-1, 6) @ router, 2)
    capacity = 5 if capacity_factor is None else math.ceil(capacity_factor * 5 * 2 / 4)
    kept = np_kept_per_example(expert_index, num_experts, capacity, 5)
    assert set(expert_index[kept].tolist()) == {0, 1, 2}, "premise: experts 0-2 keep tokens"
    before = layer_weights(layer)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    target = rng.normal(size=(4, 5, 6)).astype("float32")
    model.fit(data, target, batch_size=4, epochs=1, verbose=0)
    after = layer_weights(layer)

    assert not np.array_equal(before["router"], after["router"]), "router got no gradient"
    for name in ("w1", "b1", "w2", "b2"):
        for expert in range(3):
            assert not np.array_equal(before[name][expert], after[name][expert]), (
                f"expert {expert} {name} got no gradient"
            )
        np.testing.assert_array_equal(before[name][3], after[name][3])


class AllExpertsMoE(keras.layers.Layer):
    """Dense reference: every expert on every token, weighted by the gates
    (one_hot of the top-k), written with plain ops so autodiff is the oracle
    for the sparse layer's gradients."""

    def __init__(self, num_experts, hidden_units, top_k, **kwargs):
        super().__init__(**kwargs)
        self.num_experts, self.hidden_units, self.top_k = num_experts, hidden_units, top_k

    def build(self, input_shape):
        d, e, h = input_shape[-1], self.num_experts, self.hidden_units
        self.router = self.add_weight(shape=(d, e), name="router")
        self.w1 = self.add_weight(shape=(e, d, h), name="w1")
        self.b1 = self.add_weight(shape=(e, h), name="b1")
        self.w2 = self.add_weight(shape=(e, h, d), name="w2")
        self.b2 = self.add_weight(shape=(e, d), name="b2")

    def call(self, inputs):
        ops = keras.ops
        logits = ops.matmul(inputs, self.router)
        top_logits, top_index = ops.top_k(logits, k=self.top_k)
        gates = ops.softmax(top_logits, axis=-1)
        dense_gates = ops.sum(ops.one_hot(top_index, self.num_experts) * gates[..., None], axis=1)
        hidden = ops.relu(ops.einsum("td,edh->teh", inputs, self.w1) + self.b1)
        outputs = ops.einsum("teh,ehd->ted", hidden, self.w2) + self.b2
        return ops.einsum("ted,te->td", outputs, dense_gates)


@pytest.mark.parametrize("capacity_factor", [100.0, None], ids=["capacity", "dropless"])
def test_one_sgd_step_equals_the_all_experts_reference(capacity_factor):
    tokens = SEQUENCES.reshape(-1, 6)
    target = RNG.normal(size=tokens.shape).astype("float32")
    inputs = keras.Input(shape=(6,))
    layer = MixtureOfExperts(
        4,
        8,
        capacity_factor=capacity_factor,
        activation="relu",
        load_balance_weight=0.0,
        router_z_weight=0.0,
    )
    sparse = keras.Model(inputs, layer(inputs))
    randomize_biases(layer)
    reference_layer = AllExpertsMoE(4, 8, 2)
    reference = keras.Model(inputs, reference_layer(inputs))
    weights = layer_weights(layer)
    reference.set_weights([weights[name] for name in ("router", "w1", "b1", "w2", "b2")])
    for model in (sparse, reference):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        model.fit(tokens, target, batch_size=len(tokens), epochs=1, verbose=0)
    updated = layer_weights(layer)
    for name, value in zip(("router", "w1", "b1", "w2", "b2"), reference.get_weights()):
        assert not np.allclose(value, weights[name]), f"{name} did not move"
        np.testing.assert_allclose(updated[name], value, rtol=1e-5, atol=1e-5)


# --- NaN routing ---------------------------------------------------------------------


def test_nan_router_logits_give_nan_outputs_for_exactly_those_tokens():
    num_tokens, num_experts, top_k, capacity = 20, 4, 2, 5  # some drops
    tokens = keras.ops.convert_to_tensor(SEQUENCES.reshape(num_tokens, 6))
    logits = RNG.normal(size=(num_tokens, num_experts)).astype("float32")
    logits[:, 0] += 2.0  # expert 0 overflows: some choices are dropped
    logits[[1, 19]] = np.nan
    expert_index, gates, _ = moe_ops.route_top_k(keras.ops.convert_to_tensor(logits), top_k)
    positions = moe_ops.expert_positions(expert_index, num_experts)
    layout = moe_ops.capacity_layout(*positions, num_tokens, capacity)
    buffer = moe_ops.dispatch_tokens(tokens, layout, top_k)
    w1 = RNG.normal(size=(num_experts, 6, 8)).astype("float32")
    w2 = RNG.normal(size=(num_experts, 8, 6)).astype("float32")
    expert_outputs = moe_ops.expert_ffn(
        buffer,
        w1,
        np.zeros((num_experts, 8), "float32"),
        w2,
        np.zeros((num_experts, 6), "float32"),
        keras.activations.relu,
    )
    output = to_numpy(moe_ops.combine_expert_outputs(expert_outputs, layout, gates))
    # Which experts a NaN token picks is backend-specific; here token 19, the
    # last in every queue, loses at least one choice on every backend, so
    # the test covers a dropped NaN assignment too.
    assert not to_numpy(layout.assignment_kept).reshape(top_k, num_tokens)[:, 19].all()
    assert np.isnan(output[[1, 19]]).all()
    finite_tokens = [t for t in range(num_tokens) if t not in (1, 19)]
    assert np.isfinite(output[finite_tokens]).all()


def test_nan_router_weights_make_the_output_and_loss_nan_and_stop_fit():
    inputs = keras.Input(shape=(5, 6))
    layer = MixtureOfExperts(4, 8)
    model = keras.Model(inputs, layer(inputs))
    router = to_numpy(layer.router.kernel)
    router[0, 0] = np.nan
    layer.router.kernel.assign(router)
    assert np.isnan(to_numpy(model(SEQUENCES))).all()
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(
        SEQUENCES,
        SEQUENCES,
        batch_size=2,
        epochs=3,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert model.stop_training
    assert len(history.history["loss"]) == 1
    assert np.isnan(history.history["loss"][0])


# --- routing metrics ---------------------------------------------------------------


def test_fit_logs_routing_statistics_matching_the_numpy_slot_rule():
    from hlkeras.training import RoutingStatistics

    num_experts, top_k, capacity_factor = 4, 2, 0.5
    inputs = keras.Input(shape=SEQUENCES.shape[1:])
    layer = MixtureOfExperts(
        num_experts, 8, top_k=top_k, capacity_factor=capacity_factor, name="moe"
    )
    model = keras.Model(inputs, layer(inputs))
    router = RNG.normal(size=(6, num_experts)).astype("float32")
    router[:, 0] += 1.0
    layer.router.kernel.assign(router)
    # A learning rate of 0 keeps the routing fixed, so the statistics of the
    # two one-batch epochs are exactly those of the NumPy rule.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    routing = RoutingStatistics()
    history = model.fit(
        SEQUENCES,
        SEQUENCES,
        batch_size=len(SEQUENCES),
        epochs=2,
        verbose=0,
        validation_data=(SEQUENCES, SEQUENCES),
        callbacks=[routing],
    ).history

    tokens = SEQUENCES.reshape(-1, 6)
    expert_index, _ = np_route(tokens @ router, top_k)
    group_size = SEQUENCES.shape[1]
    capacity = math.ceil(capacity_factor * group_size * top_k / num_experts)
    kept = np_kept_per_example(expert_index, num_experts, capacity, group_size)
    load = np.bincount(expert_index.ravel(), minlength=num_experts) / expert_index.size
    np.testing.assert_allclose(history["moe_dropped_fraction"], [1 - kept.mean()] * 2, rtol=1e-6)
    np.testing.assert_allclose(
        history["moe_max_expert_load"], [load.max() * num_experts] * 2, rtol=1e-6
    )
    np.testing.assert_allclose(routing.expert_load["moe"], [load, load], rtol=1e-6)
    # One layer: its own statistics (kept out of the logs) are the aggregates.
    assert routing.per_layer == pytest.approx(
        {"moe_dropped_fraction": 1 - kept.mean(), "moe_max_expert_load": load.max() * num_experts},
        rel=1e-6,
    )
    # Validation does not measure routing: no val_ columns, no NaN.
    assert not [name for name in history if name.startswith("val_moe")]
    # The layer's own totals count both training steps, and inference
    # calls add nothing.
    model.predict(SEQUENCES, verbose=0)
    statistics = layer.routing_statistics()
    assert statistics["calls"] == 2
    np.testing.assert_allclose(statistics["expert_load"], load, rtol=1e-6)


def test_routing_statistics_read_nan_before_any_training_call():
    layer = MixtureOfExperts(4, 8)
    layer(SEQUENCES)
    statistics = layer.routing_statistics()
    assert statistics["calls"] == 0 and np.isnan(statistics["dropped_fraction"])


@pytest.mark.parametrize("capacity_factor", [0.5, None], ids=["capacity-drops", "dropless"])
def test_inference_output_of_a_sample_does_not_depend_on_its_batch(capacity_factor):
    inputs = keras.Input(shape=(5, 6))
    model = keras.Model(inputs, MixtureOfExperts(4, 8, capacity_factor=capacity_factor)(inputs))
    data = RNG.normal(size=(12, 5, 6)).astype("float32")
    whole_batch = model.predict(data, batch_size=12, verbose=0)
    one_at_a_time = model.predict(data, batch_size=1, verbose=0)
    np.testing.assert_allclose(one_at_a_time, whole_batch, rtol=0, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
def test_an_empty_batch_gives_an_empty_output_like_a_dense_layer(capacity_factor):
    layer = MixtureOfExperts(4, 8, output_units=3, capacity_factor=capacity_factor)
    before = to_numpy(layer(SEQUENCES))
    for inputs in (SEQUENCES[:0], VECTORS[:0]):
        output = layer(inputs, training=True)
        expected = keras.layers.Dense(3)(inputs)  # the built-in's behaviour
        assert tuple(output.shape) == tuple(expected.shape)
        assert keras.backend.standardize_dtype(output.dtype) == "float32"
        # Nothing was routed: no aux loss (a mean over no tokens is NaN).
        assert not layer.losses
    assert layer.routing_statistics()["calls"] == 0
    np.testing.assert_array_equal(to_numpy(layer(SEQUENCES)), before)


def test_vector_inputs_are_never_dropped_in_capacity_mode():
    # Each row of a (batch, d) input is its own group of one token.
    layer = MixtureOfExperts(4, 8, top_k=2, capacity_factor=0.25)
    tokens = SEQUENCES.reshape(-1, 6)
    layer.build(tokens.shape)
    randomize_biases(layer)
    reference = np_moe(tokens, layer_weights(layer), 2, "gelu")
    np.testing.assert_allclose(to_numpy(layer(tokens)), reference, rtol=1e-5, atol=1e-5)


def test_variable_sequence_length_in_a_functional_model():
    inputs = keras.Input(shape=(None, 6))
    layer = MixtureOfExperts(4, 8, capacity_factor=100.0)
    model = keras.Model(inputs, layer(inputs))
    assert model.output_shape == (None, None, 6)
    for length in (5, 3):
        data = RNG.normal(size=(4, length, 6)).astype("float32")
        reference = np_moe(data.reshape(-1, 6), layer_weights(layer), 2, "gelu")
        output = to_numpy(model(data)).reshape(-1, 6)
        np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-5)


def test_router_runs_in_float32_under_mixed_bfloat16():
    layer = MixtureOfExperts(4, 8, dtype="mixed_bfloat16")
    output = layer(SEQUENCES)
    assert layer.router.compute_dtype == "float32"
    assert layer.router.kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"


def test_expert_capacity_formula():
    assert moe_ops.expert_capacity_for(100, 8, 2, 1.25) == math.ceil(1.25 * 100 * 2 / 8)
    # Never more than the token count: an expert gets each token at most once.
    assert moe_ops.expert_capacity_for(10, 2, 2, 4.0) == 10
    tensor_capacity = moe_ops.expert_capacity_for(
        keras.ops.convert_to_tensor(100, "int32"), 8, 2, 1.25
    )
    assert int(to_numpy(tensor_capacity)) == 32


def test_dropless_flag():
    assert MixtureOfExperts(4, 8, capacity_factor=None).is_dropless
    assert not MixtureOfExperts(4, 8).is_dropless


# --- bad input ----------------------------------------------------------------------


@pytest.mark.neutral
@pytest.mark.parametrize(
    "kwargs, argument, value",
    [
        ({"num_experts": 0, "hidden_units": 8}, "num_experts", "0"),
        ({"num_experts": -2, "hidden_units": 8}, "num_experts", "-2"),
        ({"num_experts": 4, "hidden_units": 0}, "hidden_units", "0"),
        ({"num_experts": 4, "hidden_units": 8, "top_k": 5}, "top_k", "5"),
        ({"num_experts": 4, "hidden_units": 8, "top_k": 0}, "top_k", "0"),
        ({"num_experts": 4, "hidden_units": 8, "capacity_factor": 0.0}, "capacity_factor", "0.0"),
        ({"num_experts": 4, "hidden_units": 8, "capacity_factor": -1}, "capacity_factor", "-1"),
        (
            {"num_experts": 4, "hidden_units": 8, "load_balance_weight": -0.1},
            "load_balance_weight",
            "-0.1",
        ),
        (
            {"num_experts": 4, "hidden_units": 8, "router_z_weight": -1e-3},
            "router_z_weight",
            "-0.001",
        ),
        ({"num_experts": 4, "hidden_units": 8, "router_jitter": 1.0}, "router_jitter", "1.0"),
        ({"num_experts": 4, "hidden_units": 8, "dropout": -0.5}, "dropout", "-0.5"),
        ({"num_experts": 4, "hidden_units": 8, "output_units": 0}, "output_units", "0"),
        ({"num_experts": 4, "hidden_units": 8, "activation": "nope"}, "activation", "'nope'"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, argument, value):
    with pytest.raises(ValueError, match=rf"`{argument}`.*{value}"):
        MixtureOfExperts(**kwargs)


def test_rejects_rank_one_input_at_build():
    with pytest.raises(ValueError, match=r"rank >= 2.*\(6,\)"):
        MixtureOfExperts(4, 8).build((6,))


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_int8_tflite_keeps_the_capacity_of_longer_sequences_than_calibration():
    # The capacity of a dynamic sequence length is computed in integers: a
    # float capacity would be int8-quantized with the range of the
    # calibration length and saturate for longer sequences, dropping tokens
    # Keras keeps.
    from hlkeras import export

    # Seeded here, not by the module's shared RNG: under xdist the shared
    # RNG's state depends on which tests ran before in the worker. Over seeds
    # 0-7 the drops differed on 0-3.1% of tokens and 94.8-100% were close.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = keras.Input(shape=(None, 6))
    layer = MixtureOfExperts(4, 8, capacity_factor=0.5, activation="relu")
    model = keras.Model(inputs, layer(inputs))
    randomize_biases(layer, rng)
    calibration = rng.normal(size=(64, 3, 6)).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        export.export_saved_model(model, tmp + "/saved_model")
        flatbuffer = export.convert_saved_model(tmp + "/saved_model", "int8", calibration)
    long_sequences = rng.normal(size=(4, 24, 6)).astype("float32")
    expected = to_numpy(model(long_sequences))
    output = export.run_tflite(flatbuffer, long_sequences)
    dropped = np.all(expected == 0.0, axis=-1)
    assert 0 < dropped.mean() < 0.5, "premise: capacity 6 of 24 drops some tokens"
    # int8 rounding may flip a near-tied routing choice, which moves a token
    # in its queues, so a few drops may differ; a saturated float capacity
    # differs on 65% of the tokens (measured with the old formula).
    assert np.mean(np.all(output == 0.0, axis=-1) != dropped) <= 0.05
    close = np.all(np.abs(output - expected) <= 0.1 * np.abs(expected).max(), axis=-1)
    # Re-measured over seeds 0-7: 94.8-100% close (the range quoted above),
    # so the bound is 94%, not the 95% four of those eight seeds missed.
    assert close.mean() >= 0.94


@pytest.mark.backends("torch")
@pytest.mark.parametrize(
    "capacity_factor, lora_rank", [(None, None), (None, 4), (0.5, None), (0.5, 4)]
)
def test_eager_grouped_experts_equal_the_generic_layouts(monkeypatch, capacity_factor, lora_rank):
    """torch's escape hatch (`grouped_experts_eager`, torch's grouped GEMM)
    against the generic capacity and block-sparse layouts: outputs,
    gradients and the dropped fraction the routing statistics record."""
    import torch

    layer = MixtureOfExperts(4, 8, capacity_factor=capacity_factor, top_k=2, lora_rank=lora_rank)
    # Widths of 8 float32 (32 bytes): shapes torch's grouped GEMM takes.
    x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype("float32")
    layer(x)  # build
    if lora_rank:  # B starts at zero; make the adapters count
        b = layer.hidden_adapter[1]
        b.assign(np.full(b.shape, 0.1, dtype="float32"))
    grouped_mm_calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(
        torch.nn.functional,
        "grouped_mm",
        lambda *args, **kwargs: grouped_mm_calls.append(1) or grouped_mm(*args, **kwargs),
    )

    def outputs_and_grads(grouped):
        monkeypatch.setattr(MixtureOfExperts, "_runs_grouped_eager", lambda *_: grouped)
        inputs = torch.tensor(x, requires_grad=True)
        for variable in layer.trainable_variables:
            variable.value.grad = None
        y = layer(inputs, training=True)
        (torch.sum(y * y) + sum(layer.losses)).backward()
        grads = [v.value.grad.numpy().copy() for v in layer.trainable_variables]
        dropped = keras.ops.convert_to_numpy(layer.routing_dropped_total).copy()
        layer.routing_dropped_total.assign(0.0)
        return y.detach().numpy(), inputs.grad.numpy(), grads, dropped

    fast, generic = outputs_and_grads(True), outputs_and_grads(False)
    # Two kernels, each with its adapter's two: 2 or 6 grouped GEMMs.
    assert len(grouped_mm_calls) == (6 if lora_rank else 2)
    np.testing.assert_allclose(fast[3], generic[3], rtol=1e-6)
    if capacity_factor:  # capacity 2 of 5 tokens x 2 choices over 4 experts
        assert generic[3] > 0
    np.testing.assert_allclose(fast[0], generic[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast[1], generic[1], rtol=1e-5, atol=1e-6)
    for fast_grad, generic_grad in zip(fast[2], generic[2]):
        np.testing.assert_allclose(fast_grad, generic_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.backends("torch")
def test_eager_grouped_experts_run_on_concrete_torch_tensors_the_grouped_gemm_takes():
    import torch

    capacity = MixtureOfExperts(4, 8, top_k=2)
    dropless = MixtureOfExperts(4, 8, top_k=2, capacity_factor=None)
    for layer in (capacity, dropless):
        assert layer._runs_grouped_eager(torch.zeros((6, 4)))
        assert not layer._runs_grouped_eager(torch.zeros((6, 4), device="meta"))
    # The grouped GEMM needs every width a multiple of 16 bytes: 6 float32
    # inputs (24 bytes), 6 output units or a LoRA rank of 2 (8 bytes) take
    # the generic path.
    assert not dropless._runs_grouped_eager(torch.zeros((6, 6)))
    assert not MixtureOfExperts(4, 8, output_units=6)._runs_grouped_eager(torch.zeros((6, 4)))
    with_rank_2 = MixtureOfExperts(4, 8, top_k=2, lora_rank=2)
    assert not with_rank_2._runs_grouped_eager(torch.zeros((6, 4)))
    # bfloat16 (2 bytes): widths of 8 fit, widths of 4 do not.
    bf16 = MixtureOfExperts(4, 8, top_k=2, dtype="mixed_bfloat16")
    assert bf16._runs_grouped_eager(torch.zeros((6, 8)))
    assert not bf16._runs_grouped_eager(torch.zeros((6, 4)))
