"""The `hlkeras` parser, one subcommand per module, and `main`."""

import sys
import warnings

from hlkeras._validation import HlkerasWarning
from hlkeras.cli import benchmark
from hlkeras.cli import distill
from hlkeras.cli import export
from hlkeras.cli import info
from hlkeras.cli import inspect
from hlkeras.cli import predict
from hlkeras.cli import prune
from hlkeras.cli import train
from hlkeras.cli import tune
from hlkeras.cli.common import OneLineErrorParser
from hlkeras.cli.common import UsageError


def build_parser():
    parser = OneLineErrorParser(
        prog="hlkeras",
        description="Modern hidden layers for Keras 3: train, tune and export.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for command in (info, train, tune, export, predict, prune, distill, inspect, benchmark):
        command.add_parser(commands)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        _one_line_warnings(args.command)
        try:
            return args.func(args)
        except UsageError as error:
            print(f"hlkeras {args.command}: error: {error}", file=sys.stderr)
            return 2


def _one_line_warnings(command):
    """hlkeras' own warnings as one line each, once per command, in the CLI's
    form (`hlkeras prune: warning: ...`); other libraries' as Python shows
    them. Deduplicated here, not by Python's "once" registry, which would
    also silence them in a later command of the same process."""
    python_show, shown = warnings.showwarning, set()

    def show(message, category, *rest, **kwargs):
        if not issubclass(category, HlkerasWarning):
            python_show(message, category, *rest, **kwargs)
        elif str(message) not in shown:
            shown.add(str(message))
            print(f"hlkeras {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.simplefilter("always", HlkerasWarning)
