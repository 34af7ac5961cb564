"""Look inside two models broken on purpose, and see what the monitor says.

Trains on digits, with `hlkeras.diagnostics.HiddenLayerMonitor` probing the
hidden layers after every epoch:
- `sigmoid`: a 12-layer sigmoid MLP without residual connections or
  normalization, whose first layers hardly receive a gradient;
- `dead_relu`: an MLP whose second ReLU layer starts with a bias of -100,
  so none of its units ever outputs anything.

Each prints the monitor's warnings and writes `<out>/<name>.png`, the same
picture `hlkeras train --diagnose` writes as hidden_layers.png:

    python apps/diagnose_broken_model.py --epochs 5
"""

import argparse
import os

import keras

from hlkeras import data
from hlkeras import diagnostics


def deep_sigmoid_mlp(input_shape, num_classes, depth=12, width=64):
    x = inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(x)
    for i in range(depth):
        x = keras.layers.Dense(width, activation="sigmoid", name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="sigmoid")


def dead_relu_mlp(input_shape, num_classes, width=64):
    x = inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(width, activation="relu", name="dense_0")(x)
    dead = keras.initializers.Constant(-100.0)
    x = keras.layers.Dense(width, activation="relu", bias_initializer=dead, name="dense_1")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="dead_relu")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="diagnosed", help="directory of the pictures")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, _, info = data.load("digits", batch_size=64, data_dir=args.data_dir)
    probe = data.to_numpy(val_ds)  # a fixed batch: the validation split
    os.makedirs(args.out, exist_ok=True)
    for build in (deep_sigmoid_mlp, dead_relu_mlp):
        model = build(info.input_shape, info.num_classes)
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        monitor = diagnostics.HiddenLayerMonitor(probe)
        model.fit(
            train_ds, validation_data=val_ds, epochs=args.epochs, callbacks=[monitor], verbose=2
        )
        print(f"{model.name}: {len(monitor.warnings)} warnings")
        for line in monitor.warnings:
            print(f"  {line}")
        path = os.path.join(args.out, f"{model.name}.png")
        diagnostics.plot_hidden_layers(monitor.report(), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
