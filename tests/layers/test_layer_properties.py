"""Layer invariants, checked by property-based tests (hypothesis) on random
shapes, masks and values within small bounds, for every hlkeras layer.

Each property has its own oracle: the same layer on fewer keys, on one
sample, on a shorter or permuted sequence, a NumPy mixture of experts, the
plain base model, the adapted model. Examples are derandomized (the same
draws every run) and few, so the module stays within about a minute per
backend; `HYPOTHESIS_PROFILE=thorough` draws ten times as many.
"""

import os

import keras
import numpy as np
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from layer_testing import HEAVY_MARKS
from moe_testing import layer_weights
from moe_testing import np_moe
from moe_testing import randomize_biases

from hlkeras import lora
from hlkeras.layers import AttentionPooling
from hlkeras.layers import ConvResidualBlock
from hlkeras.layers import DropPath
from hlkeras.layers import FeedForward
from hlkeras.layers import LoRADense
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import MultiHeadAttention
from hlkeras.layers import PositionEmbedding
from hlkeras.layers import ResidualBlock
from hlkeras.layers import TransformerBlock

# Each property compiles its layer for every drawn shape: 10-30 s a property
# on JAX, so they are `slow`, on every backend (layer_testing.heavy).
pytestmark = HEAVY_MARKS

settings.register_profile(
    "ci",
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=40)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SEEDS = st.integers(0, 2**16)
# Masked keys and values hold these multiples of a unit normal (big padding
# embeddings, a memory with large activations).
MASKED_SCALES = st.sampled_from([1e2, 1e4, 1e30])


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def normal(rng, *shape, scale=1.0):
    return (scale * rng.normal(size=shape)).astype("float32")


def close(actual, expected, tolerance=1e-5):
    scale = 1.0 + float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


@st.composite
def attention_shapes(draw):
    num_kv_heads = draw(st.sampled_from([1, 2]))
    return {
        "num_heads": num_kv_heads * draw(st.sampled_from([1, 2])),
        "num_kv_heads": num_kv_heads,
        "key_dim": draw(st.sampled_from([2, 4])),
        "attention_core": draw(st.sampled_from(["einsum", "dot_product_attention"])),
    }


# --- masked keys have no effect ------------------------------------------------------


@PROFILE
@given(
    shape=attention_shapes(),
    batch=st.integers(1, 3),
    query_length=st.integers(1, 4),
    key_length=st.integers(2, 6),
    data=st.data(),
    scale=MASKED_SCALES,
    seed=SEEDS,
)
def test_masked_keys_have_no_effect_on_attention(
    shape, batch, query_length, key_length, data, scale, seed
):
    rng = np.random.default_rng(seed)
    visible = data.draw(st.integers(1, key_length - 1), label="visible")
    layer = MultiHeadAttention(**shape)
    query = normal(rng, batch, query_length, 6)
    value = normal(rng, batch, key_length, 5)
    value[:, visible:] *= scale
    mask = np.zeros((batch, query_length, key_length), bool)
    mask[:, :, :visible] = True
    output = to_numpy(layer(query, value, attention_mask=mask))
    assert np.isfinite(output).all()
    close(output, to_numpy(layer(query, value[:, :visible])))


@PROFILE
@given(
    batch=st.integers(1, 3),
    length=st.integers(2, 6),
    data=st.data(),
    units=st.sampled_from([None, 3]),
    scale=MASKED_SCALES,
    seed=SEEDS,
)
def test_padded_positions_have_no_effect_on_attention_pooling(
    batch, length, data, units, scale, seed
):
    rng = np.random.default_rng(seed)
    visible = data.draw(st.integers(1, length - 1), label="visible")
    layer = AttentionPooling(units)
    x = normal(rng, batch, length, 4)
    padded = x.copy()
    padded[:, visible:] *= scale
    mask = np.broadcast_to(np.arange(length) < visible, (batch, length))
    close(to_numpy(layer(padded, mask=mask)), to_numpy(layer(x[:, :visible])))


# --- every layer: batch independence at inference, finite outputs ---------------------


def _sequence_case(make_layer):
    def case(rng, batch, scale):
        return make_layer(), [normal(rng, batch, 5, 8, scale=scale)]

    return case


def _attention_case(rng, batch, scale):
    layer = MultiHeadAttention(4, 2, num_kv_heads=2, rope=True, causal=True)
    x = normal(rng, batch, 5, 8, scale=scale)
    return layer, [x, x]


LAYER_CASES = {
    "ResidualBlock": lambda rng, b, s: (
        ResidualBlock(8, hidden_units=16),
        [normal(rng, b, 8, scale=s)],
    ),
    "ConvResidualBlock": lambda rng, b, s: (
        ConvResidualBlock(4, strides=2),
        [normal(rng, b, 6, 6, 3, scale=s)],
    ),
    "DropPath": lambda rng, b, s: (DropPath(0.5), [normal(rng, b, 6, scale=s)]),
    "MultiHeadAttention": _attention_case,
    "TransformerBlock": _sequence_case(lambda: TransformerBlock(2, 16)),
    "TransformerBlock+MoE": _sequence_case(
        lambda: TransformerBlock(2, 16, num_experts=4, capacity_factor=1.0)
    ),
    "FeedForward": _sequence_case(lambda: FeedForward(16)),
    "PositionEmbedding": _sequence_case(lambda: PositionEmbedding(8)),
    "MixtureOfExperts": _sequence_case(lambda: MixtureOfExperts(4, 8, capacity_factor=1.0)),
    "MixtureOfExperts-dropless": _sequence_case(
        lambda: MixtureOfExperts(3, 8, capacity_factor=None, top_k=1)
    ),
    "LoRADense": lambda rng, b, s: (LoRADense(5, rank=2), [normal(rng, b, 8, scale=s)]),
    "AttentionPooling": _sequence_case(lambda: AttentionPooling(4)),
}  # fmt: skip


@PROFILE
@given(
    name=st.sampled_from(sorted(LAYER_CASES)),
    batch=st.integers(2, 4),
    scale=st.sampled_from([1.0, 10.0, 1000.0]),
    seed=SEEDS,
)
def test_every_layer_is_batch_independent_and_finite_at_inference(name, batch, scale, seed):
    # MoE computes capacity per example, so even its drops are per sample.
    layer, inputs = LAYER_CASES[name](np.random.default_rng(seed), batch, scale)
    batched = to_numpy(layer(*inputs, training=False))
    assert np.isfinite(batched).all(), f"{name}: non-finite output for finite inputs"
    for i in range(batch):
        alone = to_numpy(layer(*[x[i : i + 1] for x in inputs], training=False))
        close(alone, batched[i : i + 1])


# --- attention: causality, key/value permutation ---------------------------------------


@PROFILE
@given(
    make=st.sampled_from(["attention", "block"]),
    length=st.integers(2, 6),
    data=st.data(),
    seed=SEEDS,
)
def test_causal_attention_never_reads_the_future(make, length, data, seed):
    rng = np.random.default_rng(seed)
    changed = data.draw(st.integers(1, length - 1), label="first changed position")
    if make == "attention":
        layer = MultiHeadAttention(2, 4, causal=True, rope=data.draw(st.booleans(), label="rope"))

        def run(x):
            return to_numpy(layer(x, x))
    else:
        layer = TransformerBlock(2, 16, causal=True)

        def run(x):
            return to_numpy(layer(x))

    x = normal(rng, 2, length, 8)
    perturbed = x.copy()
    perturbed[:, changed:] += normal(rng, 2, length - changed, 8, scale=10.0)
    np.testing.assert_allclose(run(perturbed)[:, :changed], run(x)[:, :changed], atol=1e-5)


@PROFILE
@given(shape=attention_shapes(), key_length=st.integers(2, 6), seed=SEEDS)
def test_attention_is_equivariant_to_permuting_keys_and_values(shape, key_length, seed):
    # Without RoPE, attention is a weighted sum over an unordered set.
    rng = np.random.default_rng(seed)
    layer = MultiHeadAttention(**shape)
    query, value = normal(rng, 2, 3, 6), normal(rng, 2, key_length, 5)
    mask = rng.random((2, 3, key_length)) > 0.4
    mask[..., 0] = True  # every query keeps a key
    order = rng.permutation(key_length)
    close(
        to_numpy(layer(query, value[:, order], attention_mask=mask[..., order])),
        to_numpy(layer(query, value, attention_mask=mask)),
    )


# --- MoE and LoRA against their formulas -------------------------------------------------


@PROFILE
@given(
    num_experts=st.integers(1, 4),
    data=st.data(),
    activation=st.sampled_from(["relu", "gelu"]),
    # Few distinct sizes: on JAX each new shape of the dropless path compiles.
    tokens=st.sampled_from([1, 7]),
    seed=SEEDS,
)
def test_dropless_moe_equals_the_numpy_mixture_of_its_experts(
    num_experts, data, activation, tokens, seed
):
    rng = np.random.default_rng(seed)
    top_k = data.draw(st.integers(1, num_experts), label="top_k")
    layer = MixtureOfExperts(
        num_experts, 8, top_k=top_k, capacity_factor=None, activation=activation
    )
    x = normal(rng, tokens, 6)
    layer(x)
    randomize_biases(layer, rng)
    close(to_numpy(layer(x)), np_moe(x, layer_weights(layer), top_k, activation))


def _base_model(rng, residual):
    inputs = keras.Input((6,))
    if residual:
        hidden = ResidualBlock(6, hidden_units=8, name="block")(inputs)
    else:
        hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    model.set_weights([normal(rng, *w.shape) for w in model.weights])
    return model


@PROFILE
@given(
    residual=st.booleans(),
    dora=st.booleans(),
    rank=st.integers(1, 4),
    seed=SEEDS,
)
def test_fresh_adapters_change_nothing_and_merge_equals_the_adapted_model(
    residual, dora, rank, seed
):
    rng = np.random.default_rng(seed)
    model = _base_model(rng, residual)
    x = normal(rng, 5, 6)
    adapted = lora.apply_lora(model, rank=rank, dora=dora)
    close(to_numpy(adapted(x)), to_numpy(model(x)))
    for _, layer in lora.layer_paths(adapted):
        for variable in lora.adapter_weights(layer):
            if variable.trainable:
                variable.assign(normal(rng, *variable.shape, scale=0.3))
    close(to_numpy(lora.merge_lora(adapted)(x)), to_numpy(adapted(x)))
