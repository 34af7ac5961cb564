"""Where a `.tflite` file's batch-1 time goes, operator by operator.

LiteRT's op profiler lives in its C++ `benchmark_model` tool; the Python
interpreter of `ai-edge-litert` has none, and this machine cannot download
the binary. So each operator is timed alone: a one-operator model holds the
operator, its constant inputs and its output tensors, and is fed the
tensors the whole model computed at that point (a run with every tensor
kept). A Python `invoke` costs microseconds of its own, as much as a small
operator, so the model holds the operator once and `COPIES` times (each
copy writing its own outputs), and the operator's time is the difference
divided by `COPIES - 1`: the fixed cost of a call cancels.

What this does not see: the fusions LiteRT's XNNPACK delegate makes across
neighbouring operators. The whole model's own latency is measured beside,
so the sum of the parts can be read against it.
"""

import collections
import copy
import statistics

from hlkeras import _timing
from hlkeras.export import runtimes

COPIES = 9


OpTime = collections.namedtuple("OpTime", ["index", "name", "dtypes", "microseconds"])
OpTime.__doc__ = """One operator of the main subgraph: its position, builtin
name, the dtypes of its non-constant inputs and its batch-1 time."""


def op_profile(tflite_model, sample, repeats=15, calls=20):
    """Times every operator of a `.tflite` model (bytes) at batch 1.

    Args:
        tflite_model: the flatbuffer, as `export_model` writes it.
        sample: one float input example with a leading batch axis of 1
            (an int8-I/O file's input is quantized with its own scale).
        repeats: timed rounds per operator (the median is kept).
        calls: `invoke` calls per round.

    Returns:
        `(whole_model_microseconds, [OpTime, ...])` in the model's order.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_model))
    names = [op_name(model, op) for op in model.subgraphs[0].operators]
    tensors = all_tensors(tflite_model, sample)
    whole = _interpreter(tflite_model)
    _feed(whole, sample)
    whole_us = _invoke_microseconds(whole, repeats, calls)
    times = []
    for index, name in enumerate(names):
        one = _interpreter(single_op_model(model, index, 1))
        many = _interpreter(single_op_model(model, index, COPIES))
        inputs = free_inputs(model, index)
        for interpreter in (one, many):
            set_inputs(interpreter, [tensors[t] for t in inputs])
        seconds = _timing.time_interleaved(
            [lambda: _calls(one, calls), lambda: _calls(many, calls)], repeats, warmup=2
        )
        difference = statistics.median(m - o for o, m in zip(*seconds)) / calls
        dtypes = tuple(str(tensors[t].dtype) for t in inputs)
        times.append(OpTime(index, name, dtypes, 1e6 * max(difference, 0.0) / (COPIES - 1)))
    return whole_us, times


def single_op_model(model, index, copies=1):
    """A `.tflite` (bytes) of the main subgraph's operator `index` alone,
    `copies` times over the same inputs, each copy with its own outputs.
    Its inputs are the operator's non-constant inputs, in order; its
    outputs, every copy's outputs. `model` is a `ModelT` (left unchanged)."""
    from ai_edge_litert.tools import flatbuffer_utils

    one = copy.copy(model)
    subgraph = copy.copy(model.subgraphs[0])
    operator = subgraph.operators[index]
    subgraph.tensors = list(subgraph.tensors)
    subgraph.operators = []
    outputs = []
    for _ in range(copies):
        replica = copy.copy(operator)
        replica.outputs = []
        for tensor in operator.outputs:
            subgraph.tensors.append(copy.copy(subgraph.tensors[tensor]))
            replica.outputs.append(len(subgraph.tensors) - 1)
        subgraph.operators.append(replica)
        outputs.extend(replica.outputs)
    subgraph.inputs = free_inputs(model, index)
    subgraph.outputs = outputs
    one.subgraphs = [subgraph, *model.subgraphs[1:]]
    one.signatureDefs = []  # they name the whole model's inputs and outputs
    one.buffers = _buffers_of(model, operator)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(one))


def summary(times):
    """`{op name: (count, total microseconds)}`, slowest first."""
    totals = collections.defaultdict(lambda: [0, 0.0])
    for op in times:
        totals[op.name][0] += 1
        totals[op.name][1] += op.microseconds
    return dict(sorted(((k, tuple(v)) for k, v in totals.items()), key=lambda kv: -kv[1][1]))


def op_name(model, operator):
    """The builtin name of an operator of a `ModelT`."""
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.opcode_to_name(model, operator.opcodeIndex)


def is_constant(model, tensor_index):
    """Whether a main-subgraph tensor of a `ModelT` holds data in the file."""
    buffer = model.subgraphs[0].tensors[tensor_index].buffer
    data = model.buffers[buffer].data if buffer else None
    return data is not None and len(data) > 0


def free_inputs(model, index):
    """The operator's inputs that the model computes (not constants, not
    the absent optional inputs, -1)."""
    operator = model.subgraphs[0].operators[index]
    return [t for t in operator.inputs if t >= 0 and not is_constant(model, t)]


def _buffers_of(model, operator):
    """The model's buffer list with only the operator's constants filled:
    the one-op model stays small, and the tensors keep their buffer indices."""
    from ai_edge_litert import schema_py_generated as schema

    kept = {model.subgraphs[0].tensors[t].buffer for t in operator.inputs if t >= 0}
    return [buffer if i in kept else schema.BufferT() for i, buffer in enumerate(model.buffers)]


def _interpreter(tflite_model, keep_all_tensors=False):
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.interpreter import OpResolverType

    if keep_all_tensors:  # a delegate's partitions do not keep their tensors
        return Interpreter(
            model_content=tflite_model,
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    return Interpreter(model_content=tflite_model)  # allocated once its inputs are sized


def all_tensors(tflite_model, sample):
    """Every tensor of the main subgraph after one run on `sample`, by index."""
    interpreter = _interpreter(tflite_model, keep_all_tensors=True)
    _feed(interpreter, sample)
    interpreter.invoke()
    tensors = {}
    for detail in interpreter.get_tensor_details():
        try:
            tensors[detail["index"]] = interpreter.get_tensor(detail["index"])
        except ValueError:  # a tensor without data (an absent optional input)
            pass
    return tensors


def _feed(interpreter, sample):
    """The model's input, resized to `sample` (int8 I/O scaled as
    `run_tflite` does)."""
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], sample.shape)
    interpreter.allocate_tensors()
    runtimes._set_input(interpreter, sample)


def set_inputs(interpreter, arrays):
    """Resizes every input first: allocating again drops what was set."""
    details = interpreter.get_input_details()
    for detail, array in zip(details, arrays):
        interpreter.resize_tensor_input(detail["index"], array.shape)
    interpreter.allocate_tensors()
    for detail, array in zip(details, arrays):
        interpreter.set_tensor(detail["index"], array)


def _calls(interpreter, calls):
    for _ in range(calls):
        interpreter.invoke()


def _invoke_microseconds(interpreter, repeats, calls):
    return 1e6 * _timing.median_seconds(lambda: _calls(interpreter, calls), repeats) / calls
