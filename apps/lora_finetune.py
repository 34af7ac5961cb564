"""Fine-tune a trained model with a LoRA adapter, merge it, and ship it.

Pretrains a residual MLP on digits 0-4, adds a new head for digits 5-9,
trains only LoRA adapters plus that head, saves the adapter file, and merges
the adapters into a plain model with the original parameter count:

    python apps/lora_finetune.py --epochs 10
    python apps/lora_finetune.py --epochs 10 --dora   # weight-decomposed (DoRA)
"""

import argparse

import keras
import numpy as np

from hlkeras import data
from hlkeras import lora
from hlkeras import models


def split_by_class(images, labels, classes):
    keep = np.isin(labels, classes)
    return images[keep], labels[keep] - min(classes)


def accuracy(model, images, labels):
    predictions = np.argmax(keras.ops.convert_to_numpy(model.predict(images, verbose=0)), -1)
    return float(np.mean(predictions == labels))


def compiled(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--dora", action="store_true", help="DoRA: also train a magnitude per output unit"
    )
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="digits_lora", help="prefix of the files to write")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, _, test_ds, info = data.load("digits", batch_size=64, data_dir=args.data_dir)
    train_images, train_labels = data.to_numpy(train_ds)
    test_images, test_labels = data.to_numpy(test_ds)
    old, new = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

    pretrained = models.mlp(info.input_shape, len(old), depth=2, width=128)
    compiled(pretrained, 1e-3).fit(
        *split_by_class(train_images, train_labels, old), epochs=args.epochs, verbose=2
    )

    # The pretrained features with a fresh head for the new classes; apply_lora
    # adapts every Dense but the last, which stays a full trainable head.
    features = pretrained.get_layer("head_norm").output
    new_head = keras.layers.Dense(len(new), activation="softmax", name="new_head")(features)
    adapted = lora.apply_lora(
        keras.Model(pretrained.input, new_head), rank=args.rank, dora=args.dora
    )
    trainable = sum(int(np.prod(w.shape)) for w in adapted.trainable_weights)
    print(f"training {trainable} of {adapted.count_params()} parameters")
    new_train = split_by_class(train_images, train_labels, new)
    compiled(adapted, 3e-3).fit(*new_train, epochs=args.epochs, verbose=2)

    lora.save_adapters(adapted, f"{args.out}_adapters.npz")
    merged = lora.merge_lora(adapted)
    merged.save(f"{args.out}_merged.keras")
    new_test = split_by_class(test_images, test_labels, new)
    print(
        f"digits 5-9 test accuracy: adapted {accuracy(adapted, *new_test):.4f}, "
        f"merged {accuracy(merged, *new_test):.4f}"
    )
    print(f"saved {args.out}_adapters.npz and {args.out}_merged.keras")


if __name__ == "__main__":
    main()
