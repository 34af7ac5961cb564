"""LoRA adapters on the stacked expert kernels of `MixtureOfExperts`
(`lora_rank`), alone and through `TransformerBlock(num_experts=...)`:
oracle = a plain `MixtureOfExperts` whose kernels are `W_e + scale A_e B_e`
computed in NumPy."""

import keras
import numpy as np
import pytest
from layer_testing import heavy
from layer_testing import run_layer_test

from hlkeras import lora
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import TransformerBlock
from hlkeras.layers.moe_ops import expert_parallel_layout

RNG = np.random.default_rng(0)
TOKENS = RNG.normal(size=(4, 6, 8)).astype("float32")
EXPERT_KERNELS = ("expert_hidden_kernel", "expert_output_kernel")
EXPERT_ADAPTERS = (
    "expert_hidden_lora_a",
    "expert_hidden_lora_b",
    "expert_output_lora_a",
    "expert_output_lora_b",
)


def _numpy(value):
    return np.array(keras.ops.convert_to_numpy(value))


def _predict(model, inputs):
    return _numpy(model(inputs, training=False))


def _randomize(variables, scale=0.3):
    for variable in variables:
        variable.assign(RNG.normal(scale=scale, size=variable.shape).astype("float32"))


def _moe_model(**moe_kwargs):
    inputs = keras.Input(shape=TOKENS.shape[1:], name="tokens")
    moe = MixtureOfExperts(4, 12, top_k=2, name="moe", **moe_kwargs)
    outputs = keras.layers.Dense(3, name="head")(moe(inputs))
    model = keras.Model(inputs, outputs)
    _randomize(model.weights)
    return model


def _numpy_merged_kernels(layer):
    """`W_e + (alpha / r) A_e @ B_e` for both expert kernels, per expert."""
    scale = (layer.lora_alpha or layer.lora_rank) / layer.lora_rank
    hidden_a, hidden_b, output_a, output_b = (_numpy(w) for w in layer.adapter_weights)
    return (
        _numpy(layer.expert_hidden_kernel) + scale * np.einsum("edr,erh->edh", hidden_a, hidden_b),
        _numpy(layer.expert_output_kernel) + scale * np.einsum("ehr,ero->eho", output_a, output_b),
    )


@heavy
@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["capacity", "dropless"])
def test_expert_adapters_compute_the_merged_kernel_formula(capacity_factor):
    model = _moe_model(capacity_factor=capacity_factor)
    adapted = lora.apply_lora(model, rank=2, alpha=3.0)
    layer = adapted.get_layer("moe")
    assert layer.lora_rank == 2
    # A fresh adapter (B = 0) changes nothing.
    np.testing.assert_allclose(_predict(adapted, TOKENS), _predict(model, TOKENS), atol=1e-6)
    assert [w.path for w in adapted.trainable_weights] == [
        f"moe/{name}" for name in EXPERT_ADAPTERS
    ] + ["head/kernel", "head/bias"]
    _randomize(layer.adapter_weights)

    oracle = _moe_model(capacity_factor=capacity_factor)
    oracle.set_weights([_numpy(w) for w in model.weights])
    for name, value in zip(EXPERT_KERNELS, _numpy_merged_kernels(layer)):
        getattr(oracle.get_layer("moe"), name).assign(value)
    expected = _predict(oracle, TOKENS)
    np.testing.assert_allclose(_predict(adapted, TOKENS), expected, rtol=1e-5, atol=1e-5)
    merged = lora.merge_lora(adapted)
    assert merged.get_layer("moe").lora_rank is None
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(_predict(merged, TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_fit_moves_only_expert_adapters_and_head():
    model = _moe_model()
    adapted = lora.apply_lora(model, rank=2)
    frozen_before = {w.path: _numpy(w) for w in adapted.weights if not w.trainable}
    adapted.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    adapted.fit(TOKENS, RNG.normal(size=(4, 6, 3)), batch_size=2, epochs=2, verbose=0)
    for w in adapted.weights:
        if not w.trainable and "routing_" not in w.path:  # running statistics move
            np.testing.assert_array_equal(_numpy(w), frozen_before[w.path], err_msg=w.path)
    moved = adapted.get_layer("moe").adapter_weights[1]
    assert np.abs(_numpy(moved)).max() > 0  # B left zero


def test_expert_adapter_file_round_trip(tmp_path):
    model = _moe_model()
    adapted = lora.apply_lora(model, rank=2)
    _randomize(adapted.trainable_weights)
    path = str(tmp_path / "experts.lora.npz")
    lora.save_adapters(adapted, path)
    restored = lora.apply_lora(model, rank=2)
    lora.load_adapters(restored, path)
    np.testing.assert_array_equal(_predict(restored, TOKENS), _predict(adapted, TOKENS))


def _moe_block_model():
    inputs = keras.Input(shape=TOKENS.shape[1:], name="tokens")
    x = TransformerBlock(2, 16, num_experts=4, top_k=2, name="block")(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    _randomize(model.weights)
    return model


def test_transformer_block_with_experts_adapts_attention_and_experts_then_merges():
    model = _moe_block_model()
    adapted = lora.apply_lora(model, rank=2)
    block = adapted.get_layer("block")
    assert block.ffn.lora_rank == 2 and not block.ffn.router.trainable
    trainable = [w.path for w in adapted.trainable_weights]
    assert [p for p in trainable if "expert" in p] == [
        f"block/block_moe/{name}" for name in EXPERT_ADAPTERS
    ]
    np.testing.assert_allclose(_predict(adapted, TOKENS), _predict(model, TOKENS), atol=1e-6)
    _randomize(adapted.trainable_weights)
    merged = lora.merge_lora(adapted)
    assert not any(lora.adapted_projections(layer) for layer in merged.layers)
    np.testing.assert_allclose(
        _predict(merged, TOKENS), _predict(adapted, TOKENS), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_merged_expert_adapters_export_to_tflite_builtins():
    from hlkeras import export

    adapted = lora.apply_lora(_moe_block_model(), rank=2)
    _randomize(adapted.trainable_weights)
    merged = lora.merge_lora(adapted)
    tflite_outputs = export.run_tflite(export.model_to_tflite(merged), TOKENS)
    np.testing.assert_allclose(tflite_outputs, _predict(adapted, TOKENS), rtol=0, atol=1e-4)


@heavy
def test_moe_with_lora_rank_contract():
    run_layer_test(
        MixtureOfExperts,
        {"num_experts": 4, "hidden_units": 12, "lora_rank": 2, "lora_alpha": 4.0},
        TOKENS,
        expected_output_shape=TOKENS.shape,
    )


def test_expert_parallel_layout_shards_the_expert_adapters():
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices=["cpu:0"])
    layout_map = expert_parallel_layout(mesh)
    for name in EXPERT_ADAPTERS:
        assert layout_map[f"block/block_moe/{name}"].axes == ("model", None, None)


def test_lora_rank_too_large_for_the_experts():
    layer = MixtureOfExperts(4, 3, lora_rank=4)
    message = r"`lora_rank` must be <= min\(d_in, d_out\) = min\(8, 3\).*'expert_hidden_kernel'"
    with pytest.raises(ValueError, match=message):
        layer.build(TOKENS.shape)
