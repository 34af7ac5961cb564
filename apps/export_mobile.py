"""Train a small ResNet on the embedded digits and export it to a `.tflite`
file for phones (builtin ops only), verified in the LiteRT interpreter
sample by sample against Keras. Runs on any backend:

    python apps/export_mobile.py --epochs 12 --out digits_export
"""

import argparse

import keras

from hlkeras import data
from hlkeras import export
from hlkeras import models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="digits_export", help="the directory to export into")
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

    # export_model verifies the file sample by sample at batch 1, as a phone
    # runs it, and refuses to write one that loses accuracy.
    images, labels = data.to_numpy(test_ds)
    report = export.export_model(
        model, args.out, formats=("tflite",), verify_data=(images, labels), overwrite=True
    )
    tflite = report.artifact("tflite")
    print(f"wrote {tflite.path} ({tflite.size_bytes / 1024:.0f} KiB)")
    print(
        f"test accuracy at batch 1: keras {report.keras_accuracy:.4f}, "
        f"litert {tflite.accuracy:.4f}, "
        f"same prediction on {tflite.top1_agreement:.1%} of images"
    )


if __name__ == "__main__":
    main()
