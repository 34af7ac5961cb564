"""The `hlkeras` command line: `hlkeras train | tune | export | info`.

It parses arguments and calls the library modules. User mistakes print one
line to stderr and exit with status 2, without a traceback.
"""

import argparse
import importlib
import os
import platform
import sys
import zipfile

# TensorFlow's C++ start-up logging drowns the CLI's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hlkeras import runs  # noqa: E402
from hlkeras.runs import MOE_EXPERTS_DEFAULT  # noqa: E402
from hlkeras.runs import TRAIN_DEFAULTS  # noqa: E402


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


# ---------------------------------------------------------------- export


def add_export_parser(commands):
    export = commands.add_parser(
        "export",
        help="export a .keras model to SavedModel and builtins-only TFLite, verified in LiteRT",
        description="Export MODEL.keras to a SavedModel and a builtins-only "
        ".tflite, check both against the Keras model, print a table and write "
        "DIR/export.json.",
    )
    export.add_argument("model", metavar="MODEL.keras")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--quantize", default="none", help="none | float16 | dynamic | int8")
    export.add_argument(
        "--format",
        default="saved_model,tflite",
        help="comma-separated artifacts: saved_model, tflite",
    )
    export.add_argument(
        "--dataset",
        metavar="NAME",
        help="the model's dataset (e.g. digits): int8 calibrates on 200 of its "
        "training images; its test split measures parity and accuracy",
    )
    export.add_argument(
        "--representative",
        metavar="FILE.npy",
        help="int8 calibration inputs, float32 (N, ...); overrides --dataset",
    )
    export.add_argument(
        "--verify",
        metavar="FILE.npz",
        help="verification data: array `x` and optional labels `y`; overrides --dataset",
    )
    export.add_argument("--int8-io", action="store_true", help="int8 input/output tensors for int8")
    export.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    export.add_argument(
        "--latency-runs",
        type=int,
        default=50,
        metavar="N",
        help="timed batch-1 runs per latency median (0 skips timing)",
    )
    export.add_argument(
        "--max-accuracy-drop",
        default="1.0",
        metavar="POINTS",
        help="refuse to publish when an artifact loses more accuracy points "
        "than this against Keras, measured per sample at batch 1 (without "
        "labels: when top-1 agreement is below 100 - POINTS percent; "
        "default 1.0)",
    )
    export.set_defaults(func=cmd_export)


def _check_cli_choice(flag, value, allowed):
    if value not in allowed:
        raise UsageError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _max_accuracy_drop(text):
    try:
        points = float(text)
    except ValueError:
        points = float("nan")
    if not points >= 0:  # also refuses nan and "-inf"
        raise UsageError(
            f"--max-accuracy-drop must be a number of accuracy points >= 0; got {text!r}"
        )
    return points


def _load_npy(flag, path):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {path}: cannot read a NumPy .npy file ({error})")


def _load_verify_npz(path):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays:
                raise UsageError(
                    f"--verify {path}: needs an array named 'x' (and optionally "
                    f"'y'); found {sorted(arrays.files)}"
                )
            return (arrays["x"], arrays["y"]) if "y" in arrays else arrays["x"]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UsageError(f"--verify {path}: cannot read a NumPy .npz file ({error})")


def dataset_representative_samples(name):
    """About 200 training images of dataset `name`, for int8 calibration."""
    from hlkeras import data

    return data.representative_samples(name, count=200, data_dir=None)


def dataset_test_arrays(name):
    """`(images, labels)` of dataset `name`'s test split, as NumPy arrays."""
    from hlkeras import data

    _, _, test_ds, _ = data.load(name)
    return data.to_numpy(test_ds)


def _from_dataset(fetch, name, what):
    from hlkeras import data

    try:
        return fetch(name)
    except data.DatasetError as error:
        raise UsageError(
            f"--dataset {name}: cannot load its {what} ({error}); "
            "pass --representative FILE.npy / --verify FILE.npz instead"
        ) from None


def _format_size(size_bytes):
    for unit in ("B", "KiB", "MiB"):
        if size_bytes < 1024 or unit == "MiB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024


def _format_optional(value, pattern):
    return "-" if value is None else format(value, pattern)


def print_export_table(report):
    rows = [("artifact", "size", "max diff", "agreement", "accuracy", "latency")]
    for artifact in report.artifacts:
        rows.append(
            (
                os.path.relpath(artifact.path, report.out_dir),
                _format_size(artifact.size_bytes),
                _format_optional(artifact.max_abs_diff, ".2e"),
                _format_optional(artifact.top1_agreement, ".2%"),
                _format_optional(artifact.accuracy, ".2%"),
                _format_optional(artifact.latency_ms, ".3f") + " ms"
                if artifact.latency_ms is not None
                else "-",
            )
        )
    rows.append(
        (
            f"keras ({report.backend})",
            "-",
            "-",
            "-",
            _format_optional(report.keras_accuracy, ".2%"),
            _format_optional(report.keras_latency_ms, ".3f") + " ms"
            if report.keras_latency_ms is not None
            else "-",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def cmd_export(args):
    from hlkeras import export

    quantization = _check_cli_choice("--quantize", args.quantize, export.QUANTIZATIONS)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    for format in formats or [""]:
        _check_cli_choice("--format", format, export.FORMATS)
    if args.latency_runs < 0:
        raise UsageError(f"--latency-runs must be >= 0; got {args.latency_runs}")
    max_accuracy_drop = _max_accuracy_drop(args.max_accuracy_drop)

    representative = None
    if args.representative:
        representative = _load_npy("--representative", args.representative)
    elif quantization == "int8" and "tflite" in formats:
        if not args.dataset:
            raise UsageError(
                "--quantize int8 needs calibration data: pass --dataset NAME "
                "(e.g. digits) or --representative FILE.npy"
            )
        representative = _from_dataset(
            dataset_representative_samples, args.dataset, "representative samples"
        )
    verify = None
    if args.verify:
        verify = _load_verify_npz(args.verify)
    elif args.dataset:
        verify = _from_dataset(dataset_test_arrays, args.dataset, "test split")

    try:
        report = export.export_model(
            args.model,
            args.out,
            formats=formats,
            quantization=quantization,
            representative_data=representative,
            verify_data=verify,
            int8_io=args.int8_io,
            overwrite=args.overwrite,
            latency_runs=args.latency_runs,
            max_accuracy_drop=max_accuracy_drop,
        )
    except export.ExportRefused as refusal:
        print_export_table(refusal.report)
        raise UsageError(str(refusal))
    except export.ExportError as error:
        raise UsageError(str(error))
    print_export_table(report)
    print(f"wrote {os.path.join(report.out_dir, export.REPORT_FILENAME)}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hlkeras",
        description="Modern hidden layers for Keras 3: train, tune and export.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    info = commands.add_parser("info", help="print library versions and the active Keras backend")
    info.set_defaults(func=cmd_info)
    _add_train_command(commands)
    _add_tune_command(commands)
    add_export_parser(commands)
    return parser


# --- hlkeras train ------------------------------------------------------------


def _add_train_command(commands):
    train = commands.add_parser(
        "train",
        help="train a model on a dataset, evaluate it, export and verify a .tflite",
        description=(
            "Train a model built from hlkeras layers, evaluate it on the test "
            "split, and export model.tflite checked in the LiteRT interpreter. "
            "Writes model.keras, spec.json, history.csv, curves.png, "
            "metrics.json and model.tflite into the run directory."
        ),
    )
    flag = train.add_argument
    flag("--arch", help=f"model architecture (default {TRAIN_DEFAULTS['arch']})")
    flag("--dataset", help="'digits' (embedded, default) or a TFDS dataset in --data-dir")
    flag("--data-dir", help="TFDS data directory (default: TFDS' own)")
    flag("--epochs", type=int, help=f"epochs (default {TRAIN_DEFAULTS['epochs']})")
    flag("--batch-size", type=int, help=f"batch size (default {TRAIN_DEFAULTS['batch_size']})")
    flag("--lr", type=float, help=f"peak learning rate (default {TRAIN_DEFAULTS['lr']})")
    flag("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    flag("--clipnorm", type=float, help="clip each gradient to this norm (default off)")
    flag("--depth", type=int, help="number of blocks (default: the arch's)")
    flag("--width", type=int, help="block width (default: the arch's)")
    flag("--dropout", type=float, help="dropout rate (default: the arch's)")
    flag(
        "--experts",
        type=int,
        help=f"MoE experts per FFN, 0 for dense (vit only; default {MOE_EXPERTS_DEFAULT})",
    )
    flag("--seed", type=int, help="random seed (default 0)")
    flag("--patience", type=int, help="early-stopping patience in epochs (default 10)")
    flag("--out", help="run directory (default runs/<timestamp>/)")
    flag("--resume", action="store_true", help="continue the killed run in --out")
    flag("--overwrite", action="store_true", help="replace the run files in an existing --out")
    flag("--tensorboard", action="store_true", help="also log to <out>/logs for TensorBoard")
    flag(
        "--mixed-precision",
        action="store_true",
        default=None,
        help="compute in bfloat16 with float32 weights (mixed_bfloat16)",
    )
    train.set_defaults(func=cmd_train)


def _given_settings(args):
    return {key: getattr(args, key) for key in TRAIN_DEFAULTS if getattr(args, key) is not None}


def cmd_train(args):
    import json

    try:
        run_dir, resuming = runs.RunDir.open(args.out, resume=args.resume, overwrite=args.overwrite)
        settings = runs.settings_for(run_dir, resuming, _given_settings(args))
        outcome = runs.train_run(settings, run_dir, resuming=resuming, tensorboard=args.tensorboard)
    except runs.RunError as error:
        raise UsageError(str(error)) from None
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
    print(f"wrote {run_dir.path}: {' '.join(run_dir.written_files())}")
    print(json.dumps(metrics, sort_keys=True))
    if outcome.refused:
        message = f"model.tflite was not written: {outcome.refused}"
        print(f"hlkeras train: error: {message}", file=sys.stderr)
        return 1
    return 0


# --- hlkeras tune -----------------------------------------------------------------

TUNE_OBJECTIVES = ("val_accuracy", "val_loss", "accuracy", "loss")


def _add_tune_command(commands):
    tune = commands.add_parser(
        "tune",
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
        "--arch", help="architecture: mlp, resnet or vit (default: the space file's arch, else mlp)"
    )
    flag(
        "--dataset",
        default="digits",
        help="'digits' (embedded, default) or a TFDS dataset in --data-dir",
    )
    flag("--data-dir", help="TFDS data directory (default: TFDS' own)")
    flag("--tuner", default="hyperband", help="random, bayesian or hyperband (default hyperband)")
    flag(
        "--max-trials",
        type=int,
        default=10,
        help="number of trials (a cap for hyperband; default 10)",
    )
    flag(
        "--max-epochs",
        type=int,
        default=20,
        help="epochs of a full trial and of the retraining (default 20)",
    )
    flag("--space", help="TOML or JSON file that narrows or fixes the default space")
    flag("--dir", help="search directory (default runs/tune-<arch>-<dataset>)")
    flag(
        "--objective",
        default="val_accuracy",
        help=f"one of {', '.join(TUNE_OBJECTIVES)} (default val_accuracy)",
    )
    flag("--seed", type=int, default=0, help="random seed (default 0)")
    flag(
        "--patience",
        type=int,
        default=3,
        help="early-stopping patience per trial in epochs (default 3)",
    )
    flag(
        "--workers",
        type=int,
        default=0,
        help="run a chief and N worker processes on this machine (default 0: one process)",
    )
    tune.set_defaults(func=cmd_tune)


def _check_tune_args(args):
    from hlkeras import hypermodels

    if args.tuner not in hypermodels.TUNERS:
        raise UsageError(
            f"--tuner must be one of {', '.join(hypermodels.TUNERS)}, got {args.tuner!r}"
        )
    for name in ("max_trials", "max_epochs", "patience"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.objective not in TUNE_OBJECTIVES:
        raise UsageError(
            f"--objective must be one of {', '.join(TUNE_OBJECTIVES)}, got {args.objective!r}"
        )


def _tune_space(args):
    """`(arch, overrides)` from --arch and --space."""
    from hlkeras import hypermodels

    try:
        overrides = hypermodels.load_space(args.space)
        arch = args.arch or hypermodels.space_arch(overrides)
        if args.arch and overrides.get("arch", arch) != arch:
            raise UsageError(
                f"--arch {arch} contradicts arch = {overrides['arch']!r} in {args.space}"
            )
        if arch not in hypermodels.SEARCH_SPACES:
            raise UsageError(
                f"--arch must be one of {sorted(hypermodels.SEARCH_SPACES)}, got {arch!r}"
            )
        hypermodels.resolve_space(arch, overrides)
    except ValueError as error:
        raise UsageError(f"{args.space or '--arch'}: {error}") from None
    return arch, overrides


def _tune_argv(args):
    """The command line of one process of a `--workers` search."""
    argv = ["tune"]
    for name in (
        "arch",
        "dataset",
        "data_dir",
        "tuner",
        "max_trials",
        "max_epochs",
        "space",
        "dir",
        "objective",
        "seed",
        "patience",
    ):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_chief_and_workers(args, directory):
    """Starts a chief and `args.workers` workers on 127.0.0.1 (KerasTuner's
    gRPC mode) and waits for them; kills every process group it started on
    the way out, whatever happens."""
    import signal
    import subprocess
    import time

    from hlkeras import data

    # Prepares the dataset once, so the processes do not race to write it
    # (and a bad --dataset fails here, before any process starts).
    try:
        data.load(args.dataset, data_dir=args.data_dir)
    except data.DatasetError as error:
        raise UsageError(str(error)) from None
    command = [sys.executable, "-m", "hlkeras.cli"] + _tune_argv(args)
    log_dir = os.path.join(directory, "logs")
    os.makedirs(log_dir, exist_ok=True)
    base_env = {
        **os.environ,
        "KERASTUNER_ORACLE_IP": "127.0.0.1",
        "KERASTUNER_ORACLE_PORT": str(_free_port()),
    }
    print(
        f"hlkeras tune: chief + {args.workers} workers on "
        f"127.0.0.1:{base_env['KERASTUNER_ORACLE_PORT']}; worker logs in {log_dir}",
        flush=True,
    )
    processes = []
    try:
        chief = subprocess.Popen(
            command, env={**base_env, "KERASTUNER_TUNER_ID": "chief"}, start_new_session=True
        )
        processes.append(chief)
        workers = []
        for i in range(args.workers):
            with open(os.path.join(log_dir, f"worker{i}.log"), "wb") as log:
                workers.append(
                    subprocess.Popen(
                        command,
                        env={**base_env, "KERASTUNER_TUNER_ID": f"worker{i}"},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            processes.append(workers[-1])
        while chief.poll() is None:
            crashed = [i for i, w in enumerate(workers) if w.poll() not in (None, 0)]
            if crashed:
                # The chief would wait forever for the crashed worker's trial.
                raise UsageError(
                    f"worker{crashed[0]} exited with status {workers[crashed[0]].returncode}; "
                    f"see {os.path.join(log_dir, f'worker{crashed[0]}.log')}"
                )
            time.sleep(0.5)
        if chief.returncode != 0:
            return chief.returncode
        for i, worker in enumerate(workers):
            if worker.wait(timeout=60) != 0:
                raise UsageError(f"worker{i} failed; see {os.path.join(log_dir, f'worker{i}.log')}")
        return 0
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def cmd_tune(args):
    import json

    _check_tune_args(args)
    arch, overrides = _tune_space(args)
    directory = args.dir or os.path.join("runs", f"tune-{arch}-{args.dataset}")
    if args.workers:
        return _run_chief_and_workers(args, directory)

    import keras
    from keras_tuner.src.distribute import utils as kt_distribute

    from hlkeras import data
    from hlkeras import hypermodels
    from hlkeras import training

    keras.utils.set_random_seed(args.seed)
    try:
        train_ds, val_ds, _, info = data.load(args.dataset, data_dir=args.data_dir, seed=args.seed)
    except data.DatasetError as error:
        raise UsageError(str(error)) from None
    if val_ds is None and args.objective.startswith("val_"):
        raise UsageError(f"--objective {args.objective} needs a validation split")
    x_train, y_train = data.to_numpy(train_ds)
    x_val, y_val = data.to_numpy(val_ds)
    hypermodel = hypermodels.SpecHyperModel(
        arch,
        info.input_shape,
        info.num_classes,
        overrides,
        num_train=len(x_train),
        epochs=args.max_epochs,
    )
    is_worker = kt_distribute.has_chief_oracle() and not kt_distribute.is_chief_oracle()
    if not is_worker:
        config = hypermodels.search_config(
            arch=arch,
            dataset=args.dataset,
            tuner=args.tuner,
            objective=args.objective,
            max_epochs=args.max_epochs,
            space=hypermodel.space,
        )
        try:
            resuming = hypermodels.check_search_dir(directory, config)
        except ValueError as error:
            raise UsageError(str(error)) from None
        print(
            f"hlkeras tune: {args.tuner} search over {arch} on {info.name} "
            f"({keras.backend.backend()} backend) in {directory}"
            + (" (resuming)" if resuming else ""),
            flush=True,
        )
    tuner = hypermodels.make_tuner(
        args.tuner,
        hypermodel,
        directory=directory,
        objective=args.objective,
        max_trials=args.max_trials,
        max_epochs=args.max_epochs,
        seed=args.seed,
    )
    hypermodels.search(
        tuner,
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=args.max_epochs,
        patience=args.patience,
    )
    if is_worker:
        return 0
    rows, best = hypermodels.write_reports(tuner, hypermodel, directory)
    print(
        "\n".join(
            hypermodels.leaderboard(
                rows, hypermodel.space, args.objective, tuner.oracle.objective.direction
            )
        )
    )
    if best is None:
        print(
            f"hlkeras tune: error: no trial completed; see {directory}/trials.csv", file=sys.stderr
        )
        return 1
    print(f"best spec: {json.dumps(hypermodel.spec(best), sort_keys=True)}", flush=True)
    train_ds, val_ds, _, _ = data.load(
        args.dataset, batch_size=best["batch_size"], data_dir=args.data_dir, seed=args.seed
    )
    result = hypermodels.retrain_best(
        hypermodel,
        best,
        train_ds,
        val_ds,
        directory,
        epochs=args.max_epochs,
        patience=max(args.patience, 5),
    )
    if result.nan_epoch is not None:
        print(
            f"hlkeras tune: error: retraining the best: {training.nan_message(result)}",
            file=sys.stderr,
        )
        return 1
    if result.best_path is None:
        print("hlkeras tune: error: the retraining saved no checkpoint", file=sys.stderr)
        return 1
    print(
        f"retrained best: {os.path.join(directory, hypermodels.BEST_MODEL)} "
        f"(val_accuracy {max(r.get('val_accuracy', 0.0) for r in result.rows):.4f}); "
        f"also trials.csv, trials.png, best_spec.json in {directory}"
    )
    return 0


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
