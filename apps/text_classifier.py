"""Train a text classifier from hlkeras layers on your own CSV of texts, in
plain `model.fit` style. Runs on any backend:

    KERAS_BACKEND=jax python apps/text_classifier.py tickets.csv --text-column text --label label

`hlkeras.data.load_path` builds a vocabulary on the training split and turns
each text into padded int32 token ids (outside the model, so the model stays
backend-neutral and exports to TFLite with builtin ops). The model is token
embeddings, Transformer blocks with rotary positions, `AttentionPooling` and
a softmax head. It is saved with its vocabulary and class names beside it,
ready for `hlkeras predict MODEL "some text"`.
"""

import argparse
import json
import os

import keras

from hlkeras import data
from hlkeras import models
from hlkeras.data import texts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="a CSV file with a text column and a label column")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label", default="label")
    parser.add_argument("--encoder", default="transformer", help="transformer, gru or lstm")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="text_classifier.keras", help="where to save the model")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, test_ds, info = data.load_path(
        args.csv, text_column=args.text_column, label=args.label, batch_size=32
    )
    tokenizer = info.tokenizer()
    print(
        f"{info.num_train} training texts of {info.num_classes} classes {info.class_names}; "
        f"{tokenizer.vocabulary_size} token ids, {tokenizer.max_length} tokens per text"
    )
    model = models.text(
        info.input_shape,
        info.num_classes,
        vocabulary_size=tokenizer.vocabulary_size,
        encoder=args.encoder,
        depth=2,
        width=64,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=2e-3, weight_decay=1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(train_ds, validation_data=val_ds, epochs=args.epochs)
    _, test_accuracy = model.evaluate(test_ds, verbose=0)
    print(f"test accuracy: {test_accuracy:.4f}")
    model.save(args.out)
    folder = os.path.dirname(os.path.abspath(args.out))
    tokenizer.save(os.path.join(folder, texts.VOCABULARY_FILE))
    with open(os.path.join(folder, "class_names.json"), "w") as file:
        json.dump(list(info.class_names), file)
    print(f'saved {args.out} with its vocabulary; try: hlkeras predict {args.out} "some text"')


if __name__ == "__main__":
    main()
