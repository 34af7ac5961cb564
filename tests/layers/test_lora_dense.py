import math

import keras
import numpy as np
import pytest
from layer_testing import run_layer_test

from hlkeras.layers import LoRADense

RNG = np.random.default_rng(0)
VECTORS = RNG.normal(size=(4, 6)).astype("float32")
SEQUENCES = RNG.normal(size=(4, 5, 6)).astype("float32")


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def _random_like(variable):
    return RNG.normal(size=tuple(variable.shape)).astype("float32")


def _with_random_adapter(layer):
    """Gives a built layer a random bias and a non-zero `B`, so the oracles
    see every term of the forward pass."""
    layer.bias.assign(_random_like(layer.bias))
    layer.lora_kernel_b.assign(_random_like(layer.lora_kernel_b))
    return layer


@pytest.mark.parametrize(
    "init_kwargs, inputs, expected_shape",
    [
        ({"units": 6, "rank": 2}, VECTORS, (4, 6)),
        (
            {
                "units": 5,
                "rank": 3,
                "alpha": 6.0,
                "dropout": 0.1,
                "activation": "gelu",
                "rslora": True,
            },
            SEQUENCES,
            (4, 5, 5),
        ),
        ({"units": 3, "rank": 1, "use_bias": False}, VECTORS, (4, 3)),
        ({"units": 5, "rank": 2, "dora": True, "activation": "relu"}, SEQUENCES, (4, 5, 5)),
    ],
    ids=["vectors", "sequences-dropout-rslora", "no-bias-rank-1", "dora"],
)
def test_lora_dense_contract(init_kwargs, inputs, expected_shape):
    run_layer_test(LoRADense, init_kwargs, inputs, expected_output_shape=expected_shape)


@pytest.mark.parametrize(
    "alpha, rslora",
    [(None, False), (6.0, False), (6.0, True)],
    ids=["default-alpha", "alpha-6", "rslora"],
)
def test_lora_dense_equals_keras_enable_lora(alpha, rslora):
    rank = 3
    layer = LoRADense(5, rank=rank, alpha=alpha, rslora=rslora, activation="relu")
    layer.build(SEQUENCES.shape)
    _with_random_adapter(layer)
    # Keras scales by lora_alpha / rank; rsLoRA's alpha / sqrt(rank) is that
    # with lora_alpha = alpha * sqrt(rank).
    keras_alpha = rank if alpha is None else alpha
    if rslora:
        keras_alpha = alpha * math.sqrt(rank)
    oracle = keras.layers.Dense(5, activation="relu")
    oracle.build(SEQUENCES.shape)
    oracle.enable_lora(rank, lora_alpha=keras_alpha)
    oracle._kernel.assign(_numpy(layer.kernel))
    oracle.bias.assign(_numpy(layer.bias))
    oracle.lora_kernel_a.assign(_numpy(layer.lora_kernel_a))
    oracle.lora_kernel_b.assign(_numpy(layer.lora_kernel_b))
    np.testing.assert_allclose(
        _numpy(layer(SEQUENCES)), _numpy(oracle(SEQUENCES)), rtol=1e-5, atol=1e-5
    )


def test_lora_dense_training_step_equals_keras_enable_lora():
    # Same weights, same SGD step: the factored gradient must equal the one
    # Keras gets through its merged kernel.
    layer = LoRADense(4, rank=2, alpha=4.0)
    layer.build(VECTORS.shape)
    _with_random_adapter(layer)
    oracle = keras.layers.Dense(4)
    oracle.build(VECTORS.shape)
    oracle.enable_lora(2, lora_alpha=4.0)
    for target, source in [
        (oracle._kernel, layer.kernel),
        (oracle.bias, layer.bias),
        (oracle.lora_kernel_a, layer.lora_kernel_a),
        (oracle.lora_kernel_b, layer.lora_kernel_b),
    ]:
        target.assign(_numpy(source))
    targets = RNG.normal(size=(4, 4)).astype("float32")
    updated = []
    for candidate in (layer, oracle):
        inputs = keras.Input(shape=(6,))
        model = keras.Model(inputs, candidate(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.train_on_batch(VECTORS, targets)
        updated.append([_numpy(candidate.lora_kernel_a), _numpy(candidate.lora_kernel_b)])
    for ours, keras_value in zip(*updated):
        np.testing.assert_allclose(ours, keras_value, rtol=1e-5, atol=1e-6)


def test_lora_dense_matches_numpy_formula_on_sequences():
    layer = LoRADense(4, rank=2, alpha=3.0)
    layer.build(SEQUENCES.shape)
    _with_random_adapter(layer)
    kernel, bias, a, b = (
        _numpy(v) for v in (layer.kernel, layer.bias, layer.lora_kernel_a, layer.lora_kernel_b)
    )
    expected = SEQUENCES @ kernel + bias + (3.0 / 2) * (SEQUENCES @ a) @ b
    np.testing.assert_allclose(_numpy(layer(SEQUENCES)), expected, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_changes_nothing():
    layer = LoRADense(4, rank=2)
    output = _numpy(layer(VECTORS))
    assert np.any(_numpy(layer.lora_kernel_a) != 0.0), "A must not start at zero"
    np.testing.assert_array_equal(_numpy(layer.lora_kernel_b), 0.0)
    expected = VECTORS @ _numpy(layer.kernel) + _numpy(layer.bias)
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)


def test_a_is_kaiming_uniform():
    layer = LoRADense(64, rank=32)
    layer.build((None, 600))
    a = _numpy(layer.lora_kernel_a)
    limit = math.sqrt(6.0 / 600)  # He-uniform bound, fan_in = d_in
    assert np.max(np.abs(a)) <= limit
    # A uniform draw fills its range: the extremes come close to the bound.
    assert np.max(np.abs(a)) > 0.95 * limit


def test_only_the_adapter_is_trainable_and_the_base_survives_fit():
    inputs = keras.Input(shape=(None, 6))  # variable sequence length
    layer = LoRADense(4, rank=2, activation="tanh")
    model = keras.Model(inputs, layer(inputs))
    assert [w.name for w in model.trainable_weights] == ["lora_kernel_a", "lora_kernel_b"]
    # Toggling trainable must not unfreeze the base.
    layer.trainable = False
    layer.trainable = True
    assert {w.name for w in layer.non_trainable_weights} == {"kernel", "bias"}
    base_before = [_numpy(layer.kernel).copy(), _numpy(layer.bias).copy()]
    adapter_before = [_numpy(w).copy() for w in layer.adapter_weights]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    targets = RNG.normal(size=(4, 5, 4)).astype("float32")
    model.fit(SEQUENCES, targets, batch_size=2, epochs=2, verbose=0)
    np.testing.assert_array_equal(_numpy(layer.kernel), base_before[0])
    np.testing.assert_array_equal(_numpy(layer.bias), base_before[1])
    for before, variable in zip(adapter_before, layer.adapter_weights):
        assert not np.array_equal(before, _numpy(variable))
    shorter = _numpy(model(SEQUENCES[:, :3]))
    assert shorter.shape == (4, 3, 4)


def test_dropout_touches_only_the_adapter_path():
    layer = LoRADense(4, rank=2, dropout=0.5)
    layer.build(VECTORS.shape)
    # With B = 0 the adapter adds nothing, so dropout must change nothing.
    np.testing.assert_allclose(
        _numpy(layer(VECTORS, training=True)),
        _numpy(layer(VECTORS, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )
    _with_random_adapter(layer)
    assert not np.allclose(
        _numpy(layer(VECTORS, training=True)), _numpy(layer(VECTORS, training=False))
    )


@pytest.mark.parametrize("use_bias", [True, False])
def test_merged_is_a_plain_dense_with_the_same_outputs(use_bias):
    layer = LoRADense(5, rank=2, alpha=5.0, activation="relu", use_bias=use_bias, name="proj")
    layer.build(SEQUENCES.shape)
    layer.lora_kernel_b.assign(_random_like(layer.lora_kernel_b))
    if use_bias:
        layer.bias.assign(_random_like(layer.bias))
    dense = layer.merged()
    assert type(dense) is keras.layers.Dense
    assert dense.name == "proj" and dense.use_bias == use_bias
    assert dense.count_params() == 6 * 5 + (5 if use_bias else 0)
    np.testing.assert_allclose(
        _numpy(dense(SEQUENCES)), _numpy(layer(SEQUENCES)), rtol=1e-5, atol=1e-5
    )


def test_merged_before_build_raises():
    with pytest.raises(ValueError, match="must be built"):
        LoRADense(4).merged()


@pytest.mark.neutral
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"units": 4, "rank": 0}, "rank"),
        ({"units": 4, "rank": -2}, "rank"),
        ({"units": 4, "rank": 2.5}, "rank"),
        ({"units": 4, "alpha": 0}, "alpha"),
        ({"units": 4, "alpha": -1.0}, "alpha"),
        ({"units": 4, "dropout": 1.0}, "dropout"),
        ({"units": 0}, "units"),
        ({"units": 4, "activation": "no_such_activation"}, "activation"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        LoRADense(**kwargs)


@pytest.mark.parametrize("units, input_dim", [(4, 6), (8, 3)], ids=["units-limits", "d_in-limits"])
def test_rank_above_min_of_d_in_and_units_raises_at_build(units, input_dim):
    layer = LoRADense(units, rank=5)
    with pytest.raises(ValueError, match=r"`rank` must be <= min\(d_in, units\)"):
        layer.build((None, input_dim))


# ---------------------------------------------------------------- DoRA


def _dora_layer(units=4, rank=2, alpha=3.0, inputs=SEQUENCES, use_bias=True):
    """A built DoRA layer with every term non-zero: random bias, `B` and a
    magnitude away from the kernel's column norms."""
    layer = LoRADense(units, rank=rank, alpha=alpha, dora=True, use_bias=use_bias)
    layer.build(inputs.shape)
    layer.lora_kernel_b.assign(_random_like(layer.lora_kernel_b))
    layer.lora_magnitude.assign(np.abs(_random_like(layer.lora_magnitude)) + 0.5)
    if use_bias:
        layer.bias.assign(_random_like(layer.bias))
    return layer


def _numpy_dora(x, kernel, a, b, magnitude, scale, bias=0.0):
    """DoRA (Liu et al. 2024, eq. 5) in NumPy: `x @ (m * V / ||V||_c) + bias`,
    `V = W + scale * A @ B`, the norm per output column."""
    direction = kernel + scale * a @ b
    return x @ (magnitude * direction / np.linalg.norm(direction, axis=0)) + bias


def test_dora_matches_the_papers_formula_in_numpy():
    layer = _dora_layer()
    kernel, bias, a, b, m = (
        _numpy(v).astype("float64")
        for v in (layer.kernel, layer.bias, layer.lora_kernel_a, layer.lora_kernel_b,
                  layer.lora_magnitude)
    )  # fmt: skip
    expected = _numpy_dora(SEQUENCES.astype("float64"), kernel, a, b, m, 1.5, bias)
    np.testing.assert_allclose(_numpy(layer(SEQUENCES)), expected, rtol=1e-5, atol=1e-5)
    direction = kernel + 1.5 * a @ b
    np.testing.assert_allclose(
        _numpy(layer.direction_norm()), np.linalg.norm(direction, axis=0), rtol=1e-5
    )


def test_fresh_dora_adapter_changes_nothing_and_its_magnitude_is_the_kernel_norm():
    layer = LoRADense(4, rank=2, dora=True)
    output = _numpy(layer(VECTORS))
    kernel = _numpy(layer.kernel)
    np.testing.assert_allclose(
        _numpy(layer.lora_magnitude), np.linalg.norm(kernel, axis=0), rtol=1e-6
    )
    expected = VECTORS @ kernel + _numpy(layer.bias)
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)
    assert [w.name for w in layer.trainable_weights] == [
        "lora_kernel_a", "lora_kernel_b", "lora_magnitude"
    ]  # fmt: skip


def test_dora_sgd_step_equals_the_analytic_gradient_of_the_formula():
    """One SGD step on MSE against NumPy's gradient of DoRA's formula with
    the column norm held constant (the paper's section 4.3, as in peft)."""
    scale, learning_rate = 1.5, 0.1
    layer = _dora_layer(inputs=VECTORS, use_bias=False)
    x = VECTORS.astype("float64")
    targets = RNG.normal(size=(len(VECTORS), 4))
    kernel, a, b, m = (
        _numpy(v).astype("float64")
        for v in (layer.kernel, layer.lora_kernel_a, layer.lora_kernel_b, layer.lora_magnitude)
    )
    norm = np.linalg.norm(kernel + scale * a @ b, axis=0)
    numerator = x @ kernel + scale * (x @ a) @ b
    outputs = numerator * m / norm
    grad_outputs = 2 * (outputs - targets) / outputs.size  # mean squared error
    grad_numerator = grad_outputs * m / norm
    expected = {
        "lora_kernel_a": a - learning_rate * scale * x.T @ (grad_numerator @ b.T),
        "lora_kernel_b": b - learning_rate * scale * (x @ a).T @ grad_numerator,
        "lora_magnitude": m - learning_rate * np.sum(grad_outputs * numerator / norm, axis=0),
    }
    inputs = keras.Input((VECTORS.shape[1],))
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.SGD(learning_rate), "mse")
    model.train_on_batch(VECTORS, targets.astype("float32"))
    for weight in layer.trainable_weights:
        np.testing.assert_allclose(
            _numpy(weight), expected[weight.name], rtol=1e-4, atol=1e-6, err_msg=weight.name
        )
    np.testing.assert_array_equal(_numpy(layer.kernel), kernel.astype("float32"))


def test_dora_merged_is_a_plain_dense_with_the_same_outputs():
    layer = _dora_layer()
    dense = layer.merged()
    assert type(dense) is keras.layers.Dense
    np.testing.assert_allclose(
        _numpy(dense(SEQUENCES)), _numpy(layer(SEQUENCES)), rtol=1e-5, atol=1e-5
    )


def test_reset_magnitude_restores_the_base_outputs_while_b_is_zero():
    layer = LoRADense(4, rank=2, dora=True)
    layer.build(VECTORS.shape)
    layer.kernel.assign(_random_like(layer.kernel))  # as apply_lora copies one in
    layer.reset_magnitude()
    expected = VECTORS @ _numpy(layer.kernel) + _numpy(layer.bias)
    np.testing.assert_allclose(_numpy(layer(VECTORS)), expected, rtol=1e-5, atol=1e-5)
