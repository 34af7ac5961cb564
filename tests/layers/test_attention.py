import keras
import numpy as np
import pytest
from layer_testing import heavy
from layer_testing import run_layer_test

from hlkeras.layers import FeedForward
from hlkeras.layers import MultiHeadAttention
from hlkeras.layers import PositionEmbedding
from hlkeras.layers import TransformerBlock
from hlkeras.layers import attention
from hlkeras.layers import attention_ops

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(0)
BATCH, QUERY_LENGTH, KEY_LENGTH, FEATURES = 2, 5, 7, 16
QUERY = RNG.normal(size=(BATCH, QUERY_LENGTH, FEATURES)).astype("float32")
VALUE = RNG.normal(size=(BATCH, KEY_LENGTH, FEATURES)).astype("float32")
VALUE_12 = RNG.normal(size=(BATCH, KEY_LENGTH, 12)).astype("float32")
MASK = RNG.random((BATCH, QUERY_LENGTH, KEY_LENGTH)) > 0.3
SELF_MASK = RNG.random((BATCH, QUERY_LENGTH, QUERY_LENGTH)) > 0.3


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def randomize_biases(layer):
    """Zero-initialized biases would hide a bias that is never added."""
    for dense in (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense):
        dense.bias.assign(RNG.normal(size=dense.bias.shape).astype("float32"))


def weights_of(layer):
    """(kernel, bias) of q, k, v, output as NumPy, kernels flattened to 2D
    (in, out) from Keras' EinsumDense layout (in, heads, dim) / (heads, dim, out)."""
    weights = {}
    for name, dense in (
        ("query", layer.query_dense),
        ("key", layer.key_dense),
        ("value", layer.value_dense),
        ("output", layer.output_dense),
    ):
        kernel, bias = to_numpy(dense.kernel), to_numpy(dense.bias)
        if name == "output":
            kernel = kernel.reshape(-1, kernel.shape[-1])
        else:
            kernel, bias = kernel.reshape(kernel.shape[0], -1), bias.ravel()
        weights[name] = (kernel, bias)
    return weights


def copy_into_keras(ours, reference):
    """The drop-in promise: Keras' layer takes hlkeras' weights as they are."""
    reference.set_weights(ours.get_weights())


def numpy_softmax(logits):
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def numpy_rope(x, max_wavelength=10000):
    """Rotates each feature pair (i, i + dim/2) of `x` (batch, length, heads,
    dim) at position p by p * max_wavelength ** (-2i/dim), one 2x2 rotation
    matrix at a time."""
    _, length, _, dim = x.shape
    half = dim // 2
    rotated = np.empty_like(x, dtype="float64")
    for position in range(length):
        for i in range(half):
            angle = position * max_wavelength ** (-2.0 * i / dim)
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            pair = np.stack([x[:, position, :, i], x[:, position, :, i + half]], -1)
            turned = pair @ rotation.T
            rotated[:, position, :, i] = turned[..., 0]
            rotated[:, position, :, i + half] = turned[..., 1]
    return rotated


def numpy_attention(layer, query, value, mask=None, causal=False):
    """Reference grouped-query attention in float64 NumPy, from the layer's
    weights: kv head k serves query heads k*G .. k*G+G-1."""
    weights = weights_of(layer)
    heads, kv_heads = layer.num_heads, layer.num_kv_heads

    def project(x, name, num):
        kernel, bias = weights[name]
        out = x.astype("float64") @ kernel + bias
        return out.reshape(out.shape[:2] + (num, -1))

    q = project(query, "query", heads)
    k = project(value, "key", kv_heads)
    v = project(value, "value", kv_heads)
    if layer.rope:
        q, k = numpy_rope(q), numpy_rope(k)
    group = heads // kv_heads
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(layer.key_dim)
    allowed = np.ones(logits.shape, bool)
    if mask is not None:
        allowed &= mask[:, None]
    if causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool))
    probabilities = numpy_softmax(np.where(allowed, logits, -1e9))
    attended = np.einsum("bnts,bsnh->btnh", probabilities, v)
    attended = attended.reshape(attended.shape[:2] + (-1,))
    kernel, bias = weights["output"]
    return attended @ kernel + bias


# --- the layer contract (shared helper) -------------------------------------


@pytest.mark.parametrize(
    "init_kwargs, input_data, expected_shape",
    [
        ({"num_heads": 4, "key_dim": 8}, [QUERY, VALUE], (2, 5, 16)),
        (
            {"num_heads": 4, "key_dim": 8, "num_kv_heads": 2, "rope": True, "causal": True},
            [QUERY, VALUE],
            (2, 5, 16),
        ),
        (
            {
                "num_heads": 2,
                "key_dim": 6,
                "value_dim": 4,
                "output_shape": 10,
                "num_kv_heads": 1,
                "use_bias": False,
                "dropout": 0.2,
                "seed": 3,
            },
            [QUERY, VALUE_12],
            (2, 5, 10),
        ),
    ],
    ids=["cross", "gqa-rope-causal", "mqa-dims-dropout"],
)
@heavy
def test_multi_head_attention_contract(init_kwargs, input_data, expected_shape):
    run_layer_test(
        MultiHeadAttention,
        init_kwargs,
        input_data,
        expected_output_shape=expected_shape,
    )


@pytest.mark.parametrize(
    "init_kwargs",
    [
        {"ffn_units": 32},
        {"ffn_units": 16, "activation": "relu", "dropout": 0.1, "kernel_regularizer": "l2"},
    ],
)
def test_feed_forward_contract(init_kwargs):
    run_layer_test(FeedForward, init_kwargs, QUERY, expected_output_shape=QUERY.shape)


@heavy
def test_transformer_block_contract():
    # A single input: the attention inside runs the fused self-attention path.
    # One config only (CI budget); the default config is covered by the
    # composition and padding tests below.
    init_kwargs = {
        "num_heads": 4,
        "ffn_units": 24,
        "num_kv_heads": 2,
        "causal": True,
        "dropout": 0.1,
        "drop_path": 0.2,
        "activation": "silu",
        "key_dim": 6,
    }
    run_layer_test(TransformerBlock, init_kwargs, QUERY, expected_output_shape=QUERY.shape)


# --- oracle: keras.layers.MultiHeadAttention with the same weights -------------


@pytest.mark.parametrize(
    "call_kwargs",
    [
        {},
        {"attention_mask": MASK},
        {"use_causal_mask": True},
        {"attention_mask": MASK, "use_causal_mask": True},
    ],
    ids=["plain", "attention-mask", "causal", "mask-and-causal"],
)
def test_cross_attention_equals_keras(call_kwargs):
    ours = MultiHeadAttention(4, 8)
    ours(QUERY, VALUE)
    randomize_biases(ours)
    reference = keras.layers.MultiHeadAttention(4, 8)
    reference(QUERY, VALUE)
    copy_into_keras(ours, reference)
    np.testing.assert_allclose(
        to_numpy(ours(QUERY, VALUE, **call_kwargs)),
        to_numpy(reference(QUERY, VALUE, **call_kwargs)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "call_kwargs",
    [{}, {"attention_mask": SELF_MASK}, {"use_causal_mask": True}],
    ids=["plain", "attention-mask", "causal"],
)
def test_fused_self_attention_equals_keras(call_kwargs):
    ours = MultiHeadAttention(4, 8, output_shape=12)
    ours(QUERY, QUERY)
    randomize_biases(ours)
    reference = keras.layers.MultiHeadAttention(4, 8, output_shape=12)
    reference(QUERY, QUERY)
    copy_into_keras(ours, reference)
    np.testing.assert_allclose(
        to_numpy(ours(QUERY, QUERY, **call_kwargs)),
        to_numpy(reference(QUERY, QUERY, **call_kwargs)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_causal_constructor_argument_equals_keras_use_causal_mask():
    ours = MultiHeadAttention(2, 8, causal=True)
    ours(QUERY, QUERY)
    randomize_biases(ours)
    reference = keras.layers.MultiHeadAttention(2, 8)
    reference(QUERY, QUERY)
    copy_into_keras(ours, reference)
    np.testing.assert_allclose(
        to_numpy(ours(QUERY, QUERY)),
        to_numpy(reference(QUERY, QUERY, use_causal_mask=True)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_attention_scores_equal_keras():
    ours = MultiHeadAttention(4, 8)
    ours(QUERY, VALUE)
    reference = keras.layers.MultiHeadAttention(4, 8)
    reference(QUERY, VALUE)
    copy_into_keras(ours, reference)
    output, scores = ours(QUERY, VALUE, attention_mask=MASK, return_attention_scores=True)
    ref_output, ref_scores = reference(
        QUERY, VALUE, attention_mask=MASK, return_attention_scores=True
    )
    assert tuple(scores.shape) == (BATCH, 4, QUERY_LENGTH, KEY_LENGTH)
    np.testing.assert_allclose(to_numpy(scores), to_numpy(ref_scores), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(output), to_numpy(ref_output), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call_kwargs",
    [{}, {"attention_mask": MASK}, {"use_causal_mask": True}],
    ids=["plain", "attention-mask", "causal"],
)
@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_grouped_query_attention_weights_load_and_give_keras_outputs(call_kwargs, self_attention):
    value = QUERY if self_attention else VALUE
    if self_attention and "attention_mask" in call_kwargs:
        call_kwargs = {"attention_mask": SELF_MASK}
    reference = keras.layers.GroupQueryAttention(
        head_dim=8, num_query_heads=4, num_key_value_heads=2
    )
    reference(QUERY, value)
    reference.set_weights(
        [RNG.normal(scale=0.3, size=w.shape).astype("float32") for w in reference.weights]
    )
    ours = MultiHeadAttention(4, 8, num_kv_heads=2)
    ours(QUERY, value)
    assert [tuple(w.shape) for w in ours.weights] == [tuple(w.shape) for w in reference.weights]
    ours.set_weights(reference.get_weights())
    np.testing.assert_allclose(
        to_numpy(ours(QUERY, value, **call_kwargs)),
        to_numpy(reference(QUERY, value, **call_kwargs)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("attention_axes", [(1,), (2,), (1, 2)], ids=["axis1", "axis2", "2d"])
def test_attention_axes_equal_keras(attention_axes):
    # Images as (batch, rows, columns, features): attention along rows,
    # along columns, or over both.
    images = RNG.normal(size=(2, 3, 4, FEATURES)).astype("float32")
    reference = keras.layers.MultiHeadAttention(2, 4, attention_axes=attention_axes)
    reference(images, images)
    ours = MultiHeadAttention(2, 4, attention_axes=attention_axes)
    ours(images, images)
    randomize_biases(ours)
    copy_into_keras(ours, reference)
    output, scores = ours(images, images, return_attention_scores=True)
    ref_output, ref_scores = reference(images, images, return_attention_scores=True)
    np.testing.assert_allclose(to_numpy(output), to_numpy(ref_output), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(scores), to_numpy(ref_scores), rtol=1e-5, atol=1e-6)


def _masked_model(layer, vocabulary=10):
    """Embedding(mask_zero) -> layer(x, x) -> masked average pooling: the
    pooling only agrees with Keras if the output mask propagates too."""
    tokens = keras.Input(shape=(None,), dtype="int32")
    embedded = keras.layers.Embedding(vocabulary, FEATURES, mask_zero=True)(tokens)
    attended = layer(embedded, embedded)
    pooled = keras.layers.GlobalAveragePooling1D()(attended)
    return keras.Model(tokens, [attended, pooled])


def test_padding_masks_propagate_like_keras():
    tokens = np.array([[3, 4, 5, 0, 0], [1, 2, 3, 4, 0]], dtype="int32")
    ours = _masked_model(MultiHeadAttention(4, 8))
    reference = _masked_model(keras.layers.MultiHeadAttention(4, 8))
    reference.layers[1].set_weights(ours.layers[1].get_weights())
    randomize_biases(ours.layers[2])
    copy_into_keras(ours.layers[2], reference.layers[2])
    attended, pooled = (to_numpy(x) for x in ours(tokens))
    ref_attended, ref_pooled = (to_numpy(x) for x in reference(tokens))
    np.testing.assert_allclose(attended, ref_attended, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    # The padding matters: without it the valid positions would differ.
    embedded = to_numpy(ours.layers[1](tokens))  # NumPy: no mask attached
    unmasked = to_numpy(ours.layers[2](embedded, embedded))
    assert np.abs(unmasked[0, :3] - attended[0, :3]).max() > 1e-3


# --- oracle: NumPy references ----------------------------------------------------


@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
@pytest.mark.parametrize("num_kv_heads", [1, 2], ids=["mqa", "gqa2"])
def test_grouped_query_equals_mha_with_repeated_kv_heads(num_kv_heads, self_attention):
    value = QUERY if self_attention else VALUE
    grouped = MultiHeadAttention(4, 8, num_kv_heads=num_kv_heads)
    grouped(QUERY, value)
    randomize_biases(grouped)
    full = MultiHeadAttention(4, 8)
    full(QUERY, value)
    group = 4 // num_kv_heads
    for name in ("query", "key", "value", "output"):
        source, target = getattr(grouped, f"{name}_dense"), getattr(full, f"{name}_dense")
        kernel, bias = to_numpy(source.kernel), to_numpy(source.bias)
        if name in ("key", "value"):
            # kv head k serves query heads k*G .. k*G+G-1: repeat each head.
            kernel, bias = np.repeat(kernel, group, axis=1), np.repeat(bias, group, axis=0)
        target.set_weights([kernel, bias])
    for kwargs in ({}, {"attention_mask": MASK[:, :, : value.shape[1]]}, {"use_causal_mask": True}):
        np.testing.assert_allclose(
            to_numpy(grouped(QUERY, value, **kwargs)),
            to_numpy(full(QUERY, value, **kwargs)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_rotary_embedding_equals_numpy_rotation():
    x = RNG.normal(size=(2, 6, 3, 8)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(attention_ops.rotary_embedding(x)),
        numpy_rope(x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_rope_logits_depend_only_on_relative_position():
    # The defining property of RoPE: <rot(q, i), rot(k, j)> depends on i - j.
    q = np.tile(RNG.normal(size=(1, 1, 1, 8)), (1, 6, 1, 1)).astype("float32")
    k = np.tile(RNG.normal(size=(1, 1, 1, 8)), (1, 6, 1, 1)).astype("float32")
    rq, rk = (
        to_numpy(attention_ops.rotary_embedding(q)),
        to_numpy(attention_ops.rotary_embedding(k)),
    )
    logits = np.einsum("btnh,bsnh->ts", rq, rk)
    for offset in range(-5, 6):
        diagonal = np.diagonal(logits, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "init_kwargs, self_attention, mask",
    [
        ({"num_kv_heads": 2, "rope": True}, True, None),
        ({"num_kv_heads": 2, "rope": True, "causal": True}, True, SELF_MASK),
        ({"num_kv_heads": 1, "rope": True, "value_dim": 6}, False, MASK),
    ],
    ids=["self-gqa-rope", "self-gqa-rope-causal-mask", "cross-mqa-rope-value-dim"],
)
@pytest.mark.parametrize("core", attention.ATTENTION_CORES)
def test_layer_equals_numpy_reference(init_kwargs, self_attention, mask, core):
    value = QUERY if self_attention else VALUE
    layer = MultiHeadAttention(4, 8, attention_core=core, **init_kwargs)
    assert MultiHeadAttention.from_config(layer.get_config()).attention_core == core
    layer(QUERY, value)
    randomize_biases(layer)
    call_kwargs = {} if mask is None else {"attention_mask": mask}
    np.testing.assert_allclose(
        to_numpy(layer(QUERY, value, **call_kwargs)),
        numpy_attention(layer, QUERY, value, mask, causal=layer.causal),
        rtol=1e-4,
        atol=1e-4,
    )


def test_attention_dropout_only_in_training():
    layer = MultiHeadAttention(4, 8, dropout=0.5, seed=1)
    inference = to_numpy(layer(QUERY, VALUE, training=False))
    np.testing.assert_allclose(
        inference, numpy_attention(layer, QUERY, VALUE), rtol=1e-4, atol=1e-4
    )
    assert np.abs(to_numpy(layer(QUERY, VALUE, training=True)) - inference).max() > 1e-3


def test_transformer_block_equals_its_sublayers_composed():
    block = TransformerBlock(4, 24, num_kv_heads=2, causal=True)
    output = to_numpy(block(QUERY))
    hidden_kernel, hidden_bias = (to_numpy(w) for w in block.ffn.hidden_dense.weights)
    output_kernel, output_bias = (to_numpy(w) for w in block.ffn.output_dense.weights)

    def layer_norm(x):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5)

    def gelu(x):
        return to_numpy(keras.activations.gelu(x.astype("float32")))

    normed = layer_norm(QUERY.astype("float64")).astype("float32")
    x = QUERY + numpy_attention(block.attention, normed, normed, causal=True)
    ffn = gelu(layer_norm(x) @ hidden_kernel + hidden_bias) @ output_kernel + output_bias
    np.testing.assert_allclose(output, x + ffn, rtol=1e-4, atol=1e-4)


def test_transformer_block_ignores_padded_positions():
    # With a padding mask, each sequence's valid positions must equal the
    # block applied to that sequence cut to its valid length.
    lengths = (3, 5)
    padded = QUERY.copy()
    padded[0, lengths[0] :] = 0.0
    block = TransformerBlock(4, 32, causal=False)
    tokens = keras.Input(shape=(None, FEATURES))
    model = keras.Model(tokens, block(keras.layers.Masking(0.0)(tokens)))
    output = to_numpy(model(padded))
    for row, length in enumerate(lengths):
        alone = to_numpy(block(padded[row : row + 1, :length]))
        np.testing.assert_allclose(output[row : row + 1, :length], alone, rtol=1e-5, atol=1e-5)


# --- masked keys have no effect, whatever they hold ---------------------------------

# Large hidden keys/values (padding embeddings, a memory with large
# activations): exp() of a masked score above the kept maximum overflows, so
# a softmax that multiplies masked terms by 0 returns NaN (inf * 0).
MASKED_SCALES = (1e2, 1e4, 1e30)
VISIBLE_KEYS = 4


def large_hidden_keys(x, scale, visible=VISIBLE_KEYS):
    hidden = x.copy()
    hidden[:, visible:] *= scale
    return hidden


@pytest.mark.parametrize("scale", MASKED_SCALES)
@pytest.mark.parametrize(
    "init_kwargs",
    [
        {"num_heads": 2, "key_dim": 8},
        {"num_heads": 4, "key_dim": 4, "num_kv_heads": 2},  # GQA
        {"num_heads": 4, "key_dim": 4, "num_kv_heads": 1, "attention_core": "einsum"},
        {"num_heads": 2, "key_dim": 8, "attention_core": "dot_product_attention"},
    ],
)
def test_masked_keys_have_no_effect_in_cross_attention(init_kwargs, scale):
    # Oracle: the same layer called on the visible keys and values alone.
    layer = MultiHeadAttention(**init_kwargs)
    value = large_hidden_keys(VALUE, scale)
    mask = np.ones((BATCH, QUERY_LENGTH, KEY_LENGTH), bool)
    mask[:, :, VISIBLE_KEYS:] = False
    output = to_numpy(layer(QUERY, value, attention_mask=mask))
    alone = to_numpy(layer(QUERY, value[:, :VISIBLE_KEYS]))
    assert np.isfinite(output).all(), f"{np.isnan(output).sum()} NaN of {output.size}"
    np.testing.assert_allclose(output, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", MASKED_SCALES)
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_have_no_effect_in_self_attention(scale, causal):
    # The padded tokens are large; each real token's output must equal the
    # layer on the real tokens alone (causal + padding: their causal prefix).
    layer = MultiHeadAttention(4, 4, num_kv_heads=2, causal=causal)
    tokens = large_hidden_keys(QUERY, scale)
    padding = np.arange(QUERY_LENGTH) < VISIBLE_KEYS
    mask = np.broadcast_to(padding, (BATCH, QUERY_LENGTH, QUERY_LENGTH))
    output = to_numpy(layer(tokens, tokens, attention_mask=mask))
    real = tokens[:, :VISIBLE_KEYS]
    alone = to_numpy(layer(real, real))
    # The padded tokens' own rows are padding; at 1e30 their scores against
    # other padded tokens overflow float32 (1e60), where torch's SDPA core
    # gives NaN (inf - inf). Only the real rows are promised.
    output = output[:, :VISIBLE_KEYS]
    assert np.isfinite(output).all(), f"{np.isnan(output).sum()} NaN of {output.size}"
    np.testing.assert_allclose(output, alone, rtol=1e-5, atol=1e-5)


def test_fully_masked_query_keeps_the_uniform_average_of_keras():
    # The documented behaviour of a query that may attend to no key: Keras'
    # MultiHeadAttention averages the values uniformly.
    layer = MultiHeadAttention(2, 8)
    reference = keras.layers.MultiHeadAttention(2, 8)
    reference(QUERY, VALUE)
    layer(QUERY, VALUE)
    copy_into_keras(layer, reference)
    mask = np.ones((BATCH, QUERY_LENGTH, KEY_LENGTH), bool)
    mask[:, 0] = False
    np.testing.assert_allclose(
        to_numpy(layer(QUERY, VALUE, attention_mask=mask)),
        to_numpy(reference(QUERY, VALUE, attention_mask=mask)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("scale", MASKED_SCALES)
def test_masked_softmax_gives_masked_positions_exactly_zero(scale):
    scores = RNG.normal(size=(3, 6)).astype("float32")
    scores[:, 3:] = scale * np.abs(scores[:, 3:])
    scores[2, 5] = np.finfo("float32").max
    mask = np.arange(6) < 3
    weights = to_numpy(attention_ops.masked_softmax(scores, mask))
    expected = np.exp(scores[:, :3] - scores[:, :3].max(-1, keepdims=True))
    np.testing.assert_allclose(
        weights[:, :3], expected / expected.sum(-1, keepdims=True), atol=1e-6
    )
    assert not weights[:, 3:].any()


# --- variable sequence length ------------------------------------------------------


def test_variable_length_input_matches_fixed_length_layer():
    layer = MultiHeadAttention(4, 8, num_kv_heads=2, rope=True, causal=True)
    tokens = keras.Input(shape=(None, FEATURES))
    model = keras.Model(tokens, layer(tokens, tokens))
    assert model.output_shape == (None, None, FEATURES)
    for length in (3, 6):
        x = (
            QUERY[:, :length]
            if length <= QUERY_LENGTH
            else np.concatenate([QUERY, QUERY[:, : length - QUERY_LENGTH]], axis=1)
        )
        np.testing.assert_allclose(
            to_numpy(model.predict(x, verbose=0)),
            numpy_attention(layer, x, x, causal=True),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.backends("tensorflow")
def test_variable_length_transformer_block_converts_to_tflite():
    from hlkeras import export

    tokens = keras.Input(shape=(None, FEATURES))
    model = keras.Model(tokens, TransformerBlock(4, 32, causal=True)(tokens))
    tflite_model = export.model_to_tflite(model)
    for length in (3, 6):
        x = np.concatenate([QUERY, QUERY], axis=1)[:, :length]
        np.testing.assert_allclose(
            export.run_tflite(tflite_model, x),
            to_numpy(model.predict(x, verbose=0)),
            rtol=0,
            atol=1e-4,
        )


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("scale", MASKED_SCALES)
def test_masked_keys_have_no_effect_in_the_exported_tflite(scale):
    # The float32 .tflite keeps the promise too; run in a plain LiteRT
    # interpreter (not hlkeras' runner), the inputs fed by name.
    from ai_edge_litert.interpreter import Interpreter

    from hlkeras import export

    query = keras.Input((QUERY_LENGTH, FEATURES), name="query")
    value = keras.Input((KEY_LENGTH, FEATURES), name="value")
    mask = keras.Input((QUERY_LENGTH, KEY_LENGTH), dtype="bool", name="mask")
    layer = MultiHeadAttention(4, 4, num_kv_heads=2)
    model = keras.Model([query, value, mask], layer(query, value, attention_mask=mask))
    hidden = large_hidden_keys(VALUE, scale)
    visible = np.zeros((BATCH, QUERY_LENGTH, KEY_LENGTH), bool)
    visible[:, :, :VISIBLE_KEYS] = True
    runner = Interpreter(model_content=export.model_to_tflite(model)).get_signature_runner()
    for row in range(BATCH):
        feeds = {"query": QUERY[row : row + 1], "value": hidden[row : row + 1]}
        output = runner(**feeds, mask=visible[row : row + 1])
        (output,) = output.values()
        alone = to_numpy(layer(QUERY[row : row + 1], VALUE[row : row + 1, :VISIBLE_KEYS]))
        np.testing.assert_allclose(output, alone, rtol=1e-5, atol=1e-5)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.neutral
@pytest.mark.parametrize(
    "make_layer, pattern",
    [
        (lambda: MultiHeadAttention(4, 8, num_kv_heads=3), r"`num_kv_heads`.*=3.*num_heads=4"),
        (lambda: MultiHeadAttention(4, 7, rope=True), r"`key_dim`.*even.*key_dim=7"),
        (lambda: MultiHeadAttention(0, 8), r"`num_heads`.*num_heads=0"),
        (lambda: MultiHeadAttention(4, 8, dropout=1.0), r"`dropout`.*1.0"),
        (lambda: MultiHeadAttention(4, 8, value_dim=-2), r"`value_dim`.*-2"),
        (lambda: MultiHeadAttention(4, 8, num_kv_heads=0), r"`num_kv_heads`.*=0"),
        (
            lambda: MultiHeadAttention(4, 8, attention_core="flash"),
            r"`attention_core`.*'dot_product_attention'.*attention_core='flash'",
        ),
        (lambda: TransformerBlock(4, 0), r"`ffn_units`.*0"),
        (lambda: TransformerBlock(4, 8, num_kv_heads=3), r"`num_kv_heads`.*=3"),
        (lambda: TransformerBlock(4, 8, drop_path=1.5), r"`drop_path`.*1.5"),
        (lambda: TransformerBlock(4, 8, activation="nope"), r"`activation`.*'nope'"),
        (lambda: TransformerBlock(4, 8, num_experts=-1), r"`num_experts`.*-1"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(make_layer, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_layer()


def test_feature_mismatch_that_cannot_be_projected():
    layer = MultiHeadAttention(4, 8)
    layer(QUERY, VALUE)
    with pytest.raises(ValueError, match=r"`value` has 12 features.*built for 16"):
        layer(QUERY, VALUE_12)
    with pytest.raises(ValueError, match=r"`query` has 12 features.*built for 16"):
        layer(VALUE_12, VALUE)


def test_value_and_key_lengths_must_agree():
    with pytest.raises(ValueError, match=r"`value` and `key`.*\(2, 7, 16\).*\(2, 5, 16\)"):
        MultiHeadAttention(4, 8)(QUERY, VALUE, key=QUERY)


def test_inputs_must_be_sequences():
    with pytest.raises(ValueError, match=r"`query`.*\(batch, length, features\).*\(2, 16\)"):
        MultiHeadAttention(4, 8)(QUERY[:, 0], VALUE)


@pytest.mark.parametrize(
    "mask_shape",
    [
        (BATCH, QUERY_LENGTH, 3),
        (3, QUERY_LENGTH, KEY_LENGTH),
        (BATCH, 3, QUERY_LENGTH, KEY_LENGTH),
        (KEY_LENGTH,),
    ],
)
def test_mask_that_cannot_broadcast_shows_both_shapes(mask_shape):
    layer = MultiHeadAttention(4, 8)
    expected = (
        r"`attention_mask`.*"
        + _escaped((BATCH, 4, QUERY_LENGTH, KEY_LENGTH))
        + r".*attention_mask\.shape="
        + _escaped(mask_shape)
    )
    with pytest.raises(ValueError, match=expected):
        layer(QUERY, VALUE, attention_mask=np.ones(mask_shape, bool))


def _escaped(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_transformer_block_needs_heads_to_divide_width_without_key_dim():
    with pytest.raises(ValueError, match=r"`num_heads`.*num_heads=3.*d=16"):
        TransformerBlock(3, 8)(QUERY)


# --- PositionEmbedding ------------------------------------------------------------------


def test_position_embedding_contract():
    run_layer_test(
        PositionEmbedding,
        {"max_length": 8},
        QUERY,
        expected_output_shape=QUERY.shape,
    )


def test_position_embedding_adds_row_i_to_position_i_for_any_length():
    layer = PositionEmbedding(8)
    layer.build((None, None, QUERY.shape[-1]))
    table = np.random.default_rng(3).normal(size=(8, QUERY.shape[-1])).astype("float32")
    layer.embeddings.assign(table)
    for length in (QUERY.shape[1], 2):
        inputs = QUERY[:, :length]
        np.testing.assert_allclose(
            to_numpy(layer(inputs)), inputs + table[None, :length], rtol=1e-6, atol=1e-6
        )


def test_position_embedding_refuses_sequences_longer_than_its_table():
    with pytest.raises(ValueError, match=r"max_length=2.*length 5"):
        PositionEmbedding(2).build((None, 5, 8))
    with pytest.raises(ValueError, match=r"`max_length`.*0"):
        PositionEmbedding(0)
