"""Distil a trained resnet into a phone-sized student, then ship the student
as a verified int8 model.

Trains a resnet teacher on digits, trains a resnet student of width 8 and
one block through `hlkeras.distill.Distiller` (the teacher frozen, its
temperature-softened predictions blended with the labels), trains the same
student from the same initial weights on the labels alone for comparison,
and exports the distilled student to an int8 `.tflite` verified sample by
sample at batch 1:

    python apps/distill_for_phone.py --epochs 30 --student-epochs 30
"""

import argparse
import os

import keras
import numpy as np

from hlkeras import data
from hlkeras import distill
from hlkeras import export
from hlkeras import models


def accuracy(model, images, labels):
    probabilities = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    return float(np.mean(probabilities.argmax(-1) == labels))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="teacher epochs")
    parser.add_argument("--student-epochs", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--data-dir", help="TFDS data directory (default: TFDS' own)")
    parser.add_argument("--out", default="distilled_phone", help="directory of the export")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train_ds, val_ds, test_ds, info = data.load("digits", batch_size=64, data_dir=args.data_dir)
    images, labels = data.to_numpy(test_ds)
    teacher = models.resnet(info.input_shape, info.num_classes)
    teacher.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    teacher.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=2)

    student = models.resnet(info.input_shape, info.num_classes, width=8, depth=1)
    scratch = keras.models.clone_model(student)
    scratch.set_weights(student.get_weights())  # the same start, for a fair comparison
    distiller = distill.Distiller(teacher, student, temperature=args.temperature, alpha=args.alpha)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    distiller.fit(train_ds, validation_data=val_ds, epochs=args.student_epochs, verbose=2)
    scratch.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    scratch.fit(train_ds, validation_data=val_ds, epochs=args.student_epochs, verbose=2)

    for name, model in (("teacher", teacher), ("distilled", student), ("scratch", scratch)):
        print(
            f"{name}: test accuracy {accuracy(model, images, labels):.4f}, "
            f"{model.count_params():,} params"
        )
    calibration = data.to_numpy(train_ds)[0][:200]
    report = export.export_model(
        distiller.student,  # a plain model: the distiller's parts stay behind
        os.path.join(args.out, "student"),
        formats=("tflite",),
        quantization="int8",
        representative_data=calibration,
        verify_data=(images, labels),
        latency_runs=20,
        overwrite=True,
    )
    tflite = report.artifact("tflite")
    print(
        f"int8 student: {tflite.size_bytes / 1024:.1f} KB, keras {report.keras_accuracy:.4f}, "
        f"litert {tflite.accuracy:.4f} at batch 1, {tflite.latency_ms:.3f} ms"
    )


if __name__ == "__main__":
    main()
