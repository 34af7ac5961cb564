"""TransformerBlock with a sparse MixtureOfExperts FFN (`num_experts > 0`)."""

import keras
import numpy as np
import pytest
from layer_testing import heavy
from layer_testing import run_layer_test

from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import TransformerBlock

RNG = np.random.default_rng(3)
TOKENS = RNG.normal(size=(2, 6, 16)).astype("float32")


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


@heavy
def test_moe_transformer_block_contract():
    # capacity_factor 4 keeps every token, so TFLite parity covers the full
    # path. top_k = num_experts: the mixed_bfloat16 copy may send a near-tie
    # token to another expert, a discrete change no tolerance covers; top-2
    # routing under bfloat16 is in test_moe.py's contract tests.
    run_layer_test(
        TransformerBlock,
        {"num_heads": 4, "ffn_units": 24, "num_experts": 4, "top_k": 4, "capacity_factor": 4.0},
        TOKENS,
        expected_output_shape=TOKENS.shape,
    )


def test_moe_block_equals_its_sublayers_composed():
    block = TransformerBlock(4, 24, num_experts=4, top_k=1, causal=True)
    output = to_numpy(block(TOKENS))
    assert isinstance(block.ffn, MixtureOfExperts)
    assert (block.ffn.num_experts, block.ffn.top_k) == (4, 1)
    normed = block.attention_norm(TOKENS)
    x = keras.ops.add(TOKENS, block.attention(normed, normed))
    reference = keras.ops.add(x, block.ffn(block.ffn_norm(x)))
    np.testing.assert_allclose(output, to_numpy(reference), rtol=1e-5, atol=1e-5)


def test_moe_block_adds_the_router_losses():
    tokens = keras.Input(shape=(None, 16))
    model = keras.Model(tokens, TransformerBlock(4, 24, num_experts=4)(tokens))
    model(TOKENS, training=True)
    # Load-balance and router z-loss of the one MoE layer, both positive.
    assert len(model.losses) == 2
    assert all(float(to_numpy(loss)) > 0 for loss in model.losses)


def test_moe_block_checks_top_k_at_construction():
    with pytest.raises(ValueError, match=r"`top_k`.*5"):
        TransformerBlock(4, 24, num_experts=4, top_k=5)
