"""`hlkeras train`: a run directory trained, evaluated, exported and
verified (`hlkeras.training.runs.train_run`)."""

import argparse
import sys

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError
from hlkeras.cli.common import add_data_flags
from hlkeras.cli.common import given_settings
from hlkeras.training import runs
from hlkeras.training.runs import MOE_EXPERTS_DEFAULT
from hlkeras.training.runs import TRAIN_DEFAULTS


def add_parser(commands):
    train = commands.add_parser(
        "train",
        parents=[COMMON_FLAGS],
        help="train a model on a dataset, evaluate it, export and verify a .tflite",
        description=(
            "Train a model built from hlkeras layers, evaluate it on the test "
            "split, and export model.tflite checked in the LiteRT interpreter. "
            "Writes model.keras, spec.json, history.csv, curves.png, "
            "metrics.json and model.tflite into the run directory."
        ),
    )
    flag = train.add_argument
    add_model_flags(flag)
    flag("--dataset", help="'digits' (embedded, default) or a TFDS dataset in --data-dir")
    flag("--data-dir", help="TFDS data directory (default: TFDS' own)")
    add_data_flags(flag)
    add_recipe_flags(flag)
    flag("--seed", type=int, help="random seed (default 0)")
    flag("--out", help="run directory (default runs/<timestamp>/)")
    flag("--resume", action="store_true", help="continue the killed run in --out")
    flag("--overwrite", action="store_true", help="replace the run files in an existing --out")
    flag("--tensorboard", action="store_true", help="also log to <out>/logs for TensorBoard")
    flag(
        "--diagnose",
        nargs="?",
        const=True,
        default=False,
        type=int,
        metavar="EVERY",
        help="look inside the hidden layers every EVERY epochs (default: about 10 "
        "times a run): diagnostics.json, hidden_layers.png and warnings (dead or "
        "saturated units, vanishing or exploding gradients, a collapsed MoE router)",
    )
    flag(
        "--mixed-precision",
        action="store_true",
        default=None,
        help="compute in bfloat16 with float32 weights (mixed_bfloat16)",
    )
    flag(
        "--distribute",
        help="train on every visible device (JAX): data (DataParallel) or model "
        "(ModelParallel: MoE experts, attention heads and FFN units sharded)",
    )
    flag("--mesh", help="--distribute model's device mesh BATCHxMODEL (default: model axis 2)")
    train.set_defaults(func=run)


def add_model_flags(flag):
    """The flags of the model a run builds (`hlkeras train`, `hlkeras distill`'s student)."""
    flag(
        "--arch",
        help=(
            "model architecture: mlp, resnet, vit, text "
            "(default resnet for images, mlp for a table, text for texts)"
        ),
    )
    flag("--depth", type=int, help="number of blocks (default: the arch's)")
    flag("--width", type=int, help="block width (default: the arch's)")
    flag("--dropout", type=float, help="dropout rate (default: the arch's)")
    flag("--encoder", help="--arch text's encoder: transformer (default), gru or lstm")
    flag(
        "--experts",
        type=int,
        help=(
            f"MoE experts per FFN, 0 for dense (vit: default {MOE_EXPERTS_DEFAULT}; "
            "text transformer: default 0)"
        ),
    )
    flag(
        "--capacity-factor",
        type=float,
        help="MoE expert capacity per example (default: dropless, no token dropped)",
    )


def add_recipe_flags(flag):
    """The flags of the training recipe (`hlkeras train`, `hlkeras distill`)."""
    flag(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random one-pixel shifts of training images (default on; never in the model)",
    )
    flag("--epochs", type=int, help=f"epochs (default {TRAIN_DEFAULTS['epochs']})")
    flag("--batch-size", type=int, help=f"batch size (default {TRAIN_DEFAULTS['batch_size']})")
    flag("--lr", type=float, help=f"peak learning rate (default {TRAIN_DEFAULTS['lr']})")
    flag("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    flag("--clipnorm", type=float, help="clip each gradient to this norm (default off)")
    flag("--patience", type=int, help="early-stopping patience in epochs (default 15)")


def _join_hosts(args):
    """This process' index in the run: a `--distribute` run joins the other
    hosts its environment names (`hlkeras.training.distribute.ENVIRONMENT`) first."""
    if not args.distribute:
        return 0
    from hlkeras.training import distribute

    distribute.initialize_from_environment()
    return distribute.process_index()


def run(args):
    if not isinstance(args.diagnose, bool) and args.diagnose < 1:
        raise UsageError(
            f"--diagnose EVERY must be a positive number of epochs. Received: {args.diagnose}"
        )
    if args.diagnose and args.distribute:
        raise UsageError(
            "--diagnose does not run with --distribute in this version (its probe is "
            "an eager pass on one device); train without --distribute to diagnose"
        )
    try:
        run_dir, resuming = runs.open_run_dir(
            args.out, resume=args.resume, overwrite=args.overwrite, process=_join_hosts(args)
        )
        settings = runs.settings_for(run_dir, resuming, given_settings(args, TRAIN_DEFAULTS))
        outcome = runs.train_run(
            settings,
            run_dir,
            resuming=resuming,
            tensorboard=args.tensorboard,
            diagnose=args.diagnose,
        )
    except runs.RunError as error:
        raise UsageError(str(error)) from None
    if outcome.process:
        print(f"hlkeras train: process {outcome.process} done; process 0 wrote the run")
        return 0
    if outcome.nan_message:
        print(f"hlkeras train: error: {outcome.nan_message}", file=sys.stderr)
        return 1
    metrics = outcome.metrics
    if "tflite_accuracy" in metrics:
        print(
            f"test accuracy: keras {metrics['test_accuracy']:.4f}, "
            f"litert {metrics['tflite_accuracy']:.4f} at batch 1 "
            f"(top-1 agreement with keras {metrics['tflite_top1_agreement']:.2%})"
        )
    else:
        print(f"test accuracy: keras {metrics['test_accuracy']:.4f}")
    print("\n".join(run_dir.summary()))
    if outcome.refused:
        message = f"model.tflite was not written: {outcome.refused}"
        print(f"hlkeras train: error: {message}", file=sys.stderr)
        return 1
    return 0
