import os
import subprocess
import sys

import keras
import pytest

from hlkeras import cli


def test_info_prints_versions_and_active_backend(capsys):
    assert cli.main(["info"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["keras"] == keras.__version__
    assert rows["backend"] == keras.backend.backend()
    assert rows["hlkeras"] == __import__("hlkeras").__version__


def test_unknown_command_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fly"])
    assert exit_info.value.code != 0
    assert "invalid choice: 'fly'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_help_runs_as_a_module_without_traceback():
    # Backend-independent: argparse only, once is enough.
    result = subprocess.run(
        [sys.executable, "-m", "hlkeras.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "info" in result.stdout and "Traceback" not in result.stderr


TENSORFLOW_FREE_IMPORTS = (
    "hlkeras",
    "hlkeras.data",
    "hlkeras.training",
    "hlkeras.export",
    "hlkeras.search",
    "hlkeras.cli",
    "hlkeras.lora",
    "hlkeras.predict",
    "hlkeras.prune",
    "hlkeras.distill",
    "hlkeras.data.settings",
    "hlkeras.data.tables",
)


@pytest.mark.neutral
def test_packages_import_without_tensorflow():
    # On the JAX backend Keras itself needs no TensorFlow, so any TF import
    # is hlkeras' own: `hlkeras --help` and the settings tables stay fast.
    script = (
        "import sys\n"
        f"for name in {TENSORFLOW_FREE_IMPORTS!r}:\n"
        "    __import__(name)\n"
        "    assert 'tensorflow' not in sys.modules, name\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_launcher_forwards_stderr_lines_except_native_tensorflow_logs(capfd):
    import hlkeras_launcher

    native_logs = hlkeras_launcher.NativeLogFilter()
    native_logs.start()
    os.write(2, b"I0000 00:00:1795624767.275643   19420 port.cc:153] oneDNN custom operations\n")
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called\n")
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32\n")
    os.write(2, b"hlkeras train: error: --epochs must be a positive integer, got -1\n")
    # One write of the whole line: print() writes the text and the newline
    # separately, and the filter thread's line could land between them.
    sys.stderr.write("a Python warning\n")
    native_logs.stop()
    err = capfd.readouterr().err
    # (capfd takes sys.stderr's writes on a path of its own, so only the set
    # of lines, not their order, is the filter's.)
    assert sorted(err.splitlines()) == [
        "a Python warning",
        "hlkeras train: error: --epochs must be a positive integer, got -1",
    ]


@pytest.mark.slow
def test_the_console_script_prints_one_error_line_and_no_native_logs():
    launch = "import sys, hlkeras_launcher; sys.exit(hlkeras_launcher.main())"
    result = subprocess.run(
        [sys.executable, "-c", launch, "train", "--epochs", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )
    assert result.returncode == 2
    assert result.stderr == "hlkeras train: error: --epochs must be a positive integer, got -1\n"
