"""The `hlkeras` parser, one subcommand per module, and `main`."""

import sys

from hlkeras.cli import benchmark
from hlkeras.cli import export
from hlkeras.cli import info
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
    for command in (info, train, tune, export, predict, prune, benchmark):
        command.add_parser(commands)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as error:
        print(f"hlkeras {args.command}: error: {error}", file=sys.stderr)
        return 2
