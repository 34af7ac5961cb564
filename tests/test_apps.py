"""Each script in apps/ runs end to end with --epochs 1.

The scripts run in this process (`runpy`, as `__main__`), which saves a
TensorFlow start-up per script, and on one backend only: they call library
code that the other tests cover on every backend.
"""

import json
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _run_app(name, monkeypatch, tmp_path, data_dir, *flags):
    monkeypatch.chdir(tmp_path)
    argv = [name, "--epochs", "1", "--data-dir", data_dir, *flags]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "apps", name), run_name="__main__")


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_train_digits(monkeypatch, tmp_path, data_dir, capsys):
    _run_app("train_digits.py", monkeypatch, tmp_path, data_dir, "--out", "m.keras")
    assert "test accuracy:" in capsys.readouterr().out
    assert (tmp_path / "m.keras").exists()


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_export_mobile(monkeypatch, tmp_path, data_dir, capsys):
    _run_app("export_mobile.py", monkeypatch, tmp_path, data_dir, "--out", "d")
    out = capsys.readouterr().out
    assert "same prediction on 100.0% of images" in out
    tflite = tmp_path / "d" / "model_float32.tflite"
    assert tflite.read_bytes()[4:8] == b"TFL3"  # flatbuffer file id
    with open(tmp_path / "d" / "export.json") as file:
        report = json.load(file)
    assert report["artifacts"][0]["top1_agreement"] == 1.0
    assert f"keras {report['keras_accuracy']:.4f}" in out


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_vit_moe(monkeypatch, tmp_path, data_dir, capsys):
    _run_app("vit_moe.py", monkeypatch, tmp_path, data_dir, "--out", "v.keras")
    assert "test accuracy:" in capsys.readouterr().out
    assert (tmp_path / "v.keras").exists()


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_lora_finetune(monkeypatch, tmp_path, data_dir, capsys):
    _run_app("lora_finetune.py", monkeypatch, tmp_path, data_dir, "--out", "l", "--dora")
    out = capsys.readouterr().out
    for name in ("digits_5_9", "mod_5"):
        line = next(line for line in out.splitlines() if line.startswith(f"adapter {name} "))
        adapted, merged = (float(v) for v in line.split("adapted ")[1].split(", merged "))
        # The merged model is the adapted one with this adapter folded in.
        assert adapted == merged
        assert (tmp_path / f"l_{name}.lora.npz").exists()
        assert (tmp_path / f"l_{name}_merged.keras").exists()


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_train_folder(monkeypatch, tmp_path, capsys):
    import keras
    import numpy as np
    from PIL import Image

    from hlkeras import data
    from hlkeras import predict

    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("light", 210)):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 20, size=(10, 10, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    argv = ["train_folder.py", "photos", "--image-size", "8", "8", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", "m.keras"])
    runpy.run_path(os.path.join(ROOT, "apps", "train_folder.py"), run_name="__main__")
    out = capsys.readouterr().out
    # The printed accuracy is the saved model's on the test split.
    model = keras.saving.load_model(tmp_path / "m.keras")
    _, _, test_ds, info = data.load_path(tmp_path / "photos", image_size=(8, 8))
    _, accuracy = model.evaluate(test_ds, verbose=0)
    assert f"test accuracy: {accuracy:.4f}" in out
    # `hlkeras predict` finds the class names saved beside the model.
    predictor = predict.load_predictor(tmp_path / "m.keras")
    assert predictor.class_names == ["dark", "light"] == list(info.class_names)
    assert predictor.input_shape == (8, 8, 3)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_text_classifier(monkeypatch, tmp_path, capsys):
    import keras
    from texts_testing import write_keyword_csv

    from hlkeras import data
    from hlkeras import predict

    write_keyword_csv(tmp_path / "tickets.csv", 300)
    monkeypatch.chdir(tmp_path)
    argv = ["text_classifier.py", "tickets.csv", "--epochs", "1", "--out", "t.keras"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "apps", "text_classifier.py"), run_name="__main__")
    out = capsys.readouterr().out
    # The printed accuracy is the saved model's on the test split.
    model = keras.saving.load_model(tmp_path / "t.keras")
    _, _, test_ds, info = data.load_path(tmp_path / "tickets.csv", text_column="text")
    _, accuracy = model.evaluate(test_ds, verbose=0)
    assert f"test accuracy: {accuracy:.4f}" in out
    # `hlkeras predict` finds the vocabulary and the class names beside the model.
    predictor = predict.load_predictor(tmp_path / "t.keras")
    assert predictor.class_names == ["billing", "sales", "tech"]
    assert predictor.tokenizer.vocabulary == info.vocabulary


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_distill_for_phone(monkeypatch, tmp_path, data_dir, capsys):
    from hlkeras import export
    from hlkeras import models

    _run_app("distill_for_phone.py", monkeypatch, tmp_path, data_dir, "--student-epochs", "1")
    out = capsys.readouterr().out
    report = export.ExportReport.from_dict(
        json.loads((tmp_path / "distilled_phone" / "student" / "export.json").read_text())
    )
    tflite = report.artifact("tflite")
    assert tflite.quantization == "int8" and report.refused is None
    assert tflite.size_bytes == os.path.getsize(tflite.path)
    assert f"int8 student: {tflite.size_bytes / 1024:.1f} KB" in out
    student_params = models.resnet((8, 8, 1), 10, width=8, depth=1).count_params()
    teacher_params = models.resnet((8, 8, 1), 10).count_params()
    assert "teacher: test accuracy" in out and f"{teacher_params:,} params" in out
    assert f"distilled: test accuracy {report.keras_accuracy:.4f}, {student_params:,}" in out


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_prune_for_phone(monkeypatch, tmp_path, data_dir, capsys):
    from hlkeras import export

    flags = ("--out", "p", "--fine-tune-epochs", "2", "--sparsity", "0.7")
    _run_app("prune_for_phone.py", monkeypatch, tmp_path, data_dir, *flags)
    out = capsys.readouterr().out
    assert "sparsity 0.700 (dense 0.000)" in out
    reports = {
        name: export.ExportReport.from_dict(
            json.loads((tmp_path / "p" / name / "export.json").read_text())
        )
        for name in ("dense", "pruned")
    }
    dense, pruned = (reports[name].artifact("tflite") for name in ("dense", "pruned"))
    assert pruned.sparse_tensors > 0 == dense.sparse_tensors
    assert pruned.size_bytes < 0.6 * dense.size_bytes
    assert f"pruned: {pruned.size_bytes / 1024:.1f} KB" in out


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_diagnose_broken_model(monkeypatch, tmp_path, data_dir, capsys):
    """Both broken models are flagged after one epoch: the sigmoid MLP's
    first layer for vanishing gradients, the biased ReLU layer as dead (6 s)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the monitor's lines, printed by the app too
        _run_app("diagnose_broken_model.py", monkeypatch, tmp_path, data_dir, "--out", "d")
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("  gradient norm of dense_0 is ") and "vanishing gradients" in line
        for line in lines
    )
    assert (
        "  dense_1: 100% dead units (relu) since epoch 1: try gelu/leaky_relu or a lower --lr"
        in lines
    )
    # The layer before the dead one gets no gradient because of it: one line, the dead one's.
    assert "dead_relu: 1 warnings" in lines
    assert (tmp_path / "d" / "sigmoid.png").exists() and (tmp_path / "d" / "dead_relu.png").exists()
