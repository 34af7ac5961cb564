"""Tests of `hlkeras.export.export_model`: every quantization mode of every
built-in architecture converts builtins-only and runs in LiteRT, per-sample
parity and accuracy against Keras at batch 1, the accuracy gate that refuses
a worse artifact, sizes, the SavedModel without hlkeras, cross-backend
equality, atomic writes and the bad-input errors.

The conversion matrix trains the real `hlkeras.models` architectures (mlp,
resnet, vit with MoE) and exports them once per module on TensorFlow
(the artifacts do not depend on the backend: JAX and torch convert through
the same TF-backend code, which `test_*_export_equals_tensorflow` proves).
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from export_testing import InverseErf
from export_testing import accuracy
from export_testing import build_resnet
from export_testing import digits_splits
from export_testing import litert_per_sample
from export_testing import train_architecture
from keras import ops

from hlkeras import export
from hlkeras.export import auto

BACKEND = keras.backend.backend()
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
# The vit without MoE is left out of the matrix (35 s of CI): its attention is
# in vit_moe and its dense FFN's ops (Dense, gelu) in mlp, in every mode.
MATRIX_ARCHS = ("mlp", "resnet", "vit_moe")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    return digits_splits()


@pytest.fixture(scope="module")
def matrix(digits, tmp_path_factory):
    """Trains each built-in architecture once and exports it in every mode,
    in one export (one SavedModel, one Keras reference)."""
    if BACKEND != "tensorflow":
        pytest.skip("the conversion matrix runs on the tensorflow backend only")
    x_train, y_train, x_test, y_test = digits
    results = {}
    for name in MATRIX_ARCHS:
        keras.utils.set_random_seed(7)
        model = train_architecture(name, x_train, y_train)
        report = export.export_model(
            model,
            tmp_path_factory.mktemp(name),
            formats=("tflite",),
            quantization=QUANTIZATIONS,
            representative_data=x_train[:200],
            verify_data=(x_test, y_test),
            latency_runs=5,
        )
        results[name] = (model, report)
    return results


@pytest.fixture(scope="module")
def keras_per_sample(matrix, digits):
    """Each matrix model's outputs on the test inputs one sample at a time
    (batch 1), computed once: the oracle the reports are checked against."""
    return {
        name: model.predict(digits[2], batch_size=1, verbose=0)
        for name, (model, _) in matrix.items()
    }


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


# ---------------------------------------------------------------- matrix


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_every_mode_is_builtins_only_and_runs_in_litert(
    matrix, keras_per_sample, digits, arch, quantization
):
    _, report = matrix[arch]
    artifact = report.artifact("tflite", quantization)
    assert artifact.quantization == quantization
    flatbuffer = read_bytes(artifact.path)
    ops_in_file = export.tflite_op_names(flatbuffer)
    assert set(ops_in_file) <= export.builtin_op_names()
    assert not any(op.startswith("Flex") for op in ops_in_file)
    assert artifact.ops == ops_in_file
    assert artifact.builtin_only is True
    assert artifact.size_bytes == os.path.getsize(artifact.path)

    x_test, y_test = digits[2], digits[3]
    # The report's numbers are what an independent run measures, one
    # sample at a time as a device runs the file, in a plain interpreter.
    outputs = litert_per_sample(flatbuffer, x_test)
    assert outputs.shape == (len(x_test), 10)
    expected = keras_per_sample[arch]
    assert artifact.max_abs_diff == pytest.approx(
        float(np.max(np.abs(outputs - expected))), rel=1e-6, abs=1e-7
    )
    assert artifact.top1_agreement == pytest.approx(
        np.mean(outputs.argmax(-1) == expected.argmax(-1))
    )
    assert artifact.accuracy == pytest.approx(accuracy(outputs, y_test))
    assert report.keras_accuracy == pytest.approx(accuracy(expected, y_test))
    # Medians of real timings: positive, and a 0.1-ms-scale model at batch 1
    # runs in well under a second in both runtimes.
    assert 0 < artifact.latency_ms < 1000 and 0 < report.keras_latency_ms < 1000


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_outputs_do_not_depend_on_the_batch_in_keras_and_litert(
    matrix, keras_per_sample, digits, arch
):
    model, report = matrix[arch]
    x_test = digits[2]
    flatbuffer = read_bytes(report.artifact("tflite", "none").path)
    one_batch = export.run_tflite(flatbuffer, x_test)
    one_at_a_time = litert_per_sample(flatbuffer, x_test)
    np.testing.assert_allclose(one_at_a_time, one_batch, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        model.predict(x_test, batch_size=len(x_test), verbose=0),
        keras_per_sample[arch],
        rtol=0,
        atol=1e-5,
    )
    assert report.keras_batch_max_abs_diff <= 1e-5


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_float32_parity(matrix, arch):
    _, report = matrix[arch]
    assert report.artifact("tflite", "none").max_abs_diff <= 1e-4


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_every_quantization_within_1_point_of_keras(matrix, arch):
    _, report = matrix[arch]
    assert report.keras_accuracy >= 0.9, "the model must be trained to mean much"
    assert report.refused is None
    assert report.quantization == list(QUANTIZATIONS)
    for quantization in QUANTIZATIONS:
        artifact = report.artifact("tflite", quantization)
        assert abs(artifact.accuracy - report.keras_accuracy) <= 0.01, quantization
        assert artifact.top1_agreement >= 0.98, quantization


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_quantized_file_sizes(matrix, arch):
    _, report = matrix[arch]
    paths = {q: report.artifact("tflite", q).path for q in QUANTIZATIONS}
    # The weights (constant buffers) shrink as quantization says: 1/4 for
    # int8 (plus per-channel scales), 1/2 for float16. Dynamic-range keeps
    # tensors of <= 1024 values (biases, norms, the position embedding) in
    # float32: 0.27-0.29x measured for the vits.
    weights = {q: constant_buffer_bytes(read_bytes(path)) for q, path in paths.items()}
    assert weights["int8"] <= 0.27 * weights["none"]
    assert weights["dynamic"] <= 0.30 * weights["none"]
    assert 0.45 * weights["none"] <= weights["float16"] <= 0.55 * weights["none"]
    # Whole files too, where the weights outweigh the graph. The vit files
    # are not 0.3x: their ~500 op and tensor tables (45-100 KB, measured)
    # weigh as much as their 69k-169k int8 weights.
    if arch in ("mlp", "resnet"):
        size = {q: report.artifact("tflite", q).size_bytes for q in QUANTIZATIONS}
        assert size["int8"] <= 0.30 * size["none"]
        assert size["dynamic"] <= 0.30 * size["none"]


def constant_buffer_bytes(flatbuffer):
    """Bytes of the constant tensors (weights) in a `.tflite` flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    return sum(model.Buffers(i).DataLength() for i in range(model.BuffersLength()))


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_int8_io_takes_and_returns_int8(matrix, digits, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model, _ = matrix["resnet"]
    x_train, _, x_test, y_test = digits
    report = export.export_model(
        model,
        tmp_path,
        formats=("tflite",),
        quantization="int8",
        representative_data=x_train[:200],
        verify_data=(x_test, y_test),
        int8_io=True,
        latency_runs=0,
    )
    artifact = report.artifact("tflite")
    interpreter = Interpreter(model_path=artifact.path)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert report.int8_io is True
    assert abs(artifact.accuracy - report.keras_accuracy) <= 0.015
    # The report's accuracy is what a plain interpreter, scaling the int8
    # input and output itself, measures.
    outputs = litert_per_sample(read_bytes(artifact.path), x_test)
    assert artifact.accuracy == pytest.approx(accuracy(outputs, y_test))


# ---------------------------------------------------------------- quantization="auto"


def _fastest_passing(candidates, passes):
    """The rule `auto` documents: the lowest median latency; of equal
    latencies, the smaller file (a tiny model's float16 and dynamic files
    can time the same to the nanosecond)."""
    passed = (row for row in candidates if passes(row))
    return min(passed, key=lambda row: (row["latency_ms"], row["size_bytes"]))


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_auto_publishes_only_the_fastest_tflite_that_passes_the_gate(matrix, digits, tmp_path):
    """Every mode is converted and measured; the one file published is the
    fastest that passed, and a plain LiteRT interpreter measures on it what
    the report says. About 8 s."""
    model, _ = matrix["mlp"]
    x_train, _, x_test, y_test = digits
    report = export.export_model(
        model, tmp_path, formats=("tflite",), quantization="auto",
        representative_data=x_train[:200], verify_data=(x_test, y_test), latency_runs=5,
    )  # fmt: skip
    candidates = report.auto["candidates"]
    assert [row["quantization"] for row in candidates] == list(export.QUANTIZATIONS)
    assert report.auto["skipped"] == {}
    # The gate, recomputed: at most 1.0 point below Keras (max_accuracy_drop).
    passes = lambda row: 100 * (report.keras_accuracy - row["accuracy"]) <= 1.0  # noqa: E731
    assert [row["refused"] is None for row in candidates] == [passes(r) for r in candidates]
    chosen = _fastest_passing(candidates, passes)["quantization"]
    assert report.auto["chosen"] == chosen == report.quantization
    assert report.auto["reason"].startswith(f"{export.tflite_filename(chosen)} is the fastest")

    published = sorted(name for name in os.listdir(tmp_path) if name.endswith(".tflite"))
    assert published == [export.tflite_filename(chosen)]
    artifact = report.artifact("tflite")
    assert artifact.quantization == chosen
    outputs = litert_per_sample(read_bytes(artifact.path), x_test)
    assert accuracy(outputs, y_test) == pytest.approx(artifact.accuracy)
    with open(tmp_path / export.REPORT_FILENAME) as file:
        assert json.load(file)["auto"] == report.auto


@pytest.mark.backends("tensorflow")
def test_auto_without_calibration_tries_the_other_modes_under_the_gate(tmp_path):
    """No representative data: int8 is not tried, and says why. With a gate
    of 0 points (labels-free: 100% top-1 agreement), a file that disagrees
    on one sample is refused; float32 agrees on all."""
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    report = export.export_model(
        tiny_model(2), tmp_path, formats=("tflite",), quantization="auto", verify_data=x,
        latency_runs=3, max_accuracy_drop=0.0,
    )  # fmt: skip
    assert report.auto["skipped"] == {"int8": auto.NO_CALIBRATION}
    candidates = report.auto["candidates"]
    assert [row["quantization"] for row in candidates] == ["none", "float16", "dynamic"]
    passes = lambda row: row["top1_agreement"] == 1.0  # noqa: E731
    assert [row["refused"] is None for row in candidates] == [passes(r) for r in candidates]
    assert report.auto["chosen"] == _fastest_passing(candidates, passes)["quantization"]
    assert "not tried: int8: int8 needs calibration inputs" in report.auto["reason"]


@pytest.mark.neutral
def test_candidates_are_timed_in_turns_and_ranked_by_their_median(monkeypatch):
    """`runtimes.interleaved_latency_ms`, the timing `auto` ranks by: each
    round times every file once, and a file's latency is the median of its
    rounds (a fake timer's table here, the formula's oracle)."""
    from hlkeras.export import runtimes

    table = {b"a": iter([5.0, 1.0, 2.0]), b"b": iter([3.0, 9.0, 4.0])}
    calls = []

    def fake_latency(flatbuffer, sample, repeats):
        calls.append(flatbuffer)
        return next(table[flatbuffer])

    monkeypatch.setattr(runtimes, "tflite_latency_ms", fake_latency)
    medians = runtimes.interleaved_latency_ms({"a": b"a", "b": b"b"}, None, 10, rounds=3)
    assert calls == [b"a", b"b"] * 3
    assert medians == {"a": 2.0, "b": 4.0}


@pytest.mark.neutral
@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(formats=("saved_model",)), "`formats` must include 'tflite'"),
        (dict(), "needs verify_data"),
        (dict(verify_data=np.ones((2, 6), "float32"), latency_runs=0), "latency_runs > 0"),
    ],
)
def test_auto_needs_a_tflite_verification_data_and_timing(tmp_path, arguments, message):
    with pytest.raises(export.ExportError, match=re.escape(message)):
        export.export_model(tiny_model(0), tmp_path, quantization="auto", **arguments)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- SavedModel


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_int8_in_one_export_with_float32_is_the_int8_converted_alone(matrix, digits):
    """The export hands its float32 conversion to the int8 route, which reads
    which matmuls have no weight operand from it; converting int8 alone
    (which converts its own float32) gives the same bytes. vit_moe: its
    attention has such matmuls. About 8 s."""
    from hlkeras.export import convert

    model, report = matrix["vit_moe"]
    alone = convert.model_to_tflite(model, "int8", representative_data=digits[0][:200])
    assert read_bytes(report.artifact("tflite", "int8").path) == alone


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_saved_model_loads_with_plain_tensorflow_without_hlkeras(matrix, digits, tmp_path):
    model, _ = matrix["resnet"]
    x_test = digits[2][:32]
    report = export.export_model(
        model, tmp_path / "out", formats=("saved_model",), verify_data=x_test
    )
    saved_model = report.artifact("saved_model").path
    np.save(tmp_path / "x.npy", x_test)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({saved_model!r})
        serving = loaded.signatures["serving_default"]
        (output,) = serving(tf.constant(np.load({str(tmp_path / "x.npy")!r}))).values()
        np.save({str(tmp_path / "y.npy")!r}, output.numpy())
        assert not any(m.split(".")[0] == "hlkeras" for m in sys.modules), "imported"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # not the checkout, so `hlkeras` is not importable by accident
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    expected = ops.convert_to_numpy(model(x_test, training=False))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
    assert report.artifact("saved_model").max_abs_diff <= 1e-5


# ---------------------------------------------------------------- report file


@pytest.mark.backends("tensorflow")
def test_report_is_written_as_json_and_round_trips(matrix):
    _, report = matrix["resnet"]
    with open(os.path.join(report.out_dir, export.REPORT_FILENAME)) as file:
        data = json.load(file)
    assert data == json.loads(report.to_json())
    assert export.ExportReport.from_dict(data) == report
    # One export, one file per quantization, and nothing else left behind
    # (the shared SavedModel was not asked for).
    assert sorted(os.listdir(report.out_dir)) == sorted(
        [export.REPORT_FILENAME] + [export.tflite_filename(q) for q in QUANTIZATIONS]
    )
    assert [a.quantization for a in report.artifacts] == list(QUANTIZATIONS)
    with pytest.raises(KeyError, match="name the quantization"):
        report.artifact("tflite")
    assert report.artifact("tflite", "float32") is report.artifact("tflite", "none")


# ---------------------------------------------------------------- any backend


def reference_tensorflow_export(keras_path, out_dir):
    """The TF-backend export of `keras_path`, by the CLI in its own process."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = REPO_ROOT
    command = [sys.executable, "-m", "hlkeras.cli", "export", str(keras_path)]
    command += ["--out", str(out_dir), "--format", "tflite", "--latency-runs", "0"]
    command += ["--quantize", ",".join(TWO_MODES)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return {q: os.path.join(out_dir, export.tflite_filename(q)) for q in TWO_MODES}


# Two quantizations in one export: the request crosses to the TF-backend
# subprocess as a list, and one SavedModel serves both conversions.
TWO_MODES = ("none", "float16")


@pytest.mark.slow
@pytest.mark.backends("jax", "torch")
def test_jax_and_torch_export_equals_tensorflow_export(digits, tmp_path):
    x_test = digits[2][:64]
    keras.utils.set_random_seed(3)
    model = build_resnet()  # Random weights are enough to compare numbers.
    report = export.export_model(
        model, tmp_path / BACKEND, quantization=TWO_MODES, verify_data=x_test, latency_runs=5
    )
    assert report.backend == BACKEND
    assert report.artifact("tflite", "none").max_abs_diff <= 1e-4
    assert report.artifact("tflite", "float16").max_abs_diff <= 1e-2
    assert report.artifact("saved_model").max_abs_diff <= 1e-4
    assert all(a.builtin_only for a in report.artifacts if a.format == "tflite")

    model.save(tmp_path / "model.keras")
    references = reference_tensorflow_export(tmp_path / "model.keras", tmp_path / "tf")
    for quantization, reference in references.items():
        ours = read_bytes(report.artifact("tflite", quantization).path)
        assert export.tflite_op_names(ours) == export.tflite_op_names(read_bytes(reference))
        np.testing.assert_array_equal(
            export.run_tflite(ours, x_test), export.run_tflite(read_bytes(reference), x_test)
        )
        # The converter is deterministic, so the files are the same bytes.
        assert ours == read_bytes(reference), quantization


# ---------------------------------------------------------------- LoRA / MoE


def lora_model():
    """A trained-looking Dense net with a LoRA adapter whose B is non-zero, so
    an unmerged or wrongly merged export would change the outputs."""
    from hlkeras.lora import apply_lora

    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, name="adapted")(inputs)
    model = apply_lora(keras.Model(inputs, keras.layers.Dense(3)(hidden)), rank=2)
    adapter = model.get_layer("adapted")
    adapter.lora_kernel_b.assign(np.random.default_rng(1).normal(size=adapter.lora_kernel_b.shape))
    return model


def test_prepare_for_export_merges_lora_layers():
    from hlkeras.layers import LoRADense

    model = lora_model()
    x = np.random.default_rng(0).normal(size=(8, 12)).astype("float32")
    prepared = export.loading.prepare_for_export(model)
    layers = list(prepared._flatten_layers(include_self=False, recursive=True))
    assert not any(isinstance(layer, LoRADense) for layer in layers)
    assert prepared.get_layer("adapted").__class__ is keras.layers.Dense
    np.testing.assert_allclose(
        ops.convert_to_numpy(prepared(x)), ops.convert_to_numpy(model(x)), atol=1e-5
    )


@pytest.mark.backends("tensorflow")
def test_lora_model_exports_merged(tmp_path):
    model = lora_model()
    x = np.random.default_rng(0).normal(size=(8, 12)).astype("float32")
    report = export.export_model(model, tmp_path, formats=("tflite",), verify_data=x)
    artifact = report.artifact("tflite")
    assert artifact.max_abs_diff <= 1e-5
    # Merged: one matmul per Dense. Unmerged LoRA would add two more.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=read_bytes(artifact.path))
    op_names = [op["op_name"] for op in interpreter._get_ops_details()]
    assert op_names.count("FULLY_CONNECTED") == 2
    assert "BATCH_MATMUL" not in op_names


def moe_model(capacity_factor):
    from hlkeras.layers import MixtureOfExperts

    inputs = keras.Input((6, 8))
    outputs = MixtureOfExperts(4, 16, capacity_factor=capacity_factor, name="moe")(inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("capacity_factor", [0.5, None], ids=["capacity-drops", "dropless"])
def test_moe_exports_match_keras_per_sample(capacity_factor, tmp_path):
    model = moe_model(capacity_factor)
    x = np.random.default_rng(0).normal(size=(24, 6, 8)).astype("float32")
    assert export.loading.prepare_for_export(model) is model  # no surgery needed
    report = export.export_model(model, tmp_path, verify_data=x, latency_runs=0)
    assert report.refused is None
    assert report.keras_batch_max_abs_diff <= 1e-5
    for artifact in report.artifacts:
        assert artifact.max_abs_diff <= 1e-4, artifact.format
    flatbuffer = read_bytes(report.artifact("tflite").path)
    np.testing.assert_allclose(
        export.run_tflite(flatbuffer, x),
        model.predict(x, batch_size=1, verbose=0),
        rtol=0,
        atol=1e-4,
    )


# ---------------------------------------------------------------- the gate


def random_classifier(seed):
    """Random weights and near-tied class scores: int8 rounding flips many
    top-1 classes, so its int8 file is worse than Keras by construction."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(64, activation="relu")(x)
    logits = keras.layers.Dense(
        10, kernel_initializer=keras.initializers.RandomNormal(stddev=1e-3)
    )(x)
    return keras.Model(inputs, keras.layers.Softmax()(logits))


@pytest.mark.backends("tensorflow")
def test_an_artifact_that_fails_in_litert_is_refused_in_one_line(digits, tmp_path, monkeypatch):
    # A graph LiteRT converts but cannot run: the interpreter's error becomes
    # the refusal, nothing is published, no traceback reaches the CLI.
    x_train, y_train, x_test, y_test = digits
    message = "tflite/kernels/div.cc:262 data[i] != zero_point was not true."

    def failing_run(flatbuffer, inputs):
        raise RuntimeError(message)

    monkeypatch.setattr(export.verify, "tflite_per_sample", failing_run)
    with pytest.raises(export.ExportRefused) as raised:
        export.export_model(
            random_classifier(0), tmp_path, formats=("tflite",), quantization="none",
            verify_data=(x_test, y_test), latency_runs=0,
        )  # fmt: skip
    assert f"model_float32.tflite failed to run in LiteRT: {message[:-1]}. " in str(raised.value)
    assert os.listdir(tmp_path) == [export.REFUSED_REPORT_FILENAME]


# The gate runs in the calling process on the per-sample outputs, the same
# code on every backend; JAX and torch reach it through the conversion
# subprocess that test_jax_and_torch_export_equals_tensorflow_export and
# test_subprocess_refusal_reaches_the_caller_and_publishes_nothing cover.
@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_an_artifact_that_loses_accuracy_is_refused_and_nothing_is_published(digits, tmp_path):
    x_train, y_train, x_test, y_test = digits
    model = random_classifier(0)
    # Labels equal to the Keras predictions make Keras 100% accurate, so
    # every flipped top-1 class of the int8 file is a lost point.
    labels = model.predict(x_test, batch_size=1, verbose=0).argmax(-1)
    with pytest.raises(export.ExportRefused) as raised:
        export.export_model(
            model, tmp_path, formats=("tflite",), quantization="int8",
            representative_data=x_train[:200], verify_data=(x_test, labels),
            latency_runs=0, max_accuracy_drop=1.0,
        )  # fmt: skip
    message = str(raised.value)
    report = raised.value.report
    artifact = report.artifact("tflite")
    assert report.keras_accuracy == 1.0
    assert 100 * (1.0 - artifact.accuracy) > 1.0
    assert "model_int8.tflite" in message and f"{artifact.accuracy:.2%}" in message
    assert "100.00%" in message and "--quantize dynamic" in message
    # Nothing published; the report is next to where the file would be.
    assert os.listdir(tmp_path) == [export.REFUSED_REPORT_FILENAME]
    with open(tmp_path / export.REFUSED_REPORT_FILENAME) as file:
        assert export.ExportReport.from_dict(json.load(file)) == report
    assert report.refused in message

    # Without labels the same gate applies to top-1 agreement.
    with pytest.raises(export.ExportRefused, match="agrees with Keras' top-1 class"):
        export.export_model(
            model, tmp_path, formats=("tflite",), quantization="int8",
            representative_data=x_train[:200], verify_data=x_test, latency_runs=0,
        )  # fmt: skip
    # A looser gate publishes the same file, and the stale refusal goes.
    report = export.export_model(
        model, tmp_path, formats=("tflite",), quantization="int8",
        representative_data=x_train[:200], verify_data=(x_test, labels),
        latency_runs=0, max_accuracy_drop=100.0,
    )  # fmt: skip
    assert report.refused is None
    assert sorted(os.listdir(tmp_path)) == [export.REPORT_FILENAME, "model_int8.tflite"]


@keras.saving.register_keras_serializable(package="hlkeras_tests")
class SubtractBatchMean(keras.layers.Layer):
    """Mixes samples at inference: each output depends on its batch-mates."""

    def call(self, inputs):
        return inputs - ops.mean(inputs, axis=0, keepdims=True)


def test_a_model_whose_outputs_depend_on_the_batch_is_refused(tmp_path):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, SubtractBatchMean()(keras.layers.Dense(4)(inputs)))
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    with pytest.raises(export.ExportRefused, match="depends on the other samples") as raised:
        export.export_model(model, tmp_path, verify_data=x, latency_runs=0)
    assert raised.value.report.keras_batch_max_abs_diff > 0.01
    assert os.listdir(tmp_path) == [export.REFUSED_REPORT_FILENAME]


@pytest.mark.parametrize("value", [-0.5, "1", True, float("nan")])
def test_max_accuracy_drop_must_be_a_non_negative_number(tmp_path, value):
    with pytest.raises(export.ExportError, match="`max_accuracy_drop`.*>= 0"):
        export.export_model(tiny_model(0), tmp_path, max_accuracy_drop=value)
    assert not os.path.exists(tmp_path / export.REPORT_FILENAME)


def test_verification_data_of_the_wrong_shape_names_both_shapes(tmp_path):
    with pytest.raises(export.ExportError, match=r"\(N, 6\).*Received shape \(3, 5\)"):
        export.export_model(tiny_model(0), tmp_path, verify_data=np.zeros((3, 5), "float32"))


# ---------------------------------------------------------------- Flex ops


@pytest.mark.backends("tensorflow")
def test_flex_op_error_names_the_op_and_the_layer(tmp_path):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4)(inputs)
    model = keras.Model(inputs, InverseErf(name="needs_flex")(hidden))
    with pytest.raises(export.ExportError) as raised:
        export.export_model(model, tmp_path / "new", formats=("tflite",))
    message = str(raised.value)
    assert "'Erfinv'" in message
    assert "'needs_flex' (InverseErf)" in message
    assert "Flex" in message
    # Nothing published, no staging left behind, the directory it made removed.
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- atomic writes


def tiny_model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


@pytest.mark.backends("tensorflow")
def test_existing_artifacts_need_overwrite_and_failures_keep_them(tmp_path):
    x = np.ones((2, 6), "float32")
    tflite_only = dict(formats=("tflite",), latency_runs=0)
    first = export.export_model(tiny_model(1), tmp_path, **tflite_only)
    tflite_path = first.artifact("tflite").path
    original = read_bytes(tflite_path)

    with pytest.raises(export.ExportError, match="overwrite=True"):
        export.export_model(tiny_model(2), tmp_path, **tflite_only)
    assert read_bytes(tflite_path) == original

    # A failing export with overwrite=True leaves the good artifacts in place.
    inputs = keras.Input((6,))
    failing = keras.Model(inputs, InverseErf()(inputs))
    with pytest.raises(export.ExportError, match="Erfinv"):
        export.export_model(failing, tmp_path, overwrite=True, **tflite_only)
    assert read_bytes(tflite_path) == original
    assert sorted(os.listdir(tmp_path)) == sorted(["model_float32.tflite", "export.json"])

    second_model = tiny_model(2)
    export.export_model(second_model, tmp_path, overwrite=True, **tflite_only)
    replaced = read_bytes(tflite_path)
    assert replaced != original
    np.testing.assert_allclose(
        export.run_tflite(replaced, x),
        ops.convert_to_numpy(second_model(x)),
        atol=1e-5,
    )
    assert sorted(os.listdir(tmp_path)) == sorted(["model_float32.tflite", "export.json"])


# ---------------------------------------------------------------- bad input


def test_corrupted_file_is_refused(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(export.ExportError, match="not a Keras model file"):
        export.export_model(path, tmp_path / "out")


def test_zip_that_is_not_a_keras_model_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "other.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(export.ExportError, match="not a loadable Keras model"):
        export.export_model(path, tmp_path / "out")


def test_non_keras_extension_is_refused(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(export.ExportError, match=r"`\.keras` zip archive"):
        export.export_model(path, tmp_path / "out")


def test_lambda_layer_is_refused_under_safe_mode(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(export.ExportError, match="Lambda.*safe_mode=True"):
        export.export_model(path, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_int8_without_representative_data_is_refused(tmp_path):
    with pytest.raises(export.ExportError, match="int8.*representative_data"):
        export.export_model(tiny_model(0), tmp_path, quantization="int8")
    assert os.listdir(tmp_path) == []


class _Cycle:
    """A reference cycle: only a full collection frees it."""

    def __init__(self):
        self.me = self


@pytest.mark.neutral
def test_a_conversion_collects_its_own_garbage_and_leaves_older_garbage_to_later():
    """`convert_saved_model` runs in
    `_collections_skip_older_objects`: the converter's own `gc.collect()`
    does not walk objects older than the conversion (frozen for it), frees
    what the conversion made, and leaves the process unfrozen, also when the
    conversion fails."""
    import gc
    import weakref

    from hlkeras.export import convert

    gc.disable()  # no automatic collection between the steps
    try:
        older = weakref.ref(_Cycle())
        with pytest.raises(RuntimeError, match="conversion failed"):
            with convert._collections_skip_older_objects():
                newer = weakref.ref(_Cycle())
                gc.collect()
                assert newer() is None and older() is not None
                raise RuntimeError("conversion failed")
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert older() is None
    finally:
        gc.enable()


@pytest.mark.neutral
def test_a_conversion_leaves_a_process_that_froze_objects_itself_frozen():
    import gc

    from hlkeras.export import convert

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with convert._collections_skip_older_objects():
            gc.collect()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


@pytest.mark.neutral
def test_quantizations_are_one_name_or_a_sequence_float32_naming_none():
    assert export.check_quantizations("int8") == ("int8",)
    assert export.check_quantizations(["float32", "none", "dynamic"]) == ("none", "dynamic")
    with pytest.raises(export.ExportError, match=r"at least one of .*Received: \(\)"):
        export.check_quantizations(())
    with pytest.raises(export.ExportError, match=r"Received: quantization='int4'"):
        export.check_quantizations(("none", "int4"))


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(
        export.ExportError, match=r"`quantization`.*'int8'.*Received: quantization='int4'"
    ):
        export.export_model(tiny_model(0), tmp_path, quantization="int4")


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(export.ExportError, match=r"`formats`.*Received: formats='coreml'"):
        export.export_model(tiny_model(0), tmp_path, formats=("coreml",))


def test_output_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "taken"
    path.write_text("a file")
    with pytest.raises(export.ExportError, match="`out_dir`.*existing file"):
        export.export_model(tiny_model(0), path)
    assert path.read_text() == "a file"


def test_representative_data_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(export.ExportError, match=r"representative_data.*\(N, 6\)"):
        export.export_model(
            tiny_model(0),
            tmp_path,
            quantization="int8",
            representative_data=np.zeros((10, 5), "float32"),
        )


@pytest.mark.slow
@pytest.mark.backends("jax", "torch")
def test_subprocess_refusal_reaches_the_caller_and_publishes_nothing(tmp_path):
    # In memory a Lambda runs fine; the TF-backend process must load it with
    # safe_mode=True and refuses it.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    with pytest.raises(export.ExportError, match="from (jax|torch).*Lambda.*safe_mode"):
        export.export_model(model, tmp_path / "new", latency_runs=0)
    assert os.listdir(tmp_path) == []


def test_a_model_that_outputs_nan_is_refused_as_such_before_any_conversion(tmp_path):
    # log() of a negative feature: NaN for exactly the samples with one. The
    # refusal says so instead of reporting batch dependence or lost parity.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Activation(ops.log)(inputs))
    x = np.abs(np.random.default_rng(0).normal(size=(10, 3))).astype("float32") + 0.1
    x[[2, 5, 7], 1] *= -1.0
    with pytest.raises(export.ExportRefused) as raised:
        export.export_model(model, tmp_path, formats=("tflite",), verify_data=x, latency_runs=0)
    message = str(raised.value)
    assert "the Keras model outputs NaN or infinity for 3 of 10 verification samples" in message
    assert "(the first is sample 2)" in message and "depends on the other samples" not in message
    assert os.listdir(tmp_path) == [export.REFUSED_REPORT_FILENAME]


@pytest.mark.parametrize("argument", ["verify_data", "representative_data"])
def test_non_finite_export_data_is_an_error_naming_the_argument(argument, tmp_path):
    model = random_classifier(0)
    x = np.zeros((4, 8, 8, 1), "float32")
    x[3, 2, 1, 0] = np.inf
    finite = np.zeros((4, 8, 8, 1), "float32")
    data = {"verify_data": finite, "representative_data": finite, argument: x}
    with pytest.raises(export.ExportError, match=f"`{argument}` has inf in sample 3"):
        export.export_model(
            model, tmp_path, formats=("tflite",), quantization="int8", latency_runs=0, **data
        )
    assert not tmp_path.exists() or not os.listdir(tmp_path)
