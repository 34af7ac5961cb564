"""Prune a trained model to 80% zeros during fine-tuning, then ship a smaller,
verified phone model.

Trains a residual MLP on digits, fine-tunes it with `hlkeras.prune.Pruning`
(the sparsity rises from 0 to `--sparsity` over the first two thirds of the
steps, then the model recovers at that sparsity), and exports the dense and
the pruned model. The pruned float32 `.tflite` stores its kernels in the
sparse encoding; both files are verified sample by sample at batch 1:

    python apps/prune_for_phone.py --epochs 20 --sparsity 0.8
"""

import argparse
import os

import keras

from hlkeras import data
from hlkeras import export
from hlkeras import models
from hlkeras import prune


def compiled(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="pruned_phone", help="directory of the exports")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, test_ds, info = data.load("digits", batch_size=64, data_dir=args.data_dir)
    test_images, test_labels = data.to_numpy(test_ds)
    dense = compiled(models.mlp(info.input_shape, info.num_classes, depth=2, width=256), 1e-3)
    dense.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=2)

    pruned = compiled(prune.strip(dense), 5e-4)  # a copy: `dense` keeps its weights
    steps = int(train_ds.cardinality()) * args.fine_tune_epochs
    end_step = max(1, 2 * steps // 3)
    pruning = prune.Pruning(args.sparsity, end_step=end_step, frequency=max(1, end_step // 10))
    pruned.fit(
        train_ds,
        validation_data=val_ds,
        epochs=args.fine_tune_epochs,
        callbacks=[pruning],
        verbose=2,
    )
    print(f"sparsity {prune.sparsity(pruned):.3f} (dense {prune.sparsity(dense):.3f})")

    for name, model in (("dense", dense), ("pruned", pruned)):
        report = export.export_model(
            model,
            os.path.join(args.out, name),
            formats=("tflite",),
            verify_data=(test_images, test_labels),
            latency_runs=20,
            overwrite=True,
        )
        tflite = report.artifact("tflite")
        print(
            f"{name}: {tflite.size_bytes / 1024:.1f} KB, keras {report.keras_accuracy:.4f}, "
            f"litert {tflite.accuracy:.4f} at batch 1, {tflite.latency_ms:.3f} ms, "
            f"sparse tensors {tflite.sparse_tensors}"
        )


if __name__ == "__main__":
    main()
