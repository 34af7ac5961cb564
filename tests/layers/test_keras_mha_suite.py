"""The drop-in oracle: Keras' own `multi_head_attention_test.py` (from the
installed keras wheel) passes with `keras.layers.MultiHeadAttention` replaced
by hlkeras' class. `benchmarks/keras_mha_suite.py` runs it; Keras' own skips
(flash attention on TensorFlow) are the only ones allowed."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_keras_multi_head_attention_tests_pass_with_the_hlkeras_class():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "keras_mha_suite.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "failed" not in summary and "passed" in summary, summary
