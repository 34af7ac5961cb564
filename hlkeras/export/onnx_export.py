"""ONNX export: tf2onnx from the TensorFlow-backend model, run in ONNX Runtime.

`hlkeras.export` calls this module for `formats=("onnx",)`; it owns the
request, the staging, the verification and the gate, as for TFLite.

The route, measured here (Keras 3.15.1, tf2onnx 1.17.0, onnxruntime 1.32):
- Keras' own `model.export(format="onnx")` on TensorFlow runs tf2onnx
  without a way to pass op handlers, so any model with an exact GELU
  (`tf.math.erfc`, which tf2onnx has no handler for) or an MoE layer (an
  int32 `one_hot` of rank 2, which tf2onnx's handler refuses) becomes a file
  ONNX Runtime rejects; it only logs the failure.
- On JAX it needs `jax2onnx`; on torch, `torch.onnx` fails on Keras'
  `Gather` lowering in `keras/src/backend/torch/nn.py` and inside
  `MixtureOfExperts.call`.
- So every backend converts as TFLite does: the model in the TensorFlow
  backend (in this process, or in the export subprocess for JAX and torch),
  its `serving` function traced with a dynamic batch dimension, and tf2onnx
  given the two op handlers below. Every built-in architecture (mlp,
  resnet, vit with and without MoE, text with transformer, GRU or LSTM
  encoders) converts to plain ONNX and matches Keras to ~1e-6.
"""

import importlib.util
import logging
import re

import numpy as np

# Opset 17: the newest every mainstream runtime (ONNX Runtime >= 1.13,
# TensorRT >= 8.6, OpenVINO >= 2022.3) executes, and one tf2onnx 1.17 emits.
ONNX_OPSET = 17
ONNX_FILENAME = "model.onnx"
ONNX_PACKAGES = ("onnx", "onnxruntime", "tf2onnx")
ONNX_EXTRA_HINT = "pip install 'hlkeras[onnx]'"


class OnnxConversionError(Exception):
    """tf2onnx could not turn the model into ONNX that ONNX Runtime runs.

    Attributes:
        ops: `(op name, TF node name)` pairs of what failed; a node name is
            the TF name scope, which holds the Keras layer's name.
        detail: tf2onnx's or ONNX Runtime's own message, one line.
    """

    def __init__(self, ops, detail=""):
        super().__init__(detail or ", ".join(op for op, _ in ops))
        self.ops = ops
        self.detail = detail


def missing_packages():
    """The ONNX packages (`ONNX_PACKAGES`) that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


# --------------------------------------------------------------------------
# Conversion (TensorFlow backend)


def convert_to_onnx(model, path):
    """Writes `model` (a TensorFlow-backend Keras model) as ONNX to `path`.

    The batch dimension is dynamic; the input keeps the model's dtype
    (float32, or int32 token ids for a text model); opset `ONNX_OPSET`.

    Raises:
        OnnxConversionError: An op has no ONNX conversion, or the converted
            graph does not load in ONNX Runtime.
    """
    import tensorflow as tf

    # tf2onnx logs every op it cannot convert at ERROR level and carries on;
    # the graph check below reports them instead, as one error.
    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)
    model_input = model.inputs[0]
    signature = [tf.TensorSpec((None, *model_input.shape[1:]), model_input.dtype, name="inputs")]
    try:
        proto = _tf2onnx_proto(model, signature)
    except Exception as error:  # tf2onnx raises many types for one failure.
        raise OnnxConversionError([], f"tf2onnx failed: {_first_line(error)}") from None
    unconverted = _ops_outside_onnx(proto)
    if unconverted:
        raise OnnxConversionError(unconverted)
    serialized = proto.SerializeToString()
    _check_loads_in_onnx_runtime(serialized)
    with open(path, "wb") as file:
        file.write(serialized)


def _tf2onnx_proto(model, signature):
    """The ONNX graph of `model` on `signature`.

    `tf2onnx.convert.from_function` leaves the eager constants the function
    captures (a `Normalization` layer's mean and variance) as graph inputs,
    which ONNX Runtime then demands in every feed; they become initializers
    holding the captured values.
    """
    import tensorflow as tf
    import tf2onnx

    serve = tf.function(lambda x: model(x, training=False), input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(
        serve,
        input_signature=signature,
        opset=ONNX_OPSET,
        custom_op_handlers=_OP_HANDLERS,
    )
    graph = serve.get_concrete_function().graph
    captured = {
        placeholder.name: value.numpy()
        for value, placeholder in zip(graph.external_captures, graph.internal_captures)
        if value.dtype != tf.resource
    }
    _inputs_to_initializers(proto.graph, captured)
    return proto


def _inputs_to_initializers(graph, values):
    """Moves the graph inputs named in `values` into initializers of those values."""
    from onnx import numpy_helper

    for value in [value for value in graph.input if value.name in values]:
        graph.input.remove(value)
        graph.initializer.append(numpy_helper.from_array(values[value.name], value.name))


def _ops_outside_onnx(proto):
    """`(op, node name)` of every node that is not an ONNX operator: a TF op
    tf2onnx left in the graph because it has no handler for it."""
    import onnx

    return [
        (node.op_type, node.name)
        for node in proto.graph.node
        if not onnx.defs.has(node.op_type, node.domain or "")
    ]


def _check_loads_in_onnx_runtime(serialized):
    try:
        new_session(serialized)
    except Exception as error:  # onnxruntime's pybind errors share no base class.
        message = _first_line(error)
        node = re.search(r'In Node, \("([^"]*)", (\w+)', message)
        ops = [(node.group(2), node.group(1))] if node else []
        raise OnnxConversionError(ops, f"ONNX Runtime rejects the graph: {message}") from None


def _first_line(error):
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:400]


# tf2onnx's custom op handlers (its documented `custom_op_handlers`
# argument): `handler(graph, node, name, args)` rewrites one TF node in place.


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """`erfc(x) = 1 - erf(x)`: TF's exact GELU is `0.5 x erfc(-x / sqrt 2)`,
    and ONNX has `Erf` but no `Erfc`. (The difference, below 1e-7 where
    erfc is tiny, is far under float32 parity tolerances.)"""
    from tf2onnx import utils

    node.type = "Erf"
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.output[0]))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype)).output[0]
    ctx.insert_new_node_on_output("Sub", node.output[0], inputs=[one, node.output[0]])


def _one_hot_as_equal_where(ctx, node, name, args):
    """`one_hot(i) = where(i[..., None] == range(depth), on, off)`, for any
    rank and dtype; tf2onnx's own handler takes only rank-1 indices unless
    the output is float (MixtureOfExperts counts queue positions with an
    int32 one-hot of shape (groups, assignments, experts))."""
    from onnx import TensorProto
    from tf2onnx import utils
    from tf2onnx.graph_builder import GraphBuilder

    indices, depth, on_value, off_value = node.input
    axis = node.get_attr_value("axis", -1)
    if axis not in (-1, ctx.get_rank(indices)):
        raise ValueError(f"one_hot with axis={axis} has no ONNX rewrite here (only the last axis)")

    def as_int64(tensor):
        return ctx.make_node("Cast", [tensor], attr={"to": TensorProto.INT64}).output[0]

    zero, one = (
        ctx.make_const(utils.make_name(f"{name}_{value}"), np.array(value, np.int64)).output[0]
        for value in (0, 1)
    )
    classes = ctx.make_node("Range", [zero, as_int64(depth), one]).output[0]
    expanded = GraphBuilder(ctx).make_unsqueeze({"data": as_int64(indices), "axes": [-1]})
    is_class = ctx.make_node("Equal", [expanded, classes]).output[0]
    shapes, dtypes = [ctx.get_shape(node.output[0])], [ctx.get_dtype(node.output[0])]
    outputs = node.output
    ctx.remove_node(node.name)
    ctx.make_node(
        "Where",
        [is_class, on_value, off_value],
        outputs=outputs,
        name=name,
        shapes=shapes,
        dtypes=dtypes,
    )


_OP_HANDLERS = {
    "Erfc": (_erfc_as_one_minus_erf, []),
    "OneHot": (_one_hot_as_equal_where, []),
}


# --------------------------------------------------------------------------
# Running in ONNX Runtime


def new_session(model):
    """An ONNX Runtime CPU session of `model` (a path or serialized bytes)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings on stderr
    return onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )


def predictor(model):
    """A function that runs `model` (a `.onnx` path or bytes) on a batch in
    one ONNX Runtime session; inputs are cast to the model input's dtype
    (a text model takes int32 token ids). Returns the first output."""
    return session_predictor(new_session(model))


def session_predictor(session):
    """`predictor` of an open ONNX Runtime `session`."""
    model_input = session.get_inputs()[0]
    dtype = _NUMPY_DTYPES.get(model_input.type, "float32")

    def predict(array):
        return session.run(None, {model_input.name: np.asarray(array, dtype)})[0]

    return predict


_NUMPY_DTYPES = {
    "tensor(float)": "float32",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


def op_names(path):
    """Sorted distinct operator names in the `.onnx` file at `path`."""
    import onnx

    return sorted({node.op_type for node in onnx.load(path).graph.node})
