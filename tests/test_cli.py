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
