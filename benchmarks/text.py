"""Benchmark: training speed of the text classifier (`hlkeras.models.text`).

Generates a 20,000-row CSV of support tickets: 5-25 filler words drawn
uniformly from 500 (`w0`..`w499`) plus one keyword that decides the class
(three classes, two keywords each), loads it with
`hlkeras.data.load_path(..., text_column="text")` (a vocabulary of 508 ids,
texts padded to the length covering 95% of them), and measures training
steps/s (batch 64, `model.fit` on cached batches, interleaved pairs, median
of repeats) of:

- the transformer text model (depth 2, width 64, 4 heads, mean pooling);
- the anchor: the same network written with `keras.layers` built-ins
  (`Embedding(mask_zero=True)`, `keras.layers.MultiHeadAttention`, Dense
  FFN, LayerNorm, `GlobalAveragePooling1D`). Keras has no rotary embedding
  layer, so the anchor has no RoPE: hlkeras does that work on top;
- the bidirectional GRU text model, reported beside them.

Target (text issue): transformer >= 0.9x the anchor's steps/s per backend.

Usage:
    PYTHONPATH=. python benchmarks/text.py [--backends tensorflow,jax,torch]
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for benchmarks.train's shared anchor blocks
TARGET = 0.9
SIZES = {"depth": 2, "width": 64, "num_heads": 4, "dropout": 0.1, "ffn_ratio": 2}
KEYWORDS = {
    "billing": ["invoice", "refund"],
    "tech": ["crash", "error"],
    "sales": ["price", "demo"],
}


def write_tickets(path, rows):
    import numpy as np

    rng = np.random.default_rng(0)
    filler = [f"w{i}" for i in range(500)]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = list(KEYWORDS)[i % 3]
            words = list(rng.choice(filler, rng.integers(5, 26)))
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(KEYWORDS[label])))
            writer.writerow([" ".join(words), label])


def hand_written_text_transformer(max_length, num_classes, vocabulary_size):
    """`models.text(encoder="transformer", pooling="mean")` from built-ins, without RoPE."""
    import keras

    from benchmarks.train import hand_written_pre_norm_blocks

    width, dropout = SIZES["width"], SIZES["dropout"]
    tokens = keras.Input(shape=(max_length,), dtype="int32")
    x = keras.layers.Embedding(vocabulary_size, width, mask_zero=True)(tokens)
    x = hand_written_pre_norm_blocks(x, **SIZES)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(num_classes)(x)
    return keras.Model(tokens, keras.layers.Activation("softmax", dtype="float32")(x))


def steps_per_second(model, dataset, steps):
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps / (time.perf_counter() - start)


def measure(rows, repeats, steps):
    import keras

    from hlkeras import data
    from hlkeras import models
    from hlkeras import training

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tickets.csv")
        write_tickets(path, rows)
        train_ds, _, _, info = data.load_path(path, text_column="text", batch_size=64)
    batches = train_ds.take(steps).cache().repeat()
    vocabulary_size = info.tokenizer().vocabulary_size
    (max_length,) = info.input_shape
    shape, classes = info.input_shape, info.num_classes
    common = {"vocabulary_size": vocabulary_size, **SIZES}
    contenders = {
        "hlkeras transformer": models.text(shape, classes, pooling="mean", **common),
        "keras built-ins": hand_written_text_transformer(max_length, classes, vocabulary_size),
        "hlkeras gru": models.text(shape, classes, encoder="gru", **common),
    }
    assert (
        contenders["hlkeras transformer"].count_params()
        == contenders["keras built-ins"].count_params()
    )
    for model in contenders.values():
        training.compile_model(model, total_steps=10_000)
        steps_per_second(model, batches, steps)  # warm-up: compile
    rates = {name: [] for name in contenders}
    ratios = []
    for i in range(repeats):
        order = list(contenders) if i % 2 == 0 else list(contenders)[::-1]
        for name in order:
            rates[name].append(steps_per_second(contenders[name], batches, steps))
        ratios.append(rates["hlkeras transformer"][-1] / rates["keras built-ins"][-1])
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = statistics.median(ratios)
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(
        f"text [{keras.backend.backend()}] {rows} rows, max_length {max_length}, "
        f"vocabulary {vocabulary_size}, batch 64 (median of {repeats} x {steps} steps): "
        f"transformer={median['hlkeras transformer']:.1f} steps/s "
        f"built-ins={median['keras built-ins']:.1f} steps/s "
        f"ratio={ratio:.3f} (target >= {TARGET}: {verdict}); "
        f"gru={median['hlkeras gru']:.1f} steps/s "
        f"({median['hlkeras gru'] / median['hlkeras transformer']:.2f}x the transformer)"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", help="run each in a subprocess, e.g. tensorflow,jax,torch")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.backends:
        for backend in args.backends.split(","):
            env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
            command = [sys.executable, __file__, "--rows", str(args.rows)]
            command += ["--repeats", str(args.repeats), "--steps", str(args.steps)]
            subprocess.run(command, env=env, check=True)
        return
    measure(args.rows, args.repeats, args.steps)


if __name__ == "__main__":
    main()
