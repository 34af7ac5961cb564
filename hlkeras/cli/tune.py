"""`hlkeras tune`: a resumable KerasTuner search, optionally under a device
budget, with chief and worker processes (`hlkeras.search.run_search`)."""

import sys

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError
from hlkeras.cli.common import add_data_flags
from hlkeras.cli.common import given_settings


def add_parser(commands):
    from hlkeras.search import OBJECTIVES
    from hlkeras.search import SEARCH_DEFAULTS as DEFAULTS

    tune = commands.add_parser(
        "tune",
        parents=[COMMON_FLAGS],
        help="search depth, width, dropout, learning rate, ... with KerasTuner",
        description=(
            "Hyperparameter search over an hlkeras architecture with KerasTuner. "
            "Writes trials.csv, trials.png, best_spec.json and the retrained "
            "best.keras into --dir. Run it again with the same --dir to continue "
            "an interrupted search. --workers N runs a chief and N workers on "
            "this machine; on several machines start the same command on each "
            "with KERASTUNER_TUNER_ID (chief / worker0, worker1, ...), "
            "KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set, and a --dir "
            "on a shared filesystem."
        ),
    )
    flag = tune.add_argument
    flag(
        "--arch",
        help=(
            "architecture: mlp, resnet, vit or text, or several joined by commas to "
            "search the family too (default: the space file's arch, else text for "
            "--text-column, else mlp)"
        ),
    )
    flag(
        "--dataset",
        help="'digits' (embedded, default) or a TFDS dataset in --data-dir",
    )
    flag("--data-dir", help="TFDS data directory (default: TFDS' own)")
    add_data_flags(flag)
    flag(
        "--tuner",
        default=DEFAULTS["tuner"],
        help="random, bayesian or hyperband (default hyperband)",
    )
    flag(
        "--max-trials",
        type=int,
        default=DEFAULTS["max_trials"],
        help="number of trials (a cap for hyperband; default 10)",
    )
    flag(
        "--max-epochs",
        type=int,
        default=DEFAULTS["max_epochs"],
        help="epochs of a full trial and of the retraining (default 20)",
    )
    flag(
        "--teacher",
        metavar="RUN|MODEL",
        help="distil every trial's model from this finished hlkeras train run or .keras file",
    )
    flag("--temperature", type=float, help="--teacher's softening T > 0 (default 4)")
    flag("--alpha", type=float, help="--teacher: weight in [0, 1] of the labels' loss (0.5)")
    flag("--space", help="TOML or JSON file that narrows or fixes the default space")
    flag("--dir", dest="directory", help="search directory (default runs/tune-<arch>-<dataset>)")
    flag(
        "--objective",
        default=DEFAULTS["objective"],
        help=f"one of {', '.join(OBJECTIVES)} (default val_accuracy)",
    )
    flag("--seed", type=int, default=DEFAULTS["seed"], help="random seed (default 0)")
    flag(
        "--patience",
        type=int,
        default=DEFAULTS["patience"],
        help="early-stopping patience per trial in epochs (default 3)",
    )
    flag(
        "--workers",
        type=int,
        default=DEFAULTS["workers"],
        help="run a chief and N worker processes on this machine (default 0: one process)",
    )
    budget = tune.add_argument_group(
        "device budget",
        "export every trial to .tflite (verified per sample), measure its size and "
        "batch-1 LiteRT latency, and pick the most accurate trial that fits; also "
        "writes pareto.png and best.tflite",
    )
    budget.add_argument("--max-tflite-kb", type=float, help="largest .tflite size in KiB")
    budget.add_argument(
        "--max-latency-ms", type=float, help="largest median batch-1 LiteRT latency in ms"
    )
    budget.add_argument(
        "--quantize",
        help="the trials' .tflite quantization: none, float16, dynamic or int8 (default none)",
    )
    tune.set_defaults(func=run)


def run(args):
    from hlkeras import search

    settings = given_settings(args, search.SEARCH_DEFAULTS)
    try:
        outcome = search.run_search(log=lambda line: print(line, flush=True), **settings)
    except search.SearchError as error:
        raise UsageError(str(error)) from None
    if outcome.error:
        print(f"hlkeras tune: error: {outcome.error}", file=sys.stderr)
        return 1
    if outcome.best_path:  # a worker process has no best model to report
        accuracy = outcome.best_val_accuracy
        score = "" if accuracy is None else f" (val_accuracy {accuracy:.4f})"
        tflite = f", {outcome.best_tflite}" if outcome.best_tflite else ""
        print(
            f"retrained best: {outcome.best_path}{tflite}{score}; "
            f"also trials.csv, trials.png, best_spec.json in {outcome.directory}"
        )
    return 0
