"""Train a small ResNet on the embedded digits, export it to a `.tflite`
file for phones (builtin ops only), and check it in the LiteRT interpreter.

    python apps/export_mobile.py --epochs 12 --out digits.tflite

The TFLite converter needs the TensorFlow backend, so this script selects it.
"""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # before keras is imported

import argparse  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from hlkeras import data  # noqa: E402
from hlkeras import export  # noqa: E402
from hlkeras import models  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="digits.tflite", help="the .tflite file to write")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, test_ds, info = data.load("digits", batch_size=64, data_dir=args.data_dir)
    model = models.resnet(info.input_shape, info.num_classes, depth=1, width=16)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(train_ds, validation_data=val_ds, epochs=args.epochs)

    tflite_model = export.model_to_tflite(model)
    with open(args.out, "wb") as f:
        f.write(tflite_model)
    images, labels = data.to_numpy(test_ds)
    keras_predictions = np.argmax(model.predict(images, verbose=0), axis=-1)
    litert_predictions = np.argmax(export.run_tflite(tflite_model, images), axis=-1)
    print(f"wrote {args.out} ({len(tflite_model) / 1024:.0f} KiB)")
    print(
        f"test accuracy: keras {np.mean(keras_predictions == labels):.4f}, "
        f"litert {np.mean(litert_predictions == labels):.4f}, "
        f"same prediction on {np.mean(keras_predictions == litert_predictions):.1%} of images"
    )


if __name__ == "__main__":
    main()
