"""Tests of `hlkeras export`: the table, export.json, calibration and
verification inputs, --overwrite, and one-line errors for user mistakes."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from export_testing import accuracy
from export_testing import digits_splits
from export_testing import litert_per_sample
from keras import ops

from hlkeras import cli
from hlkeras import export

BACKEND = keras.backend.backend()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    return digits_splits()


@pytest.fixture(scope="module")
def trained_keras_file(digits, tmp_path_factory):
    """A small trained MLP on digits saved as `.keras`, and the model."""
    x_train, y_train, _, _ = digits
    keras.utils.set_random_seed(11)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(128, activation="relu")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("model") / "mlp.keras"
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def data_files(digits, tmp_path_factory):
    x_train, _, x_test, y_test = digits
    folder = tmp_path_factory.mktemp("data")
    np.save(folder / "representative.npy", x_train[:200])
    np.savez(folder / "verify.npz", x=x_test, y=y_test)
    return folder / "representative.npy", folder / "verify.npz"


def run_cli(capsys, *argv):
    status = cli.main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hlkeras export: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_export_prints_a_table_and_writes_export_json(
    trained_keras_file, data_files, digits, tmp_path, capsys
):
    keras_path, model = trained_keras_file
    representative, verify = data_files
    out = tmp_path / "out"
    status, stdout, _ = run_cli(
        capsys, keras_path, "--out", out, "--quantize", "int8",
        "--representative", representative, "--verify", verify, "--latency-runs", "5",
    )  # fmt: skip
    assert status == 0
    lines = stdout.strip().splitlines()
    assert lines[0].split() == [
        "artifact",
        "size",
        "max",
        "diff",
        "agreement",
        "accuracy",
        "latency",
    ]
    assert lines[1].startswith("saved_model ")
    assert lines[2].startswith("model_int8.tflite ")
    assert lines[3].startswith("keras (tensorflow) ")
    assert lines[4] == f"wrote {out / 'export.json'}"

    with open(out / "export.json") as file:
        report = export.ExportReport.from_dict(json.load(file))
    tflite = report.artifact("tflite")
    assert tflite.size_bytes == os.path.getsize(out / "model_int8.tflite")
    assert tflite.builtin_only and report.quantization == "int8"
    _, _, x_test, y_test = digits
    with open(out / "model_int8.tflite", "rb") as file:
        outputs = litert_per_sample(file.read(), x_test)
    assert tflite.accuracy == pytest.approx(accuracy(outputs, y_test))
    keras_accuracy = accuracy(ops.convert_to_numpy(model.predict(x_test, verbose=0)), y_test)
    assert report.keras_accuracy == pytest.approx(keras_accuracy)
    assert f"{keras_accuracy:.2%}" in lines[3]
    assert f"{tflite.accuracy:.2%}" in lines[2]


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_export_onnx_with_the_tflite_is_verified_in_onnx_runtime(
    trained_keras_file, data_files, digits, tmp_path, capsys
):
    import onnxruntime

    keras_path, _ = trained_keras_file
    _, verify = data_files
    out = tmp_path / "out"
    status, stdout, err = run_cli(
        capsys, keras_path, "--out", out, "--format", "tflite,onnx", "--verify", verify,
        "--latency-runs", "5",
    )  # fmt: skip
    assert status == 0, err
    lines = stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["model_float32.tflite", "model.onnx"]
    with open(out / "export.json") as file:
        onnx_report = export.ExportReport.from_dict(json.load(file)).artifact("onnx")
    _, _, x_test, y_test = digits
    session = onnxruntime.InferenceSession(out / "model.onnx", providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x_test})[0]
    assert onnx_report.accuracy == pytest.approx(accuracy(outputs, y_test))
    assert onnx_report.size_bytes == os.path.getsize(out / "model.onnx")
    assert f"{onnx_report.accuracy:.2%}" in lines[2] and onnx_report.latency_ms > 0


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_dataset_supplies_calibration_and_verification_data_and_int8_io_holds(
    trained_keras_file, tmp_path, capsys
):
    from ai_edge_litert.interpreter import Interpreter

    from hlkeras import data

    keras_path, model = trained_keras_file
    status, _, err = run_cli(
        capsys, keras_path, "--out", tmp_path, "--quantize", "int8", "--int8-io",
        "--dataset", "digits", "--format", "tflite", "--latency-runs", "0",
    )  # fmt: skip
    assert status == 0, err
    # Verified on the digits test split, as hlkeras.data loads it.
    _, _, test_ds, _ = data.load("digits")
    x_test, y_test = data.to_numpy(test_ds)
    with open(tmp_path / "export.json") as file:
        report = json.load(file)
    assert report["verify_samples"] == len(x_test) and report["int8_io"] is True
    keras_accuracy = accuracy(ops.convert_to_numpy(model.predict(x_test, verbose=0)), y_test)
    assert report["keras_accuracy"] == pytest.approx(keras_accuracy)
    assert abs(report["artifacts"][0]["accuracy"] - keras_accuracy) <= 0.015
    # --int8-io: the file takes and returns int8 tensors.
    interpreter = Interpreter(model_path=str(tmp_path / "model_int8.tflite"))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8


def run_auto(capsys, keras_path, out, *flags):
    """`hlkeras export --quantize auto` that succeeds: `(stdout, report)`."""
    status, stdout, stderr = run_cli(capsys, keras_path, "--out", out, "--quantize", "auto", *flags)
    assert status == 0, stderr
    with open(out / "export.json") as file:
        return stdout, export.ExportReport.from_dict(json.load(file))


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_quantize_auto_publishes_the_artifact_its_report_names(
    trained_keras_file, data_files, tmp_path, capsys
):
    """About 8 s: four conversions and their verification."""
    keras_path, _ = trained_keras_file
    representative, verify = data_files
    out = tmp_path / "out"
    stdout, report = run_auto(
        capsys, keras_path, out,
        "--representative", representative, "--verify", verify, "--latency-runs", "5",
    )  # fmt: skip
    chosen = report.auto["chosen"]
    row = next(r for r in report.auto["candidates"] if r["quantization"] == chosen)
    assert row["refused"] is None
    assert sorted(p.name for p in out.glob("*.tflite")) == [export.tflite_filename(chosen)]
    assert f"--quantize auto chose {chosen}: {report.auto['reason']}" in stdout.splitlines()
    assert stdout.splitlines()[1].startswith("saved_model ")
    assert stdout.splitlines()[2].startswith(f"{export.tflite_filename(chosen)} ")


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_quantize_auto_without_calibration_says_int8_was_not_tried(
    trained_keras_file, data_files, tmp_path, capsys
):
    """About 4 s: three conversions and their verification."""
    keras_path, _ = trained_keras_file
    _, verify = data_files
    out = tmp_path / "out"
    stdout, report = run_auto(capsys, keras_path, out, "--verify", verify, "--latency-runs", "3")
    candidates = [row["quantization"] for row in report.auto["candidates"]]
    assert candidates == ["none", "float16", "dynamic"]
    (chosen_line,) = [line for line in stdout.splitlines() if line.startswith("--quantize auto")]
    assert "not tried: int8: int8 needs calibration inputs" in chosen_line


@pytest.mark.neutral
def test_quantize_auto_takes_no_other_mode(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--quantize", "auto,int8")
    assert_one_line_error(status, err, "--quantize auto", "no other", "'auto,int8'")


@pytest.mark.neutral
def test_quantize_auto_without_data_to_choose_by(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--quantize", "auto")
    assert_one_line_error(status, err, "--quantize auto", "--dataset", "--verify")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_overwrite_flag_replaces_an_existing_export(trained_keras_file, tmp_path, capsys):
    keras_path, _ = trained_keras_file
    out = tmp_path / "out"
    options = ("--out", out, "--format", "tflite", "--latency-runs", "0")
    assert run_cli(capsys, keras_path, *options)[0] == 0
    first_tflite = (out / "model_float32.tflite").read_bytes()

    other_model = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, other_model, *options)
    assert_one_line_error(status, err, "--overwrite", "model_float32.tflite")
    assert (out / "model_float32.tflite").read_bytes() == first_tflite

    assert run_cli(capsys, other_model, *options, "--overwrite")[0] == 0
    assert (out / "model_float32.tflite").read_bytes() != first_tflite
    with open(out / "export.json") as file:
        assert json.load(file)["source"] == str(other_model)


# ------------------------------------------------ user mistakes, any backend


def lambda_keras_file(folder):
    inputs = keras.Input((4,))
    path = folder / "lambda.keras"
    keras.Model(inputs, keras.layers.Lambda(lambda t: t + 1.0)(inputs)).save(path)
    return path


def small_keras_file(folder):
    inputs = keras.Input((4,))
    path = folder / "small.keras"
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(path)
    return path


def test_corrupted_file(tmp_path, capsys):
    path = tmp_path / "model.keras"
    path.write_bytes(b"\x00garbage")
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "out")
    assert_one_line_error(status, err, str(path), "not a Keras model file")


def test_missing_file(tmp_path, capsys):
    status, _, err = run_cli(capsys, tmp_path / "nope.keras", "--out", tmp_path / "out")
    assert_one_line_error(status, err, "nope.keras", "does not exist")


def test_lambda_model_is_refused_under_safe_mode(tmp_path, capsys):
    path = lambda_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "out")
    assert_one_line_error(status, err, "Lambda", "safe_mode=True")
    assert not os.path.exists(tmp_path / "out")


def test_unknown_quantization(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--quantize", "int4")
    assert_one_line_error(status, err, "--quantize", "'int4'", "int8")


def test_unknown_format(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--format", "coreml")
    assert_one_line_error(status, err, "--format", "'coreml'", "saved_model, tflite, onnx")


def test_onnx_without_the_extra_names_the_pip_extra(tmp_path, capsys, monkeypatch):
    from hlkeras.export import onnx_export

    monkeypatch.setattr(onnx_export, "missing_packages", lambda: ["onnxruntime"])
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--format", "tflite,onnx")
    assert_one_line_error(
        status, err, "--format onnx", "onnxruntime", "pip install 'hlkeras[onnx]'"
    )
    assert not os.path.exists(tmp_path / "o")


def test_output_path_is_a_file(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", path)
    assert_one_line_error(status, err, "--out", str(path), "existing file")


def test_int8_without_calibration_data(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--quantize", "int8")
    assert_one_line_error(status, err, "int8", "--dataset", "--representative")


def test_existing_artifact_without_overwrite(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    existing = tmp_path / "out" / "model_float32.tflite"
    existing.parent.mkdir()
    existing.write_bytes(b"the good one")
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "out")
    assert_one_line_error(status, err, str(existing), "--overwrite")
    assert existing.read_bytes() == b"the good one"


def test_unreadable_representative_file(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    bad = tmp_path / "rep.npy"
    bad.write_text("not numpy")
    status, _, err = run_cli(
        capsys, path, "--out", tmp_path / "o", "--quantize", "int8",
        "--representative", bad,
    )  # fmt: skip
    assert_one_line_error(status, err, "--representative", str(bad))


def test_a_npy_given_as_verification_archive(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    npy = tmp_path / "verify.npy"
    np.save(npy, np.zeros((4, 6), "float32"))
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--verify", npy)
    assert_one_line_error(status, err, "--verify", str(npy), "not a .npz archive")
    assert not (tmp_path / "o").exists()


def test_dataset_that_cannot_be_loaded(tmp_path, capsys):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(
        capsys, path, "--out", tmp_path / "o", "--quantize", "int8",
        "--dataset", "no_such_dataset",
    )  # fmt: skip
    assert_one_line_error(status, err, "--dataset no_such_dataset", "--representative FILE.npy")


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_a_user_mistake_exits_non_zero_without_traceback(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("not a model")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, "-m", "hlkeras.cli", "export", str(path), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("hlkeras export: error: ")
    assert "not a Keras model file" in last_line


@pytest.mark.parametrize("value", ["-1", "abc", "nan"])
def test_bad_max_accuracy_drop(tmp_path, capsys, value):
    path = small_keras_file(tmp_path)
    status, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--max-accuracy-drop", value)
    assert_one_line_error(status, err, "--max-accuracy-drop", repr(value), ">= 0")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_a_refused_export_exits_non_zero_with_one_line_and_publishes_nothing(
    digits, tmp_path, capsys
):
    x_train, _, x_test, _ = digits
    # Random weights with near-tied class scores: int8 flips many top-1
    # classes. Labels equal to Keras' predictions make every flip a lost point.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(64, activation="relu")(keras.layers.Flatten()(inputs))
    tiny = keras.initializers.RandomNormal(stddev=1e-3)
    model = keras.Model(inputs, keras.layers.Dense(10, kernel_initializer=tiny)(hidden))
    model.save(tmp_path / "model.keras")
    labels = model.predict(x_test, batch_size=1, verbose=0).argmax(-1)
    np.savez(tmp_path / "verify.npz", x=x_test, y=labels)
    np.save(tmp_path / "representative.npy", x_train[:200])
    out = tmp_path / "out"
    status, stdout, err = run_cli(
        capsys, tmp_path / "model.keras", "--out", out, "--quantize", "int8",
        "--representative", tmp_path / "representative.npy",
        "--verify", tmp_path / "verify.npz", "--latency-runs", "0",
    )  # fmt: skip
    assert_one_line_error(
        status,
        err,
        "refused",
        "model_int8.tflite",
        "100.00%",
        "--quantize dynamic",
        str(out / export.REFUSED_REPORT_FILENAME),
    )
    assert "model_int8.tflite" in stdout  # the table still shows the numbers
    assert os.listdir(out) == [export.REFUSED_REPORT_FILENAME]
