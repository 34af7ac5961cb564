"""`hlkeras train --data` then `hlkeras predict`, end to end on a generated
image folder and CSV: the printed classes are `model.predict`'s, the
`.tflite` path agrees, and a bad input is one line naming both shapes."""

import csv
import json
import os

import keras
import numpy as np
import pytest
from digits_testing import load_digits_arrays
from PIL import Image

from hlkeras import cli
from hlkeras import data

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
        # Not named "label": predict must read the run's recorded --label.
        writer.writerow([f"p{j}" for j in range(64)] + ["kind"])
        for image, label in zip(pixels, labels):
            writer.writerow(list(image.reshape(-1)) + [CLASSES[label]])
    return root


@pytest.fixture(scope="module")
def trained_run(files, tmp_path_factory):
    """`trained_run(source, capsys)`: the run of `hlkeras train --data` on
    `source`, trained once per module (and worker)."""
    runs = {}

    def train(source, capsys):
        if source not in runs:
            run = tmp_path_factory.mktemp("run") / "run"
            label = ["--label", "kind"] if source.endswith(".csv") else []
            status, _, err = _cli(
                capsys, "train", "--data", files / source, "--out", run, *label, *SMALL
            )
            assert status == 0, err
            runs[source] = run
        return runs[source]

    return train


def _cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _predicted_lines(out):
    return [line.split(", ") for line in out.splitlines() if ", " in line]


@pytest.mark.parametrize("source", ["folder", "table.csv"])
def test_train_on_files_then_predict_gives_model_predict_classes(
    files, trained_run, tmp_path, capsys, source
):
    run = trained_run(source, capsys)
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
    label = ["--label", "kind"] if source.endswith(".csv") else []
    formats = "tflite,onnx" if source.endswith(".csv") else "tflite"
    status, _, err = _cli(
        capsys, "export", run / "model.keras", "--out", out_dir, "--data", inputs, *label,
        "--format", formats, "--quantize", "float16", "--latency-runs", "0",
    )  # fmt: skip
    assert status == 0, err
    with open(out_dir / "export.json") as f:
        report = json.load(f)
    assert report["verify_samples"] == data.load_path(inputs, label="kind")[3].num_test
    if source.endswith(".csv"):
        # A .onnx runs in ONNX Runtime one input at a time, with the same
        # classes (by id: no class_names.json beside it).
        status, out, err = _cli(
            capsys, "predict", out_dir / "model.onnx", inputs, "--label", "kind"
        )
        assert status == 0, err
        assert [CLASSES[int(line[1])] for line in _predicted_lines(out)] == expected


def test_predict_reads_the_runs_label_column_and_a_flag_overrides_it(
    files, trained_run, tmp_path, capsys
):
    # The run recorded --label kind; without it the 'kind' strings would be
    # read as a feature. A flag naming another column still wins.
    run = trained_run("table.csv", capsys)
    status, out, err = _cli(capsys, "predict", run, files / "table.csv")
    assert status == 0 and len(_predicted_lines(out)) == 240, err
    status, _, err = _cli(capsys, "predict", run, files / "table.csv", "--label", "p0")
    assert status == 2 and err.count("\n") == 1
    assert "column 'kind' is not numeric" in err and "line 2" in err


def test_a_nan_input_is_one_line_naming_column_and_line(files, trained_run, tmp_path, capsys):
    run = trained_run("table.csv", capsys)
    lines = (files / "table.csv").read_text().splitlines()
    cells = lines[3].split(",")
    cells[5] = "nan"
    lines[3] = ",".join(cells)
    table = tmp_path / "nan.csv"
    table.write_text("\n".join(lines) + "\n")
    status, out, err = _cli(capsys, "predict", run, table, "--out", tmp_path / "p.csv")
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"INPUT {table}: column 'p5' has a NaN at line 4" in err
    assert not (tmp_path / "p.csv").exists() and out == ""


def test_an_input_of_the_wrong_shape_is_one_line_naming_both_shapes(
    files, trained_run, tmp_path, capsys
):
    run = trained_run("table.csv", capsys)
    image = next((files / "folder" / "dot").glob("*.png"))
    status, _, err = _cli(capsys, "predict", run, image)
    assert status == 2 and err.count("\n") == 1 and err.startswith("hlkeras predict: error: ")
    assert str(image) in err and "(64,)" in err
    status, _, err = _cli(capsys, "train", "--data", files / "folder", "--dataset", "digits")
    assert status == 2 and "exclude each other" in err and err.count("\n") == 1
    assert os.path.exists(run / "model.tflite")
