"""The `hlkeras` command line: `hlkeras train | tune | export | predict | benchmark | info`.

It parses arguments and calls the library modules. User mistakes print one
line to stderr and exit with status 2, without a traceback.
"""

import argparse
import functools
import importlib
import os
import platform
import sys
import zipfile

# TensorFlow's C++ start-up logging drowns the CLI's own output (the
# `hlkeras` console script, `hlkeras_launcher`, also filters the lines TF
# prints before this applies).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hlkeras import runs  # noqa: E402
from hlkeras._validation import check_flag_choice  # noqa: E402
from hlkeras.runs import MOE_EXPERTS_DEFAULT  # noqa: E402
from hlkeras.runs import TRAIN_DEFAULTS  # noqa: E402


def _common_flags():
    """Flags every command takes. `--verbose` is read by the console script
    (`hlkeras_launcher`) before this parser exists; here it is only accepted."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="also show TensorFlow's native log lines"
    )
    return common


COMMON_FLAGS = _common_flags()


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
        ("onnx", _version_of("onnx")),
        ("onnxruntime", _version_of("onnxruntime")),
        ("tf2onnx", _version_of("tf2onnx")),
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
        parents=[COMMON_FLAGS],
        help="export a .keras model to SavedModel, builtins-only TFLite and ONNX, verified",
        description="Export MODEL.keras to a SavedModel, a builtins-only .tflite "
        "and/or a .onnx file, check each against the Keras model in its own "
        "runtime (TensorFlow, LiteRT, ONNX Runtime), print a table and write "
        "DIR/export.json.",
    )
    export.add_argument("model", metavar="MODEL.keras")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--quantize", default="none", help="none | float16 | dynamic | int8")
    export.add_argument(
        "--format",
        default="saved_model,tflite",
        help="comma-separated artifacts: saved_model, tflite, onnx (onnx needs "
        "pip install 'hlkeras[onnx]')",
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
    export.add_argument(
        "--data",
        metavar="PATH",
        help="the model's own data (hlkeras train --data): calibrates on 200 of its "
        "training examples and verifies on its test split",
    )
    export.add_argument("--label", default="label", help="--data CSV's label column")
    export.add_argument(
        "--text-column",
        metavar="COL",
        help="--data is a CSV of texts (a text model): tokenized with the "
        "vocabulary.json beside MODEL",
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


def _check_onnx_installed(flag):
    from hlkeras import export

    try:
        export.check_onnx_installed()
    except export.ExportError as error:
        raise UsageError(f"{flag} onnx: {error}") from None


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
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {path}: cannot read a NumPy .npy file ({error})")
    _check_finite(f"{flag} {path}", "", array)
    return array


def _check_finite(where, name, array):
    from hlkeras import tables

    try:
        tables.check_finite_array(array, where, name)
    except tables.DatasetError as error:
        raise UsageError(str(error)) from None


def _load_verify_npz(path):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays:
                raise UsageError(
                    f"--verify {path}: needs an array named 'x' (and optionally "
                    f"'y'); found {sorted(arrays.files)}"
                )
            x, y = arrays["x"], arrays["y"] if "y" in arrays else None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UsageError(f"--verify {path}: cannot read a NumPy .npz file ({error})")
    _check_finite(f"--verify {path}", "x", x)
    return x if y is None else (x, y)


def dataset_representative_samples(name):
    """About 200 training images of dataset `name`, for int8 calibration."""
    from hlkeras import data

    return data.representative_samples(name, count=200, data_dir=None)


def dataset_test_arrays(name):
    """`(images, labels)` of dataset `name`'s test split, as NumPy arrays."""
    from hlkeras import data

    _, _, test_ds, _ = data.load(name)
    return data.to_numpy(test_ds)


def _export_data(args, needs_calibration):
    """`(calibration samples, verification data)` of `hlkeras export`: the
    .npy / .npz files when given, else `--data`'s or `--dataset`'s."""
    representative = verify = None
    if args.data and args.dataset:
        raise UsageError(f"--data {args.data} and --dataset {args.dataset} exclude each other")
    if args.data:
        representative, verify = _data_file_arrays(args)
    elif args.dataset and (tokenizer := _model_tokenizer(args.model)) is not None:
        # A text model: its TFDS texts tokenized by its own vocabulary.
        representative, verify = _from_dataset(
            functools.partial(dataset_token_arrays, tokenizer=tokenizer),
            args.dataset,
            "texts",
        )
    elif args.dataset:
        if needs_calibration and not args.representative:
            representative = _from_dataset(
                dataset_representative_samples, args.dataset, "representative samples"
            )
        if not args.verify:
            verify = _from_dataset(dataset_test_arrays, args.dataset, "test split")
    if args.representative:
        representative = _load_npy("--representative", args.representative)
    if args.verify:
        verify = _load_verify_npz(args.verify)
    if needs_calibration and representative is None:
        raise UsageError(
            "--quantize int8 needs calibration data: pass --dataset NAME "
            "(e.g. digits), --data PATH or --representative FILE.npy"
        )
    return representative, verify


def dataset_token_arrays(name, tokenizer):
    """`(calibration ids, (test ids, labels))` of TFDS text dataset `name`,
    tokenized by a text model's `tokenizer`."""
    from hlkeras import data

    # Training batches drop their remainder: small ones keep a small split.
    train_ds, _, test_ds, _ = data.load(name, tokenizer=tokenizer, batch_size=25)
    return data.to_numpy(train_ds.take(8))[0], data.to_numpy(test_ds)


def _model_tokenizer(model_path):
    """The tokenizer saved beside a text model (its vocabulary.json), or None."""
    from hlkeras import data
    from hlkeras import texts

    try:
        return texts.saved_tokenizer(model_path)
    except data.DatasetError as error:
        raise UsageError(str(error)) from None


def _data_file_arrays(args):
    """`(calibration samples, (test x, test y))` of `--data PATH`, split as
    `hlkeras train --data PATH` splits it with its default seed and fractions;
    texts are tokenized with the model's own vocabulary."""
    from hlkeras import data
    from hlkeras import texts

    path = args.data
    try:
        tokenizer = None
        if args.text_column:
            tokenizer = _model_tokenizer(args.model)
            if tokenizer is None:
                raise data.DatasetError(
                    f"--text-column: no {texts.VOCABULARY_FILE} beside {args.model} "
                    "(copy it from the model's run directory)"
                )
        train_ds, _, test_ds, _ = data.load_path(
            path, label=args.label, text_column=args.text_column, tokenizer=tokenizer
        )
    except data.DatasetError as error:
        raise UsageError(str(error)) from None
    if test_ds is None:
        raise UsageError(f"--data {path}: no test split to verify on")
    return data.to_numpy(train_ds)[0][:200], data.to_numpy(test_ds)


def _from_dataset(fetch, name, what):
    from hlkeras import data

    try:
        return fetch(name)
    except data.DatasetError as error:
        raise UsageError(
            f"--dataset {name}: cannot load its {what} ({error}); "
            "pass --representative FILE.npy / --verify FILE.npz instead"
        ) from None


def print_export_table(report):
    from hlkeras.benchmark import format_optional
    from hlkeras.benchmark import format_size

    rows = [("artifact", "size", "max diff", "agreement", "accuracy", "latency")]
    for artifact in report.artifacts:
        rows.append(
            (
                os.path.relpath(artifact.path, report.out_dir),
                format_size(artifact.size_bytes),
                format_optional(artifact.max_abs_diff, ".2e"),
                format_optional(artifact.top1_agreement, ".2%"),
                format_optional(artifact.accuracy, ".2%"),
                format_optional(artifact.latency_ms, ".3f") + " ms"
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
            format_optional(report.keras_accuracy, ".2%"),
            format_optional(report.keras_latency_ms, ".3f") + " ms"
            if report.keras_latency_ms is not None
            else "-",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def cmd_export(args):
    from hlkeras import export

    quantization = check_flag_choice("--quantize", args.quantize, export.QUANTIZATIONS, UsageError)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    for format in formats or [""]:
        check_flag_choice("--format", format, export.FORMATS, UsageError)
    if "onnx" in formats:
        _check_onnx_installed("--format")
    if args.latency_runs < 0:
        raise UsageError(f"--latency-runs must be >= 0; got {args.latency_runs}")
    max_accuracy_drop = _max_accuracy_drop(args.max_accuracy_drop)

    needs_calibration = quantization == "int8" and "tflite" in formats
    representative, verify = _export_data(args, needs_calibration)

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


class OneLineErrorParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors (a flag's value that does not parse,
    an unknown flag) are one line, as hlkeras' own checks are, not the usage
    text followed by the error. `--help` still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = OneLineErrorParser(
        prog="hlkeras",
        description="Modern hidden layers for Keras 3: train, tune and export.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    info = commands.add_parser(
        "info", parents=[COMMON_FLAGS], help="print library versions and the active Keras backend"
    )
    info.set_defaults(func=cmd_info)
    _add_train_command(commands)
    _add_tune_command(commands)
    add_export_parser(commands)
    _add_predict_command(commands)
    _add_benchmark_command(commands)
    return parser


# --- hlkeras train ------------------------------------------------------------


def _add_train_command(commands):
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
    flag(
        "--arch",
        help=(
            "model architecture: mlp, resnet, vit, text "
            "(default resnet for images, mlp for a table, text for texts)"
        ),
    )
    flag("--dataset", help="'digits' (embedded, default) or a TFDS dataset in --data-dir")
    flag("--data-dir", help="TFDS data directory (default: TFDS' own)")
    _add_data_flags(flag)
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
    flag("--seed", type=int, help="random seed (default 0)")
    flag("--patience", type=int, help="early-stopping patience in epochs (default 15)")
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
    flag(
        "--distribute",
        help="train on every visible device (JAX): data (DataParallel) or model "
        "(ModelParallel: MoE experts, attention heads and FFN units sharded)",
    )
    flag("--mesh", help="--distribute model's device mesh BATCHxMODEL (default: model axis 2)")
    train.set_defaults(func=cmd_train)


def _join_hosts(args):
    """This process' index in the run: a `--distribute` run joins the other
    hosts its environment names (`hlkeras.distribute.ENVIRONMENT`) first."""
    if not args.distribute:
        return 0
    from hlkeras import distribute

    distribute.initialize_from_environment()
    return distribute.process_index()


def _add_data_flags(flag):
    """The flags of a user's own data (`hlkeras.data.load_path`)."""
    flag(
        "--data",
        metavar="PATH",
        help="your own data: a folder of class subfolders of images, a .csv or a .npz file",
    )
    flag("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize images to H x W")
    flag("--color-mode", help="grayscale or rgb (default: the first image's)")
    flag("--label", help="the CSV's label column (default 'label')")
    flag("--val-split", type=float, help="validation fraction drawn from --data (default 0.1)")
    flag("--test-split", type=float, help="test fraction drawn from --data (default 0.2)")
    flag("--text-column", metavar="COL", help="--data is a CSV of texts: the column to classify")
    flag("--max-length", type=int, help="texts: tokens per text (default: covers 95%% of them)")
    flag("--vocab-size", type=int, help="texts: token ids incl. padding, unknown (default 20000)")


def _given_settings(args, defaults):
    """The settings among `defaults`' keys that a flag gave."""
    return {key: getattr(args, key) for key in defaults if getattr(args, key, None) is not None}


def cmd_train(args):
    try:
        run_dir, resuming = runs.open_run_dir(
            args.out, resume=args.resume, overwrite=args.overwrite, process=_join_hosts(args)
        )
        settings = runs.settings_for(run_dir, resuming, _given_settings(args, TRAIN_DEFAULTS))
        outcome = runs.train_run(settings, run_dir, resuming=resuming, tensorboard=args.tensorboard)
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


# --- hlkeras tune -----------------------------------------------------------------


def _add_tune_command(commands):
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
    _add_data_flags(flag)
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
    tune.set_defaults(func=cmd_tune)


def cmd_tune(args):
    from hlkeras import search

    settings = _given_settings(args, search.SEARCH_DEFAULTS)
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


# --- hlkeras predict ---------------------------------------------------------------


def _add_predict_command(commands):
    predict = commands.add_parser(
        "predict",
        parents=[COMMON_FLAGS],
        help="run a trained model on image files, an image folder, a CSV or a .npz",
        description=(
            "Prints one line per input: input, class name, probability. MODEL is a "
            "run directory, a .keras, a .tflite file (run in the LiteRT "
            "interpreter, one input at a time) or a .onnx file (ONNX Runtime, one "
            "input at a time)."
        ),
    )
    predict.add_argument("model", metavar="MODEL")
    predict.add_argument("inputs", metavar="INPUT", nargs="+")
    predict.add_argument("--top", type=int, default=1, help="the K most probable classes")
    predict.add_argument("--out", help="also write the predictions to this CSV file")
    predict.add_argument(
        "--label",
        help="a CSV input's label column, skipped (default: the run's, else 'label')",
    )
    predict.add_argument(
        "--text-column",
        help="a text model's CSV input: the texts' column (default: the run's, else 'text')",
    )
    predict.set_defaults(func=cmd_predict)


def cmd_predict(args):
    from hlkeras import predict

    if args.top < 1:
        raise UsageError(f"--top must be a positive integer, got {args.top}")
    try:
        model = predict.load_predictor(args.model)
        # A run directory recorded the columns it was trained on; flags win.
        if model.tokenizer is not None:
            text_column = args.text_column or model.text_column or "text"
            names, inputs = predict.read_texts(args.inputs, model.tokenizer, text_column)
        else:
            label = args.label or model.label or "label"
            names, inputs = predict.read_inputs(args.inputs, model.input_shape, label=label)
    except predict.PredictError as error:
        raise UsageError(str(error)) from None
    tops = predict.top_classes(model.predict(inputs), model.class_names, k=args.top)
    for name, top in zip(names, tops):
        print(", ".join([name] + [f"{label}, {p:.4f}" for label, p in top]))
    if args.out:
        predict.write_csv(args.out, names, tops)
        print(f"wrote {args.out}")
    return 0


# --- hlkeras benchmark --------------------------------------------------------


def _add_benchmark_command(commands):
    from hlkeras.benchmark import FORMATS
    from hlkeras.export import QUANTIZATIONS

    benchmark = commands.add_parser(
        "benchmark",
        parents=[COMMON_FLAGS],
        help="one model in every runtime: size, batch-1 latency, throughput, accuracy",
        description=(
            "Exports MODEL (a .keras file or a run directory) to a temporary "
            "directory and runs it in Keras (model.predict and a compiled "
            "predict_on_batch), the SavedModel in TensorFlow, LiteRT at each "
            "quantization and ONNX Runtime. Prints one table (size, batch-1 "
            "latency p50/p90 and its ratio to Keras predict, samples/s at batch "
            "32, accuracy and top-1 agreement with Keras, one sample at a time), "
            "writes it as JSON and plots it."
        ),
    )
    benchmark.add_argument("model", metavar="MODEL")
    benchmark.add_argument(
        "--dataset",
        metavar="NAME",
        help="the data to measure on (its test split; int8 calibrates on its "
        "training split); default: a run directory's own dataset",
    )
    benchmark.add_argument("--data", metavar="PATH", help="your own data, as hlkeras train --data")
    benchmark.add_argument("--label", default="label", help="--data CSV's label column")
    benchmark.add_argument(
        "--text-column", metavar="COL", help="--data is a CSV of texts (a text model)"
    )
    benchmark.add_argument(
        "--formats",
        default=None,
        help=f"comma-separated: {', '.join(FORMATS)} (default: all whose packages are installed)",
    )
    benchmark.add_argument(
        "--quantize",
        default=",".join(QUANTIZATIONS),
        help="the .tflite quantizations, comma-separated (default: all)",
    )
    benchmark.add_argument(
        "--latency-runs", type=int, default=100, metavar="N", help="timed batch-1 calls per runtime"
    )
    benchmark.add_argument("--json", default="benchmark.json", metavar="FILE", help="the report")
    benchmark.add_argument("--plot", default="benchmark.png", metavar="FILE", help="the bar chart")
    benchmark.set_defaults(func=cmd_benchmark, representative=None, verify=None)


def _comma_list(flag, text, allowed):
    values = [v.strip() for v in text.split(",") if v.strip()]
    for value in values or [""]:
        check_flag_choice(flag, value, allowed, UsageError)
    return values


def _benchmark_formats(args):
    from hlkeras import benchmark
    from hlkeras import onnx_export

    if args.formats is not None:
        formats = _comma_list("--formats", args.formats, benchmark.FORMATS)
        if "onnx" in formats:
            _check_onnx_installed("--formats")
        return formats
    if onnx_export.missing_packages():
        print(
            f"benchmark: skipping onnx (not installed: {onnx_export.ONNX_EXTRA_HINT})",
            file=sys.stderr,
        )
        return [f for f in benchmark.FORMATS if f != "onnx"]
    return list(benchmark.FORMATS)


def _benchmark_args(args):
    """A copy of `args` whose `model` is MODEL's `.keras` file; a run
    directory's recorded data fills in --dataset / --data when neither is
    given. `args` itself is left as parsed."""
    path, recorded = args.model, {}
    if os.path.isdir(path):
        run_dir = runs.RunDir(path)
        if not args.dataset and not args.data and os.path.exists(run_dir.file(run_dir.CONFIG)):
            settings = run_dir.recorded_settings()
            data = settings.get("data")
            recorded = {
                "data": data,
                "label": settings.get("label", args.label),
                "text_column": settings.get("text_column"),
                "dataset": None if data else settings.get("dataset") or "digits",
            }
        path = run_dir.file(run_dir.MODEL)
    if not os.path.isfile(path) or not path.endswith(".keras"):
        raise UsageError(f"MODEL {args.model}: expected a .keras file or a run directory")
    resolved = argparse.Namespace(**{**vars(args), **recorded, "model": path})
    if not resolved.dataset and not resolved.data:
        raise UsageError(
            f"MODEL {args.model}: pass --dataset NAME or --data PATH to measure accuracy on"
        )
    return resolved


def cmd_benchmark(args):
    import tempfile

    from hlkeras import benchmark
    from hlkeras import export

    formats = _benchmark_formats(args)
    quantizations = _comma_list("--quantize", args.quantize, export.QUANTIZATIONS)
    if args.latency_runs < 1:
        raise UsageError(f"--latency-runs must be >= 1; got {args.latency_runs}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a directory; give a file name")
    args = _benchmark_args(args)
    try:
        export.load_keras_model(args.model)
    except export.ExportError as error:
        raise UsageError(str(error)) from None
    needs_calibration = "tflite" in formats and "int8" in quantizations
    representative, verify = _export_data(args, needs_calibration)
    progress = functools.partial(print, "benchmark:", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="hlkeras-benchmark-") as work_dir:
        report = benchmark.benchmark_model(
            args.model,
            verify,
            representative_data=representative,
            formats=formats,
            quantizations=quantizations,
            latency_runs=args.latency_runs,
            work_dir=work_dir,
            progress=progress,
        )
    for line in benchmark.table_lines(report):
        print(line)
    benchmark.write_json(report, args.json)
    benchmark.plot(report, args.plot)
    print(f"wrote {args.json} and {args.plot}")
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
