"""The `hlkeras` command line: `hlkeras train | tune | export | predict |
benchmark | info`, one module per command.

Each command module adds its parser, parses its flags, calls library
functions and turns user errors into one line (`common.UsageError`): printed
to stderr with exit status 2, without a traceback. `main` is the entry point
(`python -m hlkeras.cli`, and the `hlkeras` console script through
`hlkeras_launcher`).
"""

import os

# TensorFlow's C++ start-up logging drowns the CLI's own output (the
# `hlkeras` console script, `hlkeras_launcher`, also filters the lines TF
# prints before this applies).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hlkeras.cli.main import build_parser  # noqa: E402
from hlkeras.cli.main import main  # noqa: E402

__all__ = ["build_parser", "main"]
