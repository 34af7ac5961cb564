"""Each private Keras / LiteRT API that `hlkeras._compat` wraps still does
what hlkeras relies on. A failure here means an upstream release changed it:
fix `_compat.py`, not the callers."""

import keras
import pytest

from hlkeras import _compat
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import TransformerBlock


def test_sublayers_reaches_layers_nested_in_layers_and_models():
    inner_inputs = keras.Input((4, 8))
    block = TransformerBlock(2, 16, num_experts=2, name="block")
    inner = keras.Model(inner_inputs, block(inner_inputs), name="inner")
    inputs = keras.Input((4, 8))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="head")(inner(inputs)))

    found = _compat.sublayers(outer)
    names = [layer.name for layer in found]
    assert {"inner", "block", "block_moe", "head"} <= set(names)
    assert outer not in found
    assert outer in _compat.sublayers(outer, include_self=True)
    moe_layers = [layer for layer in found if isinstance(layer, MixtureOfExperts)]
    assert [layer.name for layer in moe_layers] == ["block_moe"]


def test_is_graph_model_tells_functional_and_sequential_from_subclassed():
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    class Subclassed(keras.Model):
        def call(self, inputs):
            return inputs

    assert _compat.is_graph_model(functional)
    assert _compat.is_graph_model(sequential)
    assert not _compat.is_graph_model(Subclassed())


@pytest.mark.backends("tensorflow")
def test_tflite_op_details_lists_every_op_by_name():
    from ai_edge_litert.interpreter import Interpreter

    from hlkeras import export

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(2)(inputs)))
    interpreter = Interpreter(model_content=export.model_to_tflite(model))
    names = [op["op_name"] for op in _compat.tflite_op_details(interpreter)]
    assert "FULLY_CONNECTED" in names and "SOFTMAX" in names
