"""A small Vision Transformer whose FFNs are sparse Mixture-of-Experts,
composed from hlkeras layers with the functional API, on the embedded digits.
Runs on any backend:

    KERAS_BACKEND=jax python apps/vit_moe.py --epochs 30

The `RoutingStatistics` callback logs each epoch's MoE routing statistics
(dropped fraction, max expert load) on every backend; the load-balance and
router z-losses are added to the training loss. Capacity is per image, so a
prediction does not depend on the other images in its batch.
"""

import argparse

import keras

from hlkeras import data
from hlkeras.layers import PositionEmbedding
from hlkeras.layers import TransformerBlock
from hlkeras.training import RoutingStatistics


def vit_moe(input_shape, num_classes, *, width=64, depth=2, num_experts=4):
    patch_size = 2
    num_patches = (input_shape[0] // patch_size) * (input_shape[1] // patch_size)
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(width, patch_size, strides=patch_size)(inputs)
    x = keras.layers.Reshape((num_patches, width))(x)
    x = PositionEmbedding(num_patches)(x)
    for i in range(depth):
        x = TransformerBlock(
            4, 2 * width, dropout=0.1, num_experts=num_experts, top_k=2, name=f"block_{i}"
        )(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="digits_vit_moe.keras", help="where to save the model")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, test_ds, info = data.load("digits", batch_size=64, data_dir=args.data_dir)
    model = vit_moe(info.input_shape, info.num_classes, num_experts=args.experts)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.summary()
    model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, callbacks=[RoutingStatistics()])
    results = model.evaluate(test_ds, verbose=0, return_dict=True)
    print(f"test accuracy: {results['accuracy']:.4f}")
    model.save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
