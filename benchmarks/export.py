"""Export benchmark on digits: int8 size and accuracy against float32/Keras,
LiteRT batch-1 latency against Keras eager, and export wall time.

Every number is a ratio to its anchor measured in this same run (the Keras
model, the float32 file), so a busy machine shifts both sides alike.

Usage (TensorFlow backend, a few minutes at most):

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/export.py [--arch vit|resnet]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import hlkeras  # noqa: E402
from hlkeras import export  # noqa: E402
from hlkeras.layers import ConvResidualBlock  # noqa: E402
from hlkeras.layers import ResidualBlock  # noqa: E402

TARGETS = {
    "int8_size_ratio": 0.30,
    "int8_accuracy_drop_points": 1.0,
    "litert_latency_ratio": 0.25,
    "export_seconds": 60.0,
}


def load_digits(seed=0, train_count=1400):
    """The embedded digits as `(x_train, y_train, x_test, y_test)`, in [0, 1]."""
    path = os.path.join(os.path.dirname(hlkeras.__file__), "datasets", "digits.npz")
    with np.load(path) as data:
        images = data["images"].astype("float32")[..., None] / 16.0
        labels = data["labels"].astype("int32")
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order]
    return (
        images[:train_count],
        labels[:train_count],
        images[train_count:],
        labels[train_count:],
    )


# Stand-ins until `hlkeras.models.vit` / `resnet` land: swap in their defaults.
def build_vit():
    inputs = keras.Input((8, 8, 1))
    tokens = keras.layers.Conv2D(64, 2, strides=2)(inputs)
    tokens = keras.layers.Reshape((16, 64))(tokens)
    for _ in range(2):
        normed = keras.layers.LayerNormalization()(tokens)
        attended = keras.layers.MultiHeadAttention(4, 16)(normed, normed)
        tokens = keras.layers.Add()([tokens, attended])
        tokens = ResidualBlock(64, hidden_units=256, activation="gelu")(tokens)
    tokens = keras.layers.LayerNormalization()(tokens)
    x = keras.layers.Flatten()(tokens)
    x = keras.layers.Dense(256, activation="gelu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="vit")


def build_resnet():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding="same")(inputs)
    x = ConvResidualBlock(32)(x)
    x = ConvResidualBlock(64, strides=2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="resnet")


BUILDERS = {"vit": build_vit, "resnet": build_resnet}


def train(model, x_train, y_train, epochs):
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def line(name, value, target=None, unit=""):
    if target is None:
        print(f"{name:<28} {value:10.4g}{unit}")
        return
    verdict = "MET" if value <= target else "NOT MET"
    print(f"{name:<28} {value:10.4g}{unit}   target <= {target}   {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit", choices=sorted(BUILDERS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--latency-runs", type=int, default=50)
    args = parser.parse_args()
    backend = keras.backend.backend()
    print(f"benchmarks/export.py  arch={args.arch}  backend={backend}")

    x_train, y_train, x_test, y_test = load_digits()
    keras.utils.set_random_seed(0)
    model = train(BUILDERS[args.arch](), x_train, y_train, args.epochs)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        float32 = export.export_model(
            model,
            os.path.join(tmp, "float32"),
            verify_data=(x_test, y_test),
            latency_runs=args.latency_runs,
        )
        export_seconds = time.perf_counter() - start
        int8 = export.export_model(
            model,
            os.path.join(tmp, "int8"),
            formats=("tflite",),
            quantization="int8",
            representative_data=x_train[:200],
            verify_data=(x_test, y_test),
            latency_runs=args.latency_runs,
        )

    f32, i8 = float32.artifact("tflite"), int8.artifact("tflite")
    print(f"keras accuracy {float32.keras_accuracy:.4f}  float32 tflite "
          f"{f32.accuracy:.4f}  int8 tflite {i8.accuracy:.4f}  "
          f"({len(x_test)} test images)")
    print(f"sizes: float32 {f32.size_bytes} B  int8 {i8.size_bytes} B  "
          f"saved_model {float32.artifact('saved_model').size_bytes} B")
    print(f"batch-1 median latency: keras eager {float32.keras_latency_ms:.3f} ms  "
          f"litert float32 {f32.latency_ms:.3f} ms  int8 {i8.latency_ms:.3f} ms")
    line("float32_max_abs_diff", f32.max_abs_diff)
    line("int8_size_ratio", i8.size_bytes / f32.size_bytes, TARGETS["int8_size_ratio"])
    line(
        "int8_accuracy_drop_points",
        100.0 * (int8.keras_accuracy - i8.accuracy),
        TARGETS["int8_accuracy_drop_points"],
    )
    line(
        "litert_latency_ratio",
        f32.latency_ms / float32.keras_latency_ms,
        TARGETS["litert_latency_ratio"],
    )
    line("litert_int8_latency_ratio", i8.latency_ms / int8.keras_latency_ms)
    line("export_seconds", export_seconds, TARGETS["export_seconds"], unit=" s")


if __name__ == "__main__":
    main()
