"""`hlkeras distill`: a smaller student trained by a frozen teacher into a
new run directory (`hlkeras.training.distill_run`)."""

import os

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError
from hlkeras.cli.common import add_data_flags
from hlkeras.cli.common import given_settings
from hlkeras.cli.common import report_run
from hlkeras.cli.train import add_model_flags
from hlkeras.cli.train import add_recipe_flags
from hlkeras.training.runs import TRAIN_DEFAULTS


def add_parser(commands):
    distill = commands.add_parser(
        "distill",
        parents=[COMMON_FLAGS],
        help="train a small student from a trained teacher, export and verify a .tflite",
        description=(
            "Knowledge distillation: a frozen teacher (a finished hlkeras train "
            "run, or a .keras file) trains a student built as hlkeras train "
            "builds one, on the teacher run's data. Writes a run directory: "
            "model.keras (the student), a verified model.tflite, metrics.json "
            "beside the teacher's numbers, history.csv and curves.png. "
            "--baseline also trains the same student from scratch."
        ),
    )
    flag = distill.add_argument
    flag(
        "--teacher",
        required=True,
        metavar="RUN|MODEL",
        help="a finished hlkeras train run directory, or a .keras model file",
    )
    add_model_flags(flag)
    flag("--dataset", help="the data (default: the teacher run's; else the embedded digits)")
    flag("--data-dir", help="TFDS data directory (default: the teacher run's, else TFDS' own)")
    add_data_flags(flag)
    add_recipe_flags(flag)
    flag("--temperature", type=float, default=4.0, help="softening T > 0 (default 4)")
    flag(
        "--alpha",
        type=float,
        default=0.5,
        help="weight in [0, 1] of the labels' cross-entropy; the rest is the teacher's (0.5)",
    )
    flag(
        "--features",
        default="none",
        help="none (logits only, default) or auto: also the features the two heads read",
    )
    flag(
        "--baseline",
        action="store_true",
        help="also train the same student from scratch with the same recipe, to compare",
    )
    flag("--out", help="the new run directory (default: runs/<timestamp>)")
    flag("--overwrite", action="store_true", help="replace an existing --out run")
    distill.set_defaults(func=run)


def run(args):
    from hlkeras.training import distill_run
    from hlkeras.training import runs

    if args.out and os.path.abspath(args.out) == os.path.abspath(args.teacher):
        raise UsageError(f"--out {args.out} is the teacher's run; give a new directory")
    try:
        run_dir, _ = runs.RunDir.open(args.out, resume=False, overwrite=args.overwrite)
        outcome = distill_run.distill_run(
            args.teacher,
            run_dir,
            given_settings(args, TRAIN_DEFAULTS),
            temperature=args.temperature,
            alpha=args.alpha,
            features=args.features,
            baseline=args.baseline,
        )
    except runs.RunError as error:
        raise UsageError(str(error)) from None
    return report_run("distill", outcome, distill_run.comparison_table, distill_run.FILE_ROLES)
