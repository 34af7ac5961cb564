"""Small digits models and data splits shared by the export tests."""

import keras
import numpy as np
from digits_testing import load_digits_arrays

from hlkeras.layers import ConvResidualBlock

TRAIN_COUNT = 1400


def digits_splits(seed=0):
    """`(x_train, y_train, x_test, y_test)`: a fixed shuffle of the 1,797 digits."""
    images, labels = load_digits_arrays()
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order]
    return (
        images[:TRAIN_COUNT],
        labels[:TRAIN_COUNT],
        images[TRAIN_COUNT:],
        labels[TRAIN_COUNT:],
    )


def build_resnet():
    """A small ResNet of `ConvResidualBlock`s with a dense head heavy enough in
    weights (~340k) that file sizes measure quantization, not overhead.
    Outputs logits. Used where random weights are enough (cross-backend
    equality, the SavedModel without hlkeras)."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding="same")(inputs)
    x = ConvResidualBlock(32)(x)
    x = ConvResidualBlock(64, strides=2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name="resnet")


# The built-in architectures `hlkeras train` trains, by the name tests use:
# `hlkeras.models` specs with each builder's default hyperparameters.
ARCHITECTURE_SPECS = {
    "mlp": {"arch": "mlp"},
    "resnet": {"arch": "resnet"},
    "vit": {"arch": "vit", "num_experts": 0},
    "vit_moe": {"arch": "vit", "num_experts": 4},
}


def build_architecture(name):
    """A `hlkeras.models` classifier for digits (softmax outputs)."""
    from hlkeras import models

    spec = {**ARCHITECTURE_SPECS[name], "input_shape": (8, 8, 1), "num_classes": 10}
    return models.build(spec)


def train(model, x_train, y_train, epochs=5, from_logits=True):
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def train_architecture(name, x_train, y_train, epochs=6):
    """A trained `build_architecture(name)`: enough epochs on digits that its
    accuracy, and a quantized copy's, mean something (>= 90%: mlp 96%, resnet
    99%, vit+MoE 94% after 5 epochs; 12 epochs took 70 s more of CI)."""
    return train(build_architecture(name), x_train, y_train, epochs, from_logits=False)


def per_sample(run, inputs):
    """`run` on each sample alone (batch 1), concatenated."""
    return np.concatenate([np.asarray(run(sample[None])) for sample in inputs])


def accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


@keras.saving.register_keras_serializable(package="hlkeras_tests")
class InverseErf(keras.layers.Layer):
    """`erfinv` has no TFLite builtin kernel (only Flex) and no ONNX
    conversion in tf2onnx: the unconvertible layer of the export tests."""

    def call(self, inputs):
        return keras.ops.erfinv(0.5 * keras.ops.tanh(inputs))


def litert_per_sample(flatbuffer, inputs):
    """The `.tflite`'s outputs on `inputs`, one sample at a time, run in a
    plain `ai_edge_litert` interpreter: the oracle of the tests, sharing no
    code with hlkeras' verifier (`hlkeras.export.run_tflite`). An int8 input
    or output is scaled with the file's own quantization parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], (1, *np.shape(inputs)[1:]))
    interpreter.allocate_tensors()
    outputs = []
    for sample in inputs:
        x = sample[None]
        if source["dtype"] == np.int8:
            scale, zero_point = source["quantization"]
            x = np.clip(np.round(x / scale + zero_point), -128, 127)
        interpreter.set_tensor(source["index"], x.astype(source["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(sink["index"])
        if sink["dtype"] == np.int8:
            scale, zero_point = sink["quantization"]
            y = (y.astype("float32") - zero_point) * scale
        outputs.append(y[0])
    return np.stack(outputs)
