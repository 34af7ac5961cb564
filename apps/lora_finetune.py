"""Fine-tune a trained model with two named LoRA adapters, switch, merge, ship.

Pretrains a residual MLP on digits 0-4 and gives it a fresh 5-way head. Then
one model gets two adapters, each trained alone (adapters plus head; the
pretrained weights stay frozen):
- `digits_5_9`: classify digits 5-9;
- `mod_5`: classify every digit 0-9 by its value mod 5.
Switching between them is a copy into the same variables. Each adapter is
saved to its own file and merged into its own plain model with the original
parameter count:

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

    # The pretrained features with a fresh 5-way head; "all-linear" adapts
    # every Dense (and residual block) but the last, which trains in full.
    features = pretrained.get_layer("head_norm").output
    new_head = keras.layers.Dense(5, activation="softmax", name="new_head")(features)
    adapted = lora.apply_lora(
        keras.Model(pretrained.input, new_head),
        rank=args.rank,
        targets="all-linear",
        dora=args.dora,
        adapter_name="digits_5_9",
    )
    trainable = sum(int(np.prod(w.shape)) for w in adapted.trainable_weights)
    print(f"training {trainable} of {adapted.count_params()} parameters per adapter")
    tasks = {
        "digits_5_9": (
            split_by_class(train_images, train_labels, new),
            split_by_class(test_images, test_labels, new),
        ),
        "mod_5": ((train_images, train_labels % 5), (test_images, test_labels % 5)),
    }
    lora.add_adapter(adapted, "mod_5")
    for name, (train, _) in tasks.items():
        lora.set_adapter(adapted, name)
        # A fresh optimizer per adapter: Adam's moments belong to one adapter.
        compiled(adapted, 3e-3).fit(*train, epochs=args.epochs, verbose=2)

    for name, (_, test) in tasks.items():
        lora.set_adapter(adapted, name)  # a copy: nothing rebuilt or recompiled
        lora.save_adapters(adapted, f"{args.out}_{name}.lora.npz")
        merged = lora.merge_lora(adapted)
        merged.save(f"{args.out}_{name}_merged.keras")
        print(
            f"adapter {name} test accuracy: adapted {accuracy(adapted, *test):.4f}, "
            f"merged {accuracy(merged, *test):.4f}"
        )
    print(f"saved {args.out}_<adapter>.lora.npz and {args.out}_<adapter>_merged.keras")


if __name__ == "__main__":
    main()
