"""The `hlkeras` command line: `hlkeras train | tune | export | info`.

It parses arguments and calls the library modules. User mistakes print one
line to stderr and exit with status 2, without a traceback.
"""

import argparse
import importlib
import os
import platform
import sys

# TensorFlow's C++ start-up logging drowns the CLI's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UsageError(Exception):
    """A user mistake the CLI reports as one line, without a traceback."""


def _version_of(module_name):
    try:
        return importlib.import_module(module_name).__version__
    except ImportError:
        return "not installed"


def cmd_info(args):
    import keras

    import hlkeras

    rows = [
        ("hlkeras", hlkeras.__version__),
        ("keras", keras.__version__),
        ("backend", keras.backend.backend()),
        ("python", platform.python_version()),
        ("tensorflow", _version_of("tensorflow")),
        ("jax", _version_of("jax")),
        ("torch", _version_of("torch")),
        ("keras_tuner", _version_of("keras_tuner")),
        ("tensorflow_datasets", _version_of("tensorflow_datasets")),
        ("ai_edge_litert", _litert_version()),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _litert_version():
    try:
        from importlib.metadata import version

        return version("ai-edge-litert")
    except Exception:
        return "not installed"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hlkeras",
        description="Modern hidden layers for Keras 3: train, tune and export.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    info = commands.add_parser(
        "info", help="print library versions and the active Keras backend"
    )
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as error:
        print(f"hlkeras {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
