"""Export of a pruned model: the float32 and float16 `.tflite` store its
mostly-zero kernels in the converter's sparse encoding and are smaller than
the dense model's files, verified per sample like any artifact; dynamic and
int8 stay dense, because LiteRT's default runtime cannot run their sparse
kernels (pinned below, so the day it can, this file says so)."""

import json
import os

import keras
import numpy as np
import pytest

from hlkeras import export
from hlkeras import prune
from hlkeras.export import convert

BACKEND = keras.backend.backend()
ALL_MODES = ("none", "float16", "dynamic", "int8")


def inputs(count=48, seed=1):
    return np.random.default_rng(seed).normal(size=(count, 32)).astype("float32")


def mlp(seed=0):
    """An MLP trained to output the argmax of its first 10 inputs, so its
    top-1 margins are clear enough for the quantized files' agreement gate."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = inputs(1024, seed=seed)
    model.fit(x, np.argmax(x[:, :10], axis=-1), epochs=4, batch_size=64, verbose=0)
    return model


def sparse_tensors_by_tensorflow(path):
    """The oracle for `sparse_tensors`: TensorFlow's own flatbuffer reader."""
    from tensorflow.lite.tools import flatbuffer_utils

    with open(path, "rb") as file:
        model = flatbuffer_utils.convert_bytearray_to_object(bytearray(file.read()))
    return sum(t.sparsity is not None for g in model.subgraphs for t in g.tensors)


def export_all_modes(model, out_dir):
    return export.export_model(
        model,
        out_dir,
        formats=("tflite",),
        quantization=ALL_MODES,
        representative_data=inputs(64, seed=2),
        verify_data=inputs(),
        latency_runs=0,
    )


@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory):
    if BACKEND != "tensorflow":
        pytest.skip("the conversion matrix runs on the tensorflow backend only")
    dense = mlp()
    pruned = prune.magnitude(dense, 0.8)
    return (
        export_all_modes(dense, tmp_path_factory.mktemp("dense")),
        export_all_modes(pruned, tmp_path_factory.mktemp("pruned")),
        pruned,
    )


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_the_report_states_the_kernels_sparsity(dense_and_pruned):
    dense_report, pruned_report, pruned = dense_and_pruned
    kernels = [w.numpy() for w in pruned.weights if len(w.shape) == 2]
    zeros = sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
    assert pruned_report.weight_sparsity == pytest.approx(zeros)
    # The head keeps its weights, so the whole is a little under 80%.
    assert 0.75 < pruned_report.weight_sparsity < 0.8
    assert dense_report.weight_sparsity == 0.0


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("quantization", ["none", "float16"])
def test_float_files_of_a_pruned_model_are_sparse_smaller_and_verified(
    dense_and_pruned, quantization
):
    dense_report, pruned_report, _ = dense_and_pruned
    dense, pruned = (r.artifact("tflite", quantization) for r in (dense_report, pruned_report))
    assert pruned.sparse_tensors == sparse_tensors_by_tensorflow(pruned.path) >= 2
    assert dense.sparse_tensors == sparse_tensors_by_tensorflow(dense.path) == 0
    assert "DENSIFY" in pruned.ops
    # 80% zeros: the sparse encoding holds ~20% of the values plus indices.
    assert pruned.size_bytes <= 0.45 * dense.size_bytes
    assert pruned.size_bytes == os.path.getsize(pruned.path)
    tolerance = 1e-4 if quantization == "none" else 1e-2
    assert pruned.max_abs_diff <= tolerance and pruned.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("quantization", ["dynamic", "int8"])
def test_integer_files_of_a_pruned_model_stay_dense(dense_and_pruned, quantization):
    _, pruned_report, _ = dense_and_pruned
    artifact = pruned_report.artifact("tflite", quantization)
    assert artifact.sparse_tensors == sparse_tensors_by_tensorflow(artifact.path) == 0
    assert artifact.top1_agreement >= 0.9


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("quantization", ["dynamic", "int8"])
def test_litert_cannot_run_sparse_integer_kernels(dense_and_pruned, tmp_path, quantization):
    """Why dynamic and int8 stay dense. When this fails, LiteRT runs them:
    add the mode to `convert.SPARSE_QUANTIZATIONS`."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    assert quantization not in convert.SPARSE_QUANTIZATIONS
    _, _, pruned = dense_and_pruned
    saved_model = str(tmp_path / "saved_model")
    convert.export_saved_model(pruned, saved_model)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if quantization == "int8":
        converter.representative_dataset = lambda: ([x[None]] for x in inputs(64, seed=2))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    interpreter = Interpreter(model_content=converter.convert())
    with pytest.raises(RuntimeError, match="failed to prepare|failed to delegate"):
        interpreter.allocate_tensors()
        interpreter.invoke()


@pytest.mark.slow
@pytest.mark.backends("torch")
def test_a_pruned_model_exports_sparse_from_another_backend(tmp_path):
    """The sparse choice crosses to the TensorFlow-backend subprocess."""
    report = export.export_model(
        prune.magnitude(mlp(), 0.8),
        tmp_path,
        formats=("tflite",),
        verify_data=inputs(),
        latency_runs=0,
    )
    artifact = report.artifact("tflite")
    assert artifact.sparse_tensors >= 2 and artifact.max_abs_diff <= 1e-4


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_the_cli_says_which_files_are_sparse(dense_and_pruned, tmp_path, capsys):
    from hlkeras import cli

    _, _, pruned = dense_and_pruned
    pruned.save(tmp_path / "pruned.keras")
    np.savez(tmp_path / "verify.npz", x=inputs())
    out = tmp_path / "out"
    argv = ["export", str(tmp_path / "pruned.keras"), "--out", str(out), "--format", "tflite"]
    argv += ["--quantize", "none,dynamic", "--verify", str(tmp_path / "verify.npz")]
    assert cli.main([*argv, "--latency-runs", "0"]) == 0
    report = export.ExportReport.from_dict(json.loads((out / "export.json").read_text()))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("kernels ")]
    assert line == [
        f"kernels {report.weight_sparsity:.1%} zeros: model_float32.tflite store them in the "
        "sparse encoding (dynamic and int8 stay dense: LiteRT cannot run theirs)"
    ]
