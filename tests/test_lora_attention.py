"""LoRA on hlkeras attention layers: `apply_lora` / `merge_lora` /
adapter files on models built from `TransformerBlock` and
`MultiHeadAttention`, which follow the LoRA protocol of `hlkeras.lora`
through their `lora_rank` argument."""

import os

import keras
import numpy as np
import pytest
from layer_testing import heavy
from layer_testing import run_layer_test

from hlkeras import lora
from hlkeras.layers import FeedForward
from hlkeras.layers import LoRADense
from hlkeras.layers import MultiHeadAttention
from hlkeras.layers import TransformerBlock

RNG = np.random.default_rng(0)
LENGTH, FEATURES = 5, 16
TOKENS = RNG.normal(size=(4, LENGTH, FEATURES)).astype("float32")
CONTEXT = RNG.normal(size=(4, 3, 8)).astype("float32")
# The four attention projections, then the two FFN ones, in creation order.
BLOCK_PROJECTIONS = [
    "attention/query",
    "attention/key",
    "attention/value",
    "attention/attention_output",
    "ffn/hidden_dense",
    "ffn/output_dense",
]
ATTENTION_PROJECTIONS = ["query", "key", "value", "attention_output"]


def _numpy(value):
    return np.array(keras.ops.convert_to_numpy(value))


def _predict(model, inputs):
    return _numpy(model(inputs, training=False))


def _randomize(model):
    """Random non-zero weights everywhere, so a weight left behind shows."""
    model.set_weights(
        [RNG.normal(scale=0.3, size=w.shape).astype("float32") for w in model.weights]
    )
    return model


def _randomize_adapters(model):
    for variable in [w for layer in model.layers for w in lora.adapter_weights(layer)]:
        variable.assign(RNG.normal(scale=0.3, size=variable.shape).astype("float32"))


def _block_model(**block_kwargs):
    inputs = keras.Input(shape=(LENGTH, FEATURES), name="tokens")
    x = TransformerBlock(4, 24, num_kv_heads=2, name="block", **block_kwargs)(inputs)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return _randomize(keras.Model(inputs, outputs))


def _attention_model(cross):
    """A bare `MultiHeadAttention`, self-attention (fused path without
    adapters) or cross-attention over a second input."""
    tokens = keras.Input(shape=(LENGTH, FEATURES), name="tokens")
    attention = MultiHeadAttention(4, 4, num_kv_heads=2, rope=True, name="mha")
    if cross:
        context = keras.Input(shape=CONTEXT.shape[1:], name="context")
        inputs = [tokens, context]
        x = attention(tokens, context)
    else:
        inputs = tokens
        x = attention(tokens, tokens)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return _randomize(keras.Model(inputs, outputs))


def _data(cross):
    return [TOKENS, CONTEXT] if cross else TOKENS


def _adapter_paths(prefix, projections):
    return [
        f"{prefix}/{projection}/{factor}"
        for projection in projections
        for factor in ("lora_kernel_a", "lora_kernel_b")
    ]


def _lora_dense_count(model):
    return sum(len(lora.adapted_projections(layer)) for layer in model.layers)


# apply_lora


def test_transformer_block_takes_adapters_outputs_unchanged():
    model = _block_model()
    adapted = lora.apply_lora(model, rank=2, alpha=4.0, dropout=0.1)
    block = adapted.get_layer("block")
    assert type(block) is TransformerBlock and block.lora_rank == 2
    attention, ffn = (lora.adapted_projections(getattr(block, n)) for n in ("attention", "ffn"))
    assert len(attention) + len(ffn) == len(BLOCK_PROJECTIONS)
    # Attention: Keras' EinsumDense LoRA (no dropout); FFN: LoRADense.
    assert all(p.lora_rank == 2 and p.lora_alpha == 4.0 for p in attention)
    assert all(p.rank == 2 and p.alpha == 4.0 and p.dropout == 0.1 for p in ffn)
    assert [w.path for w in adapted.trainable_weights] == _adapter_paths(
        "block", BLOCK_PROJECTIONS
    ) + ["head/kernel", "head/bias"]
    # Outputs unchanged right after (B = 0); inference ignores the dropout.
    np.testing.assert_allclose(
        _predict(adapted, TOKENS), _predict(model, TOKENS), rtol=0, atol=1e-6
    )
    # The original is untouched.
    assert model.get_layer("block").lora_rank is None
    assert _lora_dense_count(model) == 0


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_multi_head_attention_takes_adapters_outputs_unchanged(cross):
    model = _attention_model(cross)
    adapted = lora.apply_lora(model, rank=2)
    assert adapted.get_layer("mha").lora_rank == 2
    assert [w.path for w in adapted.trainable_weights] == _adapter_paths(
        "mha", ATTENTION_PROJECTIONS
    ) + ["head/kernel", "head/bias"]
    np.testing.assert_allclose(
        _predict(adapted, _data(cross)),
        _predict(model, _data(cross)),
        rtol=0,
        atol=1e-6,
    )


# fit / merge_lora


def _fit(model, inputs, epochs=2):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    targets = RNG.normal(size=(len(TOKENS), 3)).astype("float32")
    model.fit(inputs, targets, batch_size=2, epochs=epochs, verbose=0)


def _check_merge(model, adapted, inputs):
    """merge_lora: no LoRADense, same outputs as the adapted model, the
    original parameter count and layer types."""
    merged = lora.merge_lora(adapted)
    assert _lora_dense_count(merged) == 0
    assert [type(layer) for layer in merged.layers] == [type(layer) for layer in model.layers]
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(
        _predict(merged, inputs), _predict(adapted, inputs), rtol=0, atol=1e-5
    )


def test_transformer_block_fit_changes_only_adapters_then_merges():
    model = _block_model()
    adapted = lora.apply_lora(model, rank=2)
    frozen = {w.path: _numpy(w) for w in adapted.non_trainable_weights}
    _fit(adapted, TOKENS)
    for w in adapted.non_trainable_weights:
        np.testing.assert_array_equal(_numpy(w), frozen[w.path])
    for w in lora.adapter_weights(adapted.get_layer("block")):
        if w.name == "lora_kernel_b":
            assert np.any(_numpy(w) != 0), w.path
    # The fit moved the adapters, so the outputs left the original's.
    assert not np.allclose(_predict(adapted, TOKENS), _predict(model, TOKENS), atol=1e-4)
    _check_merge(model, adapted, TOKENS)
    assert lora.merge_lora(adapted).get_layer("block").lora_rank is None


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_multi_head_attention_adapters_change_outputs_and_merge(cross):
    model = _attention_model(cross)
    adapted = lora.apply_lora(model, rank=2)
    _randomize_adapters(adapted)
    assert not np.allclose(
        _predict(adapted, _data(cross)), _predict(model, _data(cross)), atol=1e-4
    )
    _check_merge(model, adapted, _data(cross))


# Adapter files and .keras files


def test_adapter_file_round_trip(tmp_path):
    model = _block_model()
    adapted = lora.apply_lora(model, rank=2)
    _randomize_adapters(adapted)
    path = os.path.join(tmp_path, "block.lora.npz")
    lora.save_adapters(adapted, path)
    with np.load(path) as data:
        stored = sum(data[key].size for key in data.files if key != lora.METADATA_KEY)
    assert stored == sum(int(np.prod(w.shape)) for w in adapted.trainable_weights)
    fresh = lora.apply_lora(model, rank=2)
    lora.load_adapters(fresh, path)
    np.testing.assert_allclose(
        _predict(fresh, TOKENS), _predict(adapted, TOKENS), rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="LoRA rank"):
        lora.load_adapters(lora.apply_lora(model, rank=3), path)


def test_adapted_model_keras_file_round_trip(tmp_path):
    adapted = lora.apply_lora(_block_model(), rank=2)
    _randomize_adapters(adapted)
    path = os.path.join(tmp_path, "adapted.keras")
    adapted.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert reloaded.get_layer("block").lora_rank == 2
    np.testing.assert_allclose(
        _predict(reloaded, TOKENS), _predict(adapted, TOKENS), rtol=0, atol=1e-6
    )
    assert [w.path for w in reloaded.trainable_weights] == [
        w.path for w in adapted.trainable_weights
    ]


# The layers themselves


@heavy
def test_transformer_block_with_lora_rank_contract():
    # Layer contract with adapters: config round trip, .keras reload, fit
    # moves exactly the adapters (the frozen norms and bases stay), mixed
    # precision, and TFLite on TensorFlow. The eager LoRA path of every
    # projection runs here (self-attention, unfused).
    run_layer_test(
        TransformerBlock,
        {"num_heads": 4, "ffn_units": 24, "num_kv_heads": 2, "lora_rank": 2, "lora_alpha": 4.0},
        TOKENS,
        expected_output_shape=TOKENS.shape,
    )


@pytest.mark.parametrize(
    "layer_cls, init_kwargs",
    [
        (TransformerBlock, {"num_heads": 4, "ffn_units": 24}),
        (MultiHeadAttention, {"num_heads": 4, "key_dim": 4}),
        (FeedForward, {"ffn_units": 24}),
    ],
    ids=["block", "attention", "ffn"],
)
def test_lora_rank_config_and_projection_types(layer_cls, init_kwargs):
    plain = layer_cls(**init_kwargs)
    assert plain.get_config()["lora_rank"] is None
    lora_keys = {"lora_rank": 2, "lora_alpha": 3.0, "lora_dropout": 0.1}
    lora_keys = {key: value for key, value in lora_keys.items() if key in plain.get_config()}
    adapted = layer_cls.from_config({**plain.get_config(), **lora_keys})
    config = adapted.get_config()
    assert {key: config[key] for key in lora_keys} == lora_keys
    if layer_cls is MultiHeadAttention:
        adapted.build(TOKENS.shape, TOKENS.shape)
        plain.build(TOKENS.shape, TOKENS.shape)
    else:
        adapted.build(TOKENS.shape)
        plain.build(TOKENS.shape)
    # Protocol rule 1: minus the adapters, the weights line up by name/shape.
    adapter_ids = {id(w) for w in lora.adapter_weights(adapted)}
    base = [(w.name, tuple(w.shape)) for w in adapted.weights if id(w) not in adapter_ids]
    assert base == [(w.name, tuple(w.shape)) for w in plain.weights]
    # Protocol rule 2: only the adapters train.
    assert {id(w) for w in adapted.trainable_weights} == adapter_ids
    # Attention projections use Keras' EinsumDense LoRA, the FFN LoRADense.
    expected_types = {
        TransformerBlock: {keras.layers.EinsumDense, LoRADense},
        MultiHeadAttention: {keras.layers.EinsumDense},
        FeedForward: {LoRADense},
    }[layer_cls]
    assert {type(p) for p in lora.adapted_projections(adapted)} == expected_types
    assert not lora.adapted_projections(plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lora_rank": 0}, "`lora_rank` must be"),
        ({"lora_rank": 2, "lora_alpha": -1.0}, "`lora_alpha` must be a number > 0"),
        ({"lora_rank": 2, "lora_dropout": 1.0}, "`lora_dropout`"),
    ],
)
def test_bad_lora_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerBlock(4, 24, **kwargs)
