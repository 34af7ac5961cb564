"""Train a residual MLP built from hlkeras layers on the embedded digits,
in plain `model.fit` style. Runs on any backend:

    KERAS_BACKEND=jax python apps/train_digits.py --epochs 20
"""

import argparse

import keras

from hlkeras import data
from hlkeras import models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="digits_mlp.keras", help="where to save the model")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, test_ds, info = data.load("digits", batch_size=64, data_dir=args.data_dir)
    model = models.mlp(info.input_shape, info.num_classes, depth=2, width=256, dropout=0.1)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.summary()
    model.fit(train_ds, validation_data=val_ds, epochs=args.epochs)
    _, test_accuracy = model.evaluate(test_ds, verbose=0)
    print(f"test accuracy: {test_accuracy:.4f}")
    model.save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
