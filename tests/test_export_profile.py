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


def tensor_types(tflite):
    """`[(op name, input dtypes, output dtypes)]` of the main subgraph, read
    with TensorFlow's own flatbuffer reader (the oracle for hlkeras')."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    graph = model.subgraphs[0]

    def dtypes(indices):
        return [flatbuffer_utils.type_to_name(graph.tensors[i].type) for i in indices if i >= 0]

    return [
        (
            flatbuffer_utils.opcode_to_name(model, op.opcodeIndex),
            dtypes(op.inputs),
            dtypes(op.outputs),
        )
        for op in graph.operators
    ]


@pytest.fixture(scope="module")
def small_vit():
    keras.utils.set_random_seed(0)
    return models.build(
        {"input_shape": DIGIT, "num_classes": 10, "arch": "vit", "depth": 1, "width": 16}
    )


def test_int8_keeps_the_ops_with_slow_int8_kernels_float(small_vit):
    mixed = tensor_types(convert.model_to_tflite(small_vit, "int8", representative_data=images(32)))
    float_ops = [(name, ins) for name, ins, _ in mixed if name in convert.FLOAT_IN_INT8_OPS]
    assert float_ops and all(set(ins) == {"FLOAT32"} for _, ins in float_ops)
    matmuls = [ins for name, ins, _ in mixed if name == "BATCH_MATMUL"]
    assert len(matmuls) == 2 and all(ins == ["FLOAT32", "FLOAT32"] for ins in matmuls)
    dense = [ins for name, ins, _ in mixed if name == "FULLY_CONNECTED"]
    assert dense and all(ins[:2] == ["INT8", "INT8"] for ins in dense)


def test_int8_with_int8_io_keeps_no_op_float(small_vit):
    full = convert.model_to_tflite(small_vit, "int8", representative_data=images(32), int8_io=True)
    kept_float = {*convert.FLOAT_IN_INT8_OPS, "BATCH_MATMUL"}
    for name, ins, _ in tensor_types(full):  # the converter's int8-only op set
        assert name not in kept_float or "FLOAT32" not in ins, name


def test_int8_moe_experts_run_as_int8_fully_connected_ops():
    """The export trace gives each expert its own matmul
    (`moe_ops.per_expert_matmuls`): the int8 file runs the 4 experts' two
    kernels as 8 FULLY_CONNECTED ops with int8 weights of the kernels'
    shapes (16 -> 32 -> 16), and the only BATCH_MATMULs left are attention's
    two activation products, in float. (Capacity mode: 10 of 16 tokens per
    expert, top-2; a capacity that drops nothing is the dropless layout.)"""
    from tensorflow.lite.tools import flatbuffer_utils

    keras.utils.set_random_seed(0)
    spec = {"input_shape": DIGIT, "num_classes": 10, "arch": "vit", "depth": 1, "width": 16}
    vit_moe = models.build({**spec, "num_experts": 4})
    tflite = convert.model_to_tflite(vit_moe, "int8", representative_data=images(32))
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    graph = model.subgraphs[0]
    weight_shapes = [
        tuple(graph.tensors[op.inputs[1]].shape)
        for op in graph.operators
        if flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) == "FULLY_CONNECTED"
        and flatbuffer_utils.type_to_name(graph.tensors[op.inputs[1]].type) == "INT8"
    ]
    # FULLY_CONNECTED weights are stored (out, in).
    assert weight_shapes.count((32, 16)) == 4 and weight_shapes.count((16, 32)) == 4
    matmuls = [ins for name, ins, _ in tensor_types(tflite) if name == "BATCH_MATMUL"]
    assert matmuls == [["FLOAT32", "FLOAT32"]] * 2


TOKENS = np.random.default_rng(0).integers(1, 50, size=(32, 8)).astype("int32")
SMALL = {"depth": 1, "width": 16, "input_shape": DIGIT, "num_classes": 10}


@pytest.mark.parametrize(
    "spec, calibration, conversions",
    [
        ({**SMALL, "arch": "mlp"}, images(32), 13),
        ({**SMALL, "arch": "resnet", "width": 8}, images(32), 8),
        ({**SMALL, "arch": "vit"}, images(32), 30),
        ({**SMALL, "arch": "vit", "num_experts": 4}, images(32), 37),
        ({**SMALL, "arch": "text", "input_shape": (8,), "vocabulary_size": 50}, TOKENS, 60),
    ],
    ids=["mlp", "resnet", "vit", "vit_moe", "text"],
)
def test_int8_quantize_and_dequantize_counts_stay_where_the_fixes_left_them(
    spec, calibration, conversions
):
    """A pin, not an oracle (issue 38 asks for it): the QUANTIZE +
    DEQUANTIZE ops of each builder's int8 file, counted with TensorFlow's
    flatbuffer reader, as the per-expert matmuls and the float elementwise
    ops left them. A change that reinserts conversions (an int8 op between
    float ones, a float op between int8 ones) fails here, and must say in
    its commit what it measured instead."""
    keras.utils.set_random_seed(0)
    model = models.build(spec)
    tflite = convert.model_to_tflite(
        model, "int8", representative_data=calibration, input_dtype=str(calibration.dtype)
    )
    names = [name for name, _, _ in tensor_types(tflite)]
    assert names.count("QUANTIZE") + names.count("DEQUANTIZE") == conversions
