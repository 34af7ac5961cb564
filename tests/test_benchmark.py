"""Tests of `hlkeras.export.benchmark` and `hlkeras benchmark`: every number comes
from the runtime it names (each row's accuracy and agreement equal an
independent Keras / LiteRT / ONNX Runtime evaluation of the same file on the
same data, sizes are the files' sizes), the table, JSON and plot, the run
directory's own dataset, and one-line errors for bad input."""

import json
import os
import shutil

import keras
import numpy as np
import onnxruntime
import pytest
from ai_edge_litert.interpreter import Interpreter
from export_testing import digits_splits
from export_testing import per_sample
from export_testing import train

from hlkeras import cli
from hlkeras import data
from hlkeras import export
from hlkeras.export import benchmark
from hlkeras.export import onnx_export
from hlkeras.training import runs

BACKEND = keras.backend.backend()
SAMPLES = 120


@pytest.fixture(scope="module")
def digits():
    return digits_splits()


@pytest.fixture(scope="module")
def keras_file(digits, tmp_path_factory):
    """A small MLP trained on digits, saved as `.keras`, and the model."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(64, activation="relu")(keras.layers.Flatten()(inputs))
    model = train(keras.Model(inputs, keras.layers.Dense(10)(hidden)), digits[0], digits[1])
    path = tmp_path_factory.mktemp("model") / "mlp.keras"
    model.save(path)
    return str(path), model


def litert_per_sample(path, inputs):
    """A `.tflite` file run one sample at a time in a plain LiteRT interpreter."""
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    (input_detail,), (output_detail,) = (
        interpreter.get_input_details(),
        interpreter.get_output_details(),
    )

    def run(sample):
        interpreter.set_tensor(input_detail["index"], sample.astype("float32"))
        interpreter.invoke()
        return interpreter.get_tensor(output_detail["index"]).copy()

    return per_sample(run, inputs)


def onnx_runtime_per_sample(path, inputs):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return per_sample(lambda sample: session.run(None, {name: sample})[0], inputs)


def top1(outputs):
    return np.argmax(outputs, axis=-1)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_every_row_is_measured_in_its_own_runtime(keras_file, digits, tmp_path):
    path, model = keras_file
    x_test, y_test = digits[2][:SAMPLES], digits[3][:SAMPLES]
    report = benchmark.benchmark_model(
        path,
        (x_test, y_test),
        representative_data=digits[0][:100],
        latency_runs=5,
        work_dir=tmp_path,
        progress=lambda line: None,
    )
    names = [result.name for result in report.results]
    assert names == [
        "keras predict", "keras compiled", "saved_model",
        "tflite float32", "tflite float16", "tflite dynamic", "tflite int8", "onnx",
    ]  # fmt: skip
    keras_outputs = model.predict(x_test, batch_size=1, verbose=0)
    assert report.result("keras predict").accuracy == np.mean(top1(keras_outputs) == y_test)
    assert report.result("keras compiled").accuracy == np.mean(top1(keras_outputs) == y_test)

    independent = {"onnx": onnx_runtime_per_sample}
    for quantization in export.QUANTIZATIONS:
        independent[benchmark._row_name("tflite", quantization)] = litert_per_sample
    for name, run in independent.items():
        result = report.result(name)
        outputs = run(result.path, x_test)
        assert result.accuracy == np.mean(top1(outputs) == y_test), name
        assert result.agreement == np.mean(top1(outputs) == top1(keras_outputs)), name
        assert result.size_bytes == os.path.getsize(result.path), name
    assert report.result("tflite int8").size_bytes < report.result("tflite float32").size_bytes
    assert report.result("onnx").path.endswith(onnx_export.ONNX_FILENAME)
    saved_model = report.result("saved_model")
    assert saved_model.size_bytes == export.path_size(saved_model.path)
    for result in report.results:
        assert 0 < result.latency_p50_ms <= result.latency_p90_ms, result.name
        assert result.throughput > 0, result.name

    json_path, png_path = tmp_path / "report.json", tmp_path / "report.png"
    benchmark.write_json(report, json_path)
    assert json.loads(json_path.read_text())["results"][7]["name"] == "onnx"
    benchmark.plot(report, png_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keras_rows_on_every_backend(keras_file, digits, tmp_path):
    """Keras alone (no artifact): `predict` is the reference, the compiled
    call agrees with it, and the row says whether it was jit-compiled."""
    path, model = keras_file
    x_test, y_test = digits[2][:SAMPLES], digits[3][:SAMPLES]
    report = benchmark.benchmark_model(
        path, (x_test, y_test), formats=(), latency_runs=3, work_dir=tmp_path, progress=print
    )
    predict, compiled = report.results
    expected = model.predict(x_test, batch_size=1, verbose=0)
    assert predict.accuracy == compiled.accuracy == np.mean(top1(expected) == y_test)
    assert compiled.agreement == 1.0 and compiled.max_abs_diff < 1e-4
    assert compiled.note.endswith(f"jit_compile={BACKEND != 'torch'}")
    assert predict.size_bytes == os.path.getsize(path)
    assert report.backend == BACKEND


def test_int8_without_calibration_data_is_a_row_with_a_note(keras_file, digits, tmp_path):
    path, _ = keras_file
    report = benchmark.benchmark_model(
        path,
        (digits[2][:20], digits[3][:20]),
        formats=("tflite",),
        quantizations=("int8",),
        latency_runs=3,
        work_dir=tmp_path,
        progress=lambda line: None,
    )
    int8 = report.result("tflite int8")
    assert int8.latency_p50_ms is None and int8.accuracy is None
    assert "int8 needs representative data" in int8.note
    assert "tflite int8" in "\n".join(benchmark.table_lines(report))


# ---------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    status = cli.main(["benchmark", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hlkeras benchmark: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_benchmark_of_a_run_directory_uses_its_dataset(keras_file, tmp_path, capsys):
    """A run directory's recorded dataset (digits) is the data; the table,
    JSON and plot are written; the accuracy is the test split's."""
    path, model = keras_file
    run_dir = runs.RunDir(str(tmp_path / "run"))
    os.makedirs(run_dir.path)
    shutil.copy(path, run_dir.file(run_dir.MODEL))
    with open(run_dir.file(run_dir.CONFIG), "w") as file:
        json.dump({"dataset": None, "data": None}, file)  # None: the embedded digits
    json_path, png_path = tmp_path / "b.json", tmp_path / "b.png"
    status, out, err = run_cli(
        capsys, run_dir.path, "--formats", "onnx", "--latency-runs", "3",
        "--json", json_path, "--plot", png_path,
    )  # fmt: skip
    assert status == 0, err
    table = out.splitlines()
    assert table[0].split()[:3] == ["runtime", "engine", "size"]
    assert [line.split()[0] for line in table[1:4]] == ["keras", "keras", "onnx"]
    saved = json.loads(json_path.read_text())
    x_test, y_test = data.arrays.dataset_test_arrays("digits")
    expected = np.mean(top1(model.predict(x_test, verbose=0)) == y_test)
    assert saved["samples"] == len(x_test)
    assert saved["results"][2]["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert png_path.exists() and "[3/3] measuring onnx" in err


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (
            ["--formats", "tflite,pb"],
            ["--formats must be one of saved_model, tflite, onnx", "'pb'"],
        ),
        (["--quantize", "int4"], ["--quantize must be one of none, float16, dynamic, int8"]),
        (["--latency-runs", "0"], ["--latency-runs must be >= 1"]),
    ],
)
def test_bad_flags_are_one_line_errors(keras_file, capsys, flags, fragments):
    status, _, err = run_cli(capsys, keras_file[0], "--dataset", "digits", *flags)
    assert_one_line_error(status, err, *fragments)


def test_a_model_that_is_not_a_keras_file_is_a_one_line_error(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    status, _, err = run_cli(capsys, text, "--dataset", "digits")
    assert_one_line_error(status, err, f"MODEL {text}: expected a .keras file or a run directory")
    status, _, err = run_cli(capsys, tmp_path, "--dataset", "digits")  # no model.keras
    assert_one_line_error(status, err, f"MODEL {tmp_path}: expected a .keras file")
    fake = tmp_path / "fake.keras"
    fake.write_text("not a zip")
    status, _, err = run_cli(capsys, fake, "--dataset", "digits")
    assert_one_line_error(status, err, "is not a Keras model file")


def test_a_keras_file_needs_data(keras_file, capsys):
    status, _, err = run_cli(capsys, keras_file[0])
    assert_one_line_error(status, err, "pass --dataset NAME or --data PATH")


def test_onnx_without_the_extra_names_the_pip_extra(keras_file, capsys, monkeypatch):
    monkeypatch.setattr(onnx_export, "missing_packages", lambda: ["onnx", "tf2onnx"])
    status, _, err = run_cli(capsys, keras_file[0], "--dataset", "digits", "--formats", "onnx")
    assert_one_line_error(status, err, "--formats onnx", "pip install 'hlkeras[onnx]'")
