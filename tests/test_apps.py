"""Each script in apps/ runs end to end with --epochs 1 (one backend: the
scripts only call library code that the other tests cover per backend)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_app(name, tmp_path, *flags):
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": ROOT,
        "TFDS_DATA_DIR": str(tmp_path / "tfds"),
    }
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "apps", name), "--epochs", "1", *flags],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
    )


@pytest.mark.backends("tensorflow")
@pytest.mark.slow
def test_train_digits(tmp_path):
    result = _run_app("train_digits.py", tmp_path, "--out", "m.keras")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy:" in result.stdout
    assert (tmp_path / "m.keras").exists()


@pytest.mark.backends("tensorflow")
@pytest.mark.slow
def test_export_mobile(tmp_path):
    result = _run_app("export_mobile.py", tmp_path, "--out", "d.tflite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "litert" in result.stdout
    assert (tmp_path / "d.tflite").read_bytes()[4:8] == b"TFL3"
