"""Running artifacts one sample at a time: the LiteRT interpreter (int8
I/O scaled with the file's own scales), the SavedModel's `serving_default`,
and the batch-1 latency of each."""

import functools
import os

import numpy as np

from hlkeras import _compat
from hlkeras import _timing


def builtin_op_names():
    """The names of all LiteRT builtin operators (`CUSTOM` excluded)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {n for n in vars(schema.BuiltinOperator) if n.isupper()}
    return names - {"CUSTOM", "DELEGATE"}


def tflite_op_names(tflite_model):
    """Sorted distinct op names in a `.tflite` flatbuffer (bytes)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_model)
    return sorted({op["op_name"] for op in _compat.tflite_op_details(interpreter)})


def tflite_sparse_tensor_count(tflite_model):
    """How many tensors of a `.tflite` flatbuffer (bytes) are stored in the
    sparse encoding (with `SparsityParameters`)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite_model, 0)
    subgraphs = [model.Subgraphs(i) for i in range(model.SubgraphsLength())]
    return sum(
        subgraph.Tensors(i).Sparsity() is not None
        for subgraph in subgraphs
        for i in range(subgraph.TensorsLength())
    )


def _prepared_interpreter(tflite_model, input_shape):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_model)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], input_shape)
    interpreter.allocate_tensors()
    return interpreter


def _set_input(interpreter, array):
    detail = interpreter.get_input_details()[0]
    if detail["dtype"] == np.int8:  # int8 I/O: quantize with the file's scale.
        scale, zero_point = detail["quantization"]
        array = np.clip(np.round(array / scale + zero_point), -128, 127)
    interpreter.set_tensor(detail["index"], np.asarray(array, detail["dtype"]))


def _get_output(interpreter):
    detail = interpreter.get_output_details()[0]
    output = interpreter.get_tensor(detail["index"])
    if detail["dtype"] == np.int8:
        scale, zero_point = detail["quantization"]
        output = (output.astype("float32") - zero_point) * scale
    return output


def run_tflite(tflite_model, inputs):
    """Runs a `.tflite` model (bytes) on one batch in the LiteRT interpreter.

    int8 inputs and outputs are quantized and dequantized with the file's
    scales, so callers always pass and get float arrays.

    Args:
        tflite_model: The flatbuffer bytes.
        inputs: A NumPy array for a single-input model, or a dict from input
            name (the Keras `Input` name) to array. Several inputs go by name
            because LiteRT does not keep the model's input order.

    Returns:
        The first output as a NumPy array.
    """
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(inputs, dict):
        runner = Interpreter(model_content=tflite_model).get_signature_runner("serving_default")
        named = {name: np.asarray(array) for name, array in inputs.items()}
        outputs = runner(**named)
        return outputs[sorted(outputs)[0]]
    interpreter = _prepared_interpreter(tflite_model, np.shape(inputs))
    return _invoke(interpreter, np.asarray(inputs, "float32"))


def _invoke(interpreter, array):
    """Runs a prepared interpreter on `array`; returns a copy of its output."""
    _set_input(interpreter, array)
    interpreter.invoke()
    return np.array(_get_output(interpreter))


def median_latency_ms(run_once, repeats=50, warmup=5):
    """Median wall time of `run_once()` in milliseconds, after `warmup` calls."""
    return 1000.0 * _timing.median_seconds(run_once, repeats, warmup)


def tflite_predictor(tflite_model, input_shape):
    """A function that runs the `.tflite` model (bytes) on batches of
    `input_shape` in one prepared LiteRT interpreter, float in and out."""
    interpreter = _prepared_interpreter(tflite_model, input_shape)
    return functools.partial(_invoke, interpreter)


def saved_model_predictor(path):
    """A function that runs the SavedModel's `serving_default` on a batch
    (cast to its input dtype: a text model takes int32 token ids)."""
    import tensorflow as tf

    serving = tf.saved_model.load(path).signatures["serving_default"]
    (spec,) = serving.structured_input_signature[1].values()

    def predict(array):
        (output,) = serving(tf.constant(array, dtype=spec.dtype)).values()
        return output.numpy()

    return predict


def tflite_latency_ms(tflite_model, sample, repeats):
    predict = tflite_predictor(tflite_model, sample.shape)
    return median_latency_ms(lambda: predict(sample), repeats)


def interleaved_latency_ms(flatbuffers, sample, repeats, rounds=5):
    """`{name: median batch-1 LiteRT latency}` of `{name: .tflite bytes}`,
    the files timed in turns (each round times every file once) so that a
    busy neighbour weighs on all of them alike: the latencies to compare
    files by."""
    times = {name: [] for name in flatbuffers}
    for _ in range(rounds):
        for name, flatbuffer in flatbuffers.items():
            times[name].append(tflite_latency_ms(flatbuffer, sample, repeats))
    return {name: float(np.median(values)) for name, values in times.items()}


def keras_latency_ms(model, sample, repeats):
    from keras import ops

    return median_latency_ms(lambda: ops.convert_to_numpy(model(sample, training=False)), repeats)


def per_sample(predict, inputs):
    """`predict` run on each sample alone (batch 1), as a device runs it."""
    return np.concatenate([predict(sample[None]) for sample in inputs])


def tflite_per_sample(flatbuffer, inputs):
    return per_sample(tflite_predictor(flatbuffer, (1,) + inputs.shape[1:]), inputs)


def path_size(path):
    """Bytes on disk of a file, or of a directory's files summed."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )
