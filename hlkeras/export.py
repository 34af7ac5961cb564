"""SavedModel and TFLite (LiteRT) export with builtin ops only, and running
the result in the `ai_edge_litert` interpreter.

This module needs TensorFlow itself (the TFLite converter); it is the only
place besides `hlkeras.data` that imports it.
"""

import os
import tempfile

import numpy as np


def export_saved_model(model, path):
    """Writes `model` as a TF SavedModel with a `serve` endpoint."""
    model.export(path, format="tf_saved_model", verbose=False)


def convert_saved_model(saved_model_dir):
    """Converts a SavedModel to a float32 `.tflite` flatbuffer (bytes).

    Only `TFLITE_BUILTINS` are allowed: Flex (SELECT_TF_OPS) kernels are not in
    the `ai_edge_litert` runtime nor in a default phone build, so a graph that
    needs them fails here instead of on the device.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def model_to_tflite(model):
    """Converts an in-memory Keras model (TensorFlow backend) to TFLite bytes.

    `TFLiteConverter.from_keras_model` is broken for Keras 3, so the model goes
    through a temporary SavedModel.
    """
    with tempfile.TemporaryDirectory() as tmp:
        saved_model_dir = os.path.join(tmp, "saved_model")
        export_saved_model(model, saved_model_dir)
        return convert_saved_model(saved_model_dir)


def run_tflite(tflite_model, inputs):
    """Runs a `.tflite` model (bytes) on one batch in the LiteRT interpreter.

    Args:
        tflite_model: The flatbuffer bytes.
        inputs: A NumPy array, or a list of arrays in the model's input order.

    Returns:
        The first output as a NumPy array.
    """
    from ai_edge_litert.interpreter import Interpreter

    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    interpreter = Interpreter(model_content=tflite_model)
    details = interpreter.get_input_details()
    for detail, array in zip(details, inputs):
        interpreter.resize_tensor_input(detail["index"], array.shape)
    interpreter.allocate_tensors()
    for detail, array in zip(details, inputs):
        interpreter.set_tensor(detail["index"], np.asarray(array, detail["dtype"]))
    interpreter.invoke()
    output = interpreter.get_output_details()[0]
    return interpreter.get_tensor(output["index"])
