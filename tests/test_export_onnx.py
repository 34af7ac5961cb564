"""Tests of ONNX export (`export_model(formats=("onnx",))`): the built-in
architectures, with attention and MoE, match Keras sample by sample in
ONNX Runtime (the vit with MoE on every backend), with a dynamic batch
dimension and the documented opset; text models take int32 token ids; the
accuracy gate covers the `.onnx`; an op with no ONNX conversion and a
missing `onnx` extra fail in one line.

The oracles are Keras' own per-sample outputs and an `onnxruntime`
session opened here, not hlkeras' runner.
"""

import os
import re

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
from export_testing import InverseErf
from export_testing import build_architecture
from export_testing import digits_splits
from layer_testing import heavy

from hlkeras import export
from hlkeras import models
from hlkeras.export import onnx_export

BACKEND = keras.backend.backend()
# On JAX and torch only the handoff differs (the model crosses to a
# TensorFlow subprocess as a `.keras` file, whatever its layers), and
# `test_export.py` checks that handoff for a resnet: vit_moe, with attention
# and MoE, runs on every backend, the other architectures on TensorFlow.
TENSORFLOW_ONLY = pytest.mark.backends("tensorflow")
ARCHS = (
    pytest.param("mlp", marks=TENSORFLOW_ONLY),
    pytest.param("resnet", marks=TENSORFLOW_ONLY),
    "vit_moe",
)
SAMPLES = 48


@pytest.fixture(scope="module")
def digits():
    return digits_splits()


def onnx_runtime_per_sample(path, inputs):
    """The `.onnx` file run one sample at a time in a plain ORT session."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: sample[None]})[0] for sample in inputs])


@heavy
@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_matches_keras_sample_by_sample(arch, digits, tmp_path):
    x_test, y_test = digits[2][:SAMPLES], digits[3][:SAMPLES]
    keras.utils.set_random_seed(5)
    model = build_architecture(arch)  # random weights: parity, not accuracy
    report = export.export_model(
        model, tmp_path, formats=("onnx",), verify_data=(x_test, y_test), latency_runs=3
    )
    path = os.path.join(tmp_path, onnx_export.ONNX_FILENAME)
    reference = model.predict(x_test, batch_size=1, verbose=0)
    outputs = onnx_runtime_per_sample(path, x_test)
    np.testing.assert_allclose(outputs, reference, atol=1e-5)

    artifact = report.artifact("onnx")
    assert artifact.path == path and artifact.size_bytes == os.path.getsize(path)
    assert artifact.max_abs_diff == pytest.approx(np.max(np.abs(outputs - reference)), abs=1e-6)
    assert artifact.accuracy == np.mean(np.argmax(outputs, -1) == y_test)
    assert artifact.latency_ms > 0
    proto = onnx.load(path)
    assert artifact.ops == sorted({node.op_type for node in proto.graph.node})
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    assert opsets[""] == onnx_export.ONNX_OPSET == artifact.opset
    # The batch dimension is symbolic, and a batch gives each sample's own outputs.
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    batched = session.run(None, {session.get_inputs()[0].name: x_test})[0]
    np.testing.assert_allclose(batched, outputs, atol=1e-5)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("encoder", ("transformer", "gru"))
def test_text_model_onnx_takes_token_ids(encoder, tmp_path):
    keras.utils.set_random_seed(2)
    spec = {"arch": "text", "encoder": encoder, "input_shape": (16,), "num_classes": 3}
    model = models.build({**spec, "vocabulary_size": 40})
    ids = np.random.default_rng(0).integers(1, 40, (20, 16)).astype("int32")
    ids[:, 11:] = 0  # padding, masked by the embedding
    export.export_model(model, tmp_path, formats=("onnx",), verify_data=ids, latency_runs=0)
    path = os.path.join(tmp_path, onnx_export.ONNX_FILENAME)
    reference = model.predict(ids, batch_size=1, verbose=0)
    np.testing.assert_allclose(onnx_runtime_per_sample(path, ids), reference, atol=1e-5)


@pytest.mark.backends("tensorflow")
def test_a_table_model_onnx_takes_only_its_features(tmp_path):
    # A table model starts with a Normalization layer whose mean and
    # variance tf2onnx left as graph inputs: ONNX Runtime demanded them.
    x = np.random.default_rng(0).normal(3.0, 2.0, (24, 5)).astype("float32")
    spec = {"arch": "mlp", "input_shape": (5,), "num_classes": 3}
    spec.update(feature_mean=tuple(x.mean(0)), feature_variance=tuple(x.var(0)))
    model = models.build(spec)
    export.export_model(model, tmp_path, formats=("onnx",), verify_data=x, latency_runs=0)
    path = os.path.join(tmp_path, onnx_export.ONNX_FILENAME)
    assert [i.name for i in onnxruntime.InferenceSession(path).get_inputs()] == ["inputs"]
    reference = model.predict(x, batch_size=1, verbose=0)
    np.testing.assert_allclose(onnx_runtime_per_sample(path, x), reference, atol=1e-5)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_an_onnx_file_that_loses_accuracy_is_refused(digits, tmp_path, monkeypatch):
    x_test = digits[2][:SAMPLES]
    keras.utils.set_random_seed(5)
    model = build_architecture("mlp")
    keras_classes = np.argmax(model.predict(x_test, verbose=0), -1)
    # A runtime that answers another class for every sample.
    wrong = np.eye(10, dtype="float32")[(keras_classes + 1) % 10]
    outputs = iter(wrong[:, None])
    monkeypatch.setattr(onnx_export, "predictor", lambda path: lambda x: next(outputs))
    with pytest.raises(export.ExportRefused, match=r"model\.onnx agrees with Keras' top-1"):
        export.export_model(model, tmp_path, formats=("onnx",), verify_data=x_test, latency_runs=0)
    assert not os.path.exists(tmp_path / onnx_export.ONNX_FILENAME)
    assert os.path.exists(tmp_path / export.REFUSED_REPORT_FILENAME)


@pytest.mark.backends("tensorflow")
def test_an_op_without_onnx_conversion_names_the_op_and_the_layer(tmp_path):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4)(inputs)
    model = keras.Model(inputs, InverseErf(name="no_onnx")(hidden))
    with pytest.raises(export.ExportError) as raised:
        export.export_model(model, tmp_path / "new", formats=("onnx",))
    message = str(raised.value)
    assert "op 'Erfinv' in layer 'no_onnx' (InverseErf)" in message
    assert f"opset {onnx_export.ONNX_OPSET}" in message
    assert len(message.splitlines()) == 1
    assert os.listdir(tmp_path) == []


def small_model(kind):
    """A tiny model whose conversion needs one of the op rewrites: an exact
    GELU (TF's Erfc), or an MoE layer (an int32 one-hot of rank 2)."""
    from hlkeras.layers import MixtureOfExperts

    keras.utils.set_random_seed(0)
    if kind == "gelu":
        inputs = keras.Input((8,))
        return keras.Model(inputs, keras.layers.Dense(4, activation="gelu", name="gelu")(inputs))
    inputs = keras.Input((5, 8))
    experts = MixtureOfExperts(num_experts=4, hidden_units=16, name="experts")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(experts))


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize(
    "tf_op, kind, message",
    [
        # Without the rewrite tf2onnx leaves TF's Erfc (exact GELU) in the graph.
        ("Erfc", "gelu", "(opset 17): op 'Erfc' in layer 'gelu' (Dense)"),
        # Without it, tf2onnx writes a rank-2 int32 OneHot that ONNX Runtime rejects.
        (
            "OneHot",
            "moe",
            "op 'OneHot' in layer 'experts' (MixtureOfExperts): ONNX Runtime rejects",
        ),
    ],
)
@pytest.mark.slow
def test_each_op_rewrite_is_what_makes_its_model_convert(
    tf_op, kind, message, tmp_path, monkeypatch
):
    model = small_model(kind)
    handlers = dict(onnx_export._OP_HANDLERS)
    del handlers[tf_op]
    monkeypatch.setattr(onnx_export, "_OP_HANDLERS", handlers)
    with pytest.raises(export.ExportError, match=re.escape(message)) as raised:
        export.export_model(model, tmp_path / "out", formats=("onnx",), latency_runs=0)
    assert len(str(raised.value).splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.undo()
    x = np.random.default_rng(0).normal(size=(4, *model.input_shape[1:])).astype("float32")
    report = export.export_model(
        model, tmp_path / "out", formats=("onnx",), verify_data=x, latency_runs=0
    )
    assert report.artifact("onnx").max_abs_diff < 1e-5


def test_missing_onnx_packages_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "missing_packages", lambda: ["onnxruntime"])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(export.ExportError) as raised:
        export.export_model(model, tmp_path / "new", formats=("tflite", "onnx"))
    assert "onnxruntime" in str(raised.value)
    assert "pip install 'hlkeras[onnx]'" in str(raised.value)
    assert not os.path.exists(tmp_path / "new")


def test_missing_packages_are_the_ones_not_importable(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "tf2onnx" else real_find_spec(name),
    )
    assert onnx_export.missing_packages() == ["tf2onnx"]
