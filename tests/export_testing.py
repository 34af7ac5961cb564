"""Small digits models and data splits shared by the export tests."""

import keras
import numpy as np
from digits_testing import load_digits_arrays

from hlkeras.layers import ConvResidualBlock
from hlkeras.layers import ResidualBlock

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
    weights (~340k) that file sizes measure quantization, not overhead."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding="same")(inputs)
    x = ConvResidualBlock(32)(x)
    x = ConvResidualBlock(64, strides=2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name="resnet")


def build_vit():
    """A small ViT: 2x2 patches, one pre-norm attention block (Keras
    `MultiHeadAttention`) and a `ResidualBlock` MLP over the 16 tokens.

    The hlkeras `vit` builder (with MoE) replaces this once it lands.
    """
    inputs = keras.Input((8, 8, 1))
    tokens = keras.layers.Conv2D(64, 2, strides=2)(inputs)
    tokens = keras.layers.Reshape((16, 64))(tokens)
    normed = keras.layers.LayerNormalization()(tokens)
    attended = keras.layers.MultiHeadAttention(4, 16)(normed, normed)
    tokens = keras.layers.Add()([tokens, attended])
    tokens = ResidualBlock(64, hidden_units=256, activation="gelu")(tokens)
    tokens = keras.layers.LayerNormalization()(tokens)
    x = keras.layers.Flatten()(tokens)
    x = keras.layers.Dense(256, activation="gelu")(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name="vit")


BUILDERS = {"resnet": build_resnet, "vit": build_vit}


def train(model, x_train, y_train, epochs=5):
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=-1) == labels))
