"""The per-operator profile of a `.tflite` file (`hlkeras.export.profile`).

Its times cannot be checked against an oracle on a shared machine; what
makes them the times of the model's operators can: every one-operator model
computes, from the tensors the whole model had at that point, exactly the
tensors the whole model computed there, once per copy, and the profile
lists the model's operators in the model's order."""

import keras
import numpy as np
import pytest

from hlkeras import _compat
from hlkeras import models
from hlkeras.export import convert
from hlkeras.export import profile

pytestmark = pytest.mark.backends("tensorflow")  # the converter; a .tflite is backend-neutral

DIGIT = (8, 8, 1)


def images(count, seed=0):
    return np.random.default_rng(seed).random((count, *DIGIT)).astype("float32")


@pytest.fixture(scope="module")
def tflite_files():
    """A small MoE vit in float32 (attention, routing, gathers) and an int8
    MLP (quantized tensors, QUANTIZE/DEQUANTIZE)."""
    keras.utils.set_random_seed(0)
    spec = {"input_shape": DIGIT, "num_classes": 10}
    vit = models.build({**spec, "arch": "vit", "num_experts": 2, "depth": 1, "width": 16})
    mlp = models.build({**spec, "arch": "mlp", "depth": 1, "width": 16})
    return {
        "vit_moe float32": convert.model_to_tflite(vit),
        "mlp int8": convert.model_to_tflite(mlp, "int8", representative_data=images(32)),
    }


def reference_interpreter(tflite_model):
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.interpreter import OpResolverType

    return Interpreter(
        model_content=tflite_model,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )


@pytest.mark.parametrize("name", ["vit_moe float32", "mlp int8"])
def test_each_one_op_model_recomputes_what_the_whole_model_computed(tflite_files, name):
    from ai_edge_litert.tools import flatbuffer_utils

    tflite = tflite_files[name]
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite))
    tensors = profile.all_tensors(tflite, images(1, seed=3))
    operators = model.subgraphs[0].operators
    for index, operator in enumerate(operators):
        interpreter = reference_interpreter(profile.single_op_model(model, index, copies=3))
        profile.set_inputs(interpreter, [tensors[t] for t in profile.free_inputs(model, index)])
        interpreter.invoke()
        outputs = interpreter.get_output_details()
        assert len(outputs) == 3 * len(operator.outputs)
        for position, detail in enumerate(outputs):
            expected = tensors[operator.outputs[position % len(operator.outputs)]]
            np.testing.assert_array_equal(
                interpreter.get_tensor(detail["index"]), expected, err_msg=f"operator {index}"
            )


def test_the_profile_lists_the_models_operators_in_order(tflite_files):
    from ai_edge_litert.interpreter import Interpreter

    tflite = tflite_files["mlp int8"]
    whole_us, times = profile.op_profile(tflite, images(1), repeats=3, calls=2)
    listed = [op["op_name"] for op in _compat.tflite_op_details(Interpreter(model_content=tflite))]
    assert [op.name for op in times] == listed
    assert [op.index for op in times] == list(range(len(listed)))
    assert "QUANTIZE" in listed and whole_us > 0
    assert all(op.microseconds >= 0 for op in times)
    totals = profile.summary(times)
    assert {name: count for name, (count, _) in totals.items()} == {
        name: listed.count(name) for name in set(listed)
    }
    seconds = [total for _, total in totals.values()]
    assert seconds == sorted(seconds, reverse=True)
