"""`hlkeras prune`: a trained run pruned and fine-tuned into a new run
directory (`hlkeras.training.prune_run`)."""

import os
import re

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError
from hlkeras.cli.common import report_run


def add_parser(commands):
    prune = commands.add_parser(
        "prune",
        parents=[COMMON_FLAGS],
        help="prune a trained run's model, fine-tune it, export and verify a .tflite",
        description=(
            "Magnitude-prune the model of a finished hlkeras train run, fine-tune "
            "it on the run's data while the sparsity rises (tfmot's polynomial "
            "schedule), and write a new run directory: model.keras, a verified "
            "model.tflite (sparse-encoded), metrics.json beside the dense model's "
            "numbers, history.csv and curves.png. With --structured, remove whole "
            "hidden units, heads, experts and channels instead: a smaller model."
        ),
    )
    flag = prune.add_argument
    flag("run", metavar="RUN", help="the --out directory of a finished hlkeras train")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--sparsity", type=float, help="fraction of the kernels' weights to zero, in [0, 1)"
    )
    target.add_argument(
        "--pattern", metavar="M:N", help="keep the M largest of every N input weights (2:4)"
    )
    target.add_argument(
        "--structured",
        type=float,
        metavar="R",
        help="remove the fraction R in [0, 1) of each block's units: a smaller model",
    )
    flag("--scope", default="layer", help="layer (default) or global: one threshold for all")
    flag("--epochs", type=int, default=10, help="fine-tuning epochs (default 10; 0: one shot)")
    flag("--lr", type=float, help="fine-tuning learning rate (default: the run's)")
    flag("--out", help="the new run directory (default: runs/<timestamp>)")
    flag("--overwrite", action="store_true", help="replace an existing --out run")
    prune.set_defaults(func=run)


def _as_flags(message):
    """A library argument error in the CLI's terms: `sparsity` is --sparsity."""
    message = re.sub(r"Argument `(\w+)`", lambda m: "--" + m[1].replace("_", "-"), message)
    head, _, received = message.partition(" Received: ")  # "Received: sparsity=1.5"
    return head + (f" (got {received.split('=', 1)[-1]})" if received else "")


def _check_flags(args):
    from hlkeras import prune

    if args.epochs < 0:
        raise UsageError(f"--epochs must be an integer >= 0; got {args.epochs}")
    if args.out and os.path.abspath(args.out) == os.path.abspath(args.run):
        raise UsageError(f"--out {args.out} is the run being pruned; give a new directory")
    try:
        if args.structured is None:
            prune.Pruning(args.sparsity, pattern=args.pattern, scope=args.scope)
        else:
            prune.check_sparsity(args.structured, "structured")
    except ValueError as error:
        raise UsageError(_as_flags(str(error))) from None


def run(args):
    from hlkeras.training import prune_run
    from hlkeras.training import runs

    _check_flags(args)
    try:
        source = runs.finished_run(args.run)
        run_dir, _ = runs.RunDir.open(args.out, resume=False, overwrite=args.overwrite)
        outcome = prune_run.prune_run(
            source.path,
            run_dir,
            sparsity=args.sparsity,
            pattern=args.pattern,
            scope=args.scope,
            structured=args.structured,
            epochs=args.epochs,
            lr=args.lr,
        )
    except runs.RunError as error:
        raise UsageError(str(error)) from None
    roles = prune_run.FILE_ROLES if args.structured is None else prune_run.STRUCTURED_FILE_ROLES
    return report_run("prune", outcome, prune_run.before_after_table, roles)
