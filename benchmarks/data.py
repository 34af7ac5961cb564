"""Benchmark: reading a folder of 10,000 small images with `hlkeras.data`.

Writes 10,000 16x16 RGB PNGs in 10 class folders, then measures, interleaved
and as the median of repeats:

- `load_path`: `hlkeras.data.load_path(folder)` (decode, resize, splits) plus
  one pass over its training pipeline (cached, shuffled, augmented batches);
- the anchor: `keras.utils.image_dataset_from_directory(folder)` plus one
  pass over its batches.

It prints images/s of both and their ratio, then images/s of one epoch of
the pipeline alone once loaded (what a training step waits on), next to
images/s of training steps of a ViT on those images, so the pipeline can be
seen not to be the bottleneck.

Usage:
    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/data.py [--images 10000]
"""

import argparse
import os
import statistics
import tempfile
import time

import keras
import numpy as np
from PIL import Image

from hlkeras import _timing
from hlkeras import data
from hlkeras import models
from hlkeras import training

SIZE = 16


def write_folder(root, count, classes=10):
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = os.path.join(root, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype="uint8")
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def one_pass(dataset):
    for _ in dataset:
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        write_folder(root, args.images)

        def hlkeras_load():
            train_ds, _, _, _ = data.load_path(root, augment=True)
            one_pass(train_ds)

        def keras_load():
            one_pass(
                keras.utils.image_dataset_from_directory(
                    root, image_size=(SIZE, SIZE), verbose=False
                )
            )

        ours, anchor = _timing.time_interleaved([hlkeras_load, keras_load], args.repeats, 1)
        ours_rate = args.images / statistics.median(ours)
        anchor_rate = args.images / statistics.median(anchor)
        print(
            f"load + one pass: hlkeras.data.load_path {ours_rate:,.0f} images/s, "
            f"image_dataset_from_directory {anchor_rate:,.0f} images/s, "
            f"ratio {ours_rate / anchor_rate:.2f}"
        )

        train_ds, _, _, info = data.load_path(root, augment=True)
        epoch_seconds = _timing.median_seconds(lambda: one_pass(train_ds), args.repeats, 1)
        model = training.compile_model(
            models.vit(info.input_shape, info.num_classes, depth=2, width=64, num_experts=4),
            learning_rate=1e-3,
        )
        steps = 20
        batches = train_ds.take(steps).cache()
        model.fit(batches, epochs=1, verbose=0)  # compile
        start = time.perf_counter()
        model.fit(batches, epochs=1, verbose=0)
        train_rate = steps * 64 / (time.perf_counter() - start)
        pipeline_rate = info.num_train / epoch_seconds
        print(
            f"pipeline alone {pipeline_rate:,.0f} images/s vs training steps "
            f"{train_rate:,.0f} images/s ({keras.backend.backend()}): the pipeline is "
            f"{pipeline_rate / train_rate:.1f}x faster than the model consumes"
        )


if __name__ == "__main__":
    main()
