"""`hlkeras train --data` then `hlkeras predict`, end to end on a generated
image folder and CSV: the printed classes are `model.predict`'s, the
`.tflite` path agrees, and a bad input is one line naming both shapes."""

import csv
import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

from hlkeras import cli
from hlkeras import data
from tests.digits_testing import load_digits_arrays

pytestmark = [pytest.mark.slow, pytest.mark.backends("tensorflow")]
SMALL = ["--epochs", "2", "--depth", "1", "--width", "16"]
CLASSES = ("circle", "cross", "dot")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An image folder (digits 0-2 as 12x12 PNGs under class names) and a CSV
    of the same digits' pixels with a string label column."""
    root = tmp_path_factory.mktemp("files")
    images, labels = load_digits_arrays()
    keep = labels < 3
    images, labels = images[keep][:240], labels[keep][:240]
    pixels = np.round(images[..., 0] * 255).astype("uint8")
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = root / "folder" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((12, 12)).save(folder / f"{i}.png")
    with open(root / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"p{j}" for j in range(64)] + ["label"])
        for image, label in zip(pixels, labels):
            writer.writerow(list(image.reshape(-1)) + [CLASSES[label]])
    return root


def _cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _predicted_lines(out):
    return [line.split(", ") for line in out.splitlines() if ", " in line]


@pytest.mark.parametrize("source", ["folder", "table.csv"])
def test_train_on_files_then_predict_gives_model_predict_classes(files, tmp_path, capsys, source):
    run = tmp_path / "run"
    status, _, err = _cli(capsys, "train", "--data", files / source, "--out", run, *SMALL)
    assert status == 0, err
    model = keras.saving.load_model(run / "model.keras")
    inputs = files / source
    status, out, err = _cli(
        capsys, "predict", run, inputs, "--top", "2", "--out", tmp_path / "p.csv"
    )
    assert status == 0, err
    lines = _predicted_lines(out)
    # The oracle: model.predict on the inputs as hlkeras.data reads them.
    if source == "folder":
        names = sorted(str(p) for p in (files / "folder").rglob("*.png"))
        x = np.stack([data.read_image(n, model.input_shape[1:]) for n in names]) / 255.0
    else:
        x = np.loadtxt(inputs, delimiter=",", skiprows=1, usecols=range(64), dtype="float32")
        names = [f"{inputs}:{line}" for line in range(2, len(x) + 2)]
    probabilities = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    expected = [CLASSES[i] for i in probabilities.argmax(axis=-1)]
    assert [line[0] for line in lines] == names
    assert [line[1] for line in lines] == expected
    np.testing.assert_allclose(
        [float(line[2]) for line in lines], probabilities.max(axis=-1), atol=1e-4
    )
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["class_1"] for row in rows] == expected and "class_2" in rows[0]

    status, out, err = _cli(capsys, "predict", run / "model.tflite", inputs)
    assert status == 0, err
    assert [line[1] for line in _predicted_lines(out)] == expected

    # hlkeras export --data calibrates and verifies on the same files' test split.
    out_dir = tmp_path / "export"
    status, _, err = _cli(
        capsys, "export", run / "model.keras", "--out", out_dir, "--data", inputs,
        "--format", "tflite", "--quantize", "float16", "--latency-runs", "0",
    )  # fmt: skip
    assert status == 0, err
    with open(out_dir / "export.json") as f:
        report = json.load(f)
    assert report["verify_samples"] == data.load_path(inputs)[3].num_test


def test_an_input_of_the_wrong_shape_is_one_line_naming_both_shapes(files, tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = _cli(capsys, "train", "--data", files / "table.csv", "--out", run, *SMALL)
    assert status == 0, err
    image = next((files / "folder" / "dot").glob("*.png"))
    status, _, err = _cli(capsys, "predict", run, image)
    assert status == 2 and err.count("\n") == 1 and err.startswith("hlkeras predict: error: ")
    assert str(image) in err and "(64,)" in err
    status, _, err = _cli(capsys, "train", "--data", files / "folder", "--dataset", "digits")
    assert status == 2 and "exclude each other" in err and err.count("\n") == 1
    assert os.path.exists(run / "model.tflite")
