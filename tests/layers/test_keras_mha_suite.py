"""The drop-in oracle: Keras' own tests of `MultiHeadAttention`
(`keras/src/layers/attention/multi_head_attention_test.py`, from the
installed keras wheel) run with `keras.src.layers.MultiHeadAttention`, the
name those tests build every layer through, replaced by hlkeras' class.

They are collected into this module, one test item per Keras test, in this
process (xdist balances them; no subprocess imports the backend again).
Keras' own skips (flash attention where the backend lacks it) are the only
skips. `benchmarks/keras_mha_suite.py` runs the same file standalone."""

import keras.src.layers
import pytest
from keras.src.layers.attention import multi_head_attention_test as keras_mha_tests
from layer_testing import HEAVY_MARKS

import hlkeras.layers

# About 50 tests of 1-9 s each on JAX (compile-bound): slow, on every backend.
pytestmark = HEAVY_MARKS


@pytest.fixture(autouse=True)
def hlkeras_class_under_keras_name(monkeypatch):
    monkeypatch.setattr(keras.src.layers, "MultiHeadAttention", hlkeras.layers.MultiHeadAttention)


class TestKerasMultiHeadAttentionSuiteOnHlkerasClass(keras_mha_tests.MultiHeadAttentionTest):
    """Every test method of Keras' `MultiHeadAttentionTest`, on hlkeras' class."""

    def test_the_keras_tests_build_the_hlkeras_class(self):
        # The suite proves nothing unless its layers are ours.
        layer = keras_mha_tests.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        assert type(layer) is hlkeras.layers.MultiHeadAttention
