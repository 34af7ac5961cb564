import keras
import numpy as np
import pytest
from layer_testing import run_layer_test

from hlkeras.layers import AttentionPooling

RNG = np.random.default_rng(0)
SEQUENCES = RNG.normal(size=(4, 5, 6)).astype("float32")
# True where a position is real; the last row is all padding.
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)


@pytest.mark.parametrize("init_kwargs", [{}, {"units": 8, "kernel_regularizer": "l2"}])
def test_attention_pooling_contract(init_kwargs):
    run_layer_test(AttentionPooling, init_kwargs, SEQUENCES, expected_output_shape=(4, 6))


def numpy_attention_pooling(x, mask, query, hidden_kernel=None, hidden_bias=None):
    hidden = x if hidden_kernel is None else np.tanh(x @ hidden_kernel + hidden_bias)
    scores = hidden @ query
    out = np.zeros((x.shape[0], x.shape[-1]), "float64")
    for row in range(x.shape[0]):
        kept = mask[row]
        if kept.any():
            weights = np.exp(scores[row, kept] - scores[row, kept].max())
            out[row] = (weights / weights.sum()) @ x[row, kept]
    return out


@pytest.mark.parametrize("units", [None, 3])
def test_attention_pooling_matches_numpy_with_padding(units):
    layer = AttentionPooling(units)
    output = keras.ops.convert_to_numpy(layer(SEQUENCES, mask=MASK))
    weights = [keras.ops.convert_to_numpy(w) for w in layer.weights]
    if units is None:
        expected = numpy_attention_pooling(SEQUENCES, MASK, weights[0])
    else:
        expected = numpy_attention_pooling(SEQUENCES, MASK, weights[2], weights[0], weights[1])
    np.testing.assert_allclose(output, expected, atol=1e-5)
    assert not output[-1].any()  # all padding pools to zeros


def test_padding_tokens_have_no_effect_after_a_masking_embedding():
    tokens = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    model = keras.Model(tokens, AttentionPooling(4)(x))
    ids = np.array([[3, 7, 1, 9]], "int32")
    padded = np.array([[3, 7, 1, 9, 0, 0, 0]], "int32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(ids)), keras.ops.convert_to_numpy(model(padded)), atol=1e-6
    )


def test_the_returned_weights_sum_to_one_over_real_positions():
    _, weights = AttentionPooling()(SEQUENCES, mask=MASK, return_attention_scores=True)
    weights = keras.ops.convert_to_numpy(weights)
    assert not weights[~MASK].any()
    np.testing.assert_allclose(weights.sum(axis=-1), [1, 1, 1, 0], atol=1e-6)


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e30])
@pytest.mark.parametrize("units", [None, 3])
def test_large_padded_positions_have_no_effect(units, scale):
    # Oracle: the real positions alone. Large padding (big embeddings) made
    # exp() of a masked score overflow, and inf * 0 is NaN.
    layer = AttentionPooling(units)
    padded = SEQUENCES.copy()
    padded[:, 3:] *= scale
    mask = np.broadcast_to(np.arange(5) < 3, (4, 5))
    output = keras.ops.convert_to_numpy(layer(padded, mask=mask))
    alone = keras.ops.convert_to_numpy(layer(SEQUENCES[:, :3]))
    np.testing.assert_allclose(output, alone, rtol=1e-5, atol=1e-5)
