"""Train a small ResNet from hlkeras layers on your own folder of images
(one subfolder per class), in plain `model.fit` style. Runs on any backend:

    KERAS_BACKEND=jax python apps/train_folder.py photos --image-size 32 32 --epochs 20

`hlkeras.data.load_path` reads the folder (splits by --seed, augmented
training batches); the model is a functional `keras.Model`, saved with its
class names beside it, ready for `hlkeras predict`.
"""

import argparse
import json
import os

import keras

from hlkeras import data
from hlkeras import models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of class subfolders of images")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="folder_resnet.keras", help="where to save the model")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, test_ds, info = data.load_path(
        args.folder, batch_size=32, image_size=args.image_size, augment=True
    )
    print(f"{info.num_train} training images of {info.num_classes} classes: {info.class_names}")
    model = models.resnet(info.input_shape, info.num_classes, depth=2, width=32)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(train_ds, validation_data=val_ds, epochs=args.epochs)
    _, test_accuracy = model.evaluate(test_ds, verbose=0)
    print(f"test accuracy: {test_accuracy:.4f}")
    model.save(args.out)
    names_path = os.path.join(os.path.dirname(os.path.abspath(args.out)), "class_names.json")
    with open(names_path, "w") as file:
        json.dump(list(info.class_names), file)
    print(f"saved {args.out} and {names_path}; try: hlkeras predict {args.out} IMAGE...")


if __name__ == "__main__":
    main()
