"""`hlkeras inspect`: one row per hidden layer of a trained model, its
outputs and gradients on a probe batch (`hlkeras.diagnostics.layer_table`)."""

import os
import time

import numpy as np

from hlkeras.cli.common import COMMON_FLAGS
from hlkeras.cli.common import UsageError
from hlkeras.cli.common import add_data_flags
from hlkeras.cli.common import given_settings
from hlkeras.training.runs import PROBE_EXAMPLES
from hlkeras.training.runs import TRAIN_DEFAULTS


def add_parser(commands):
    inspect = commands.add_parser(
        "inspect",
        parents=[COMMON_FLAGS],
        help="look inside a trained model's hidden layers on a batch of data",
        description=(
            "Print one row per hidden layer of a trained model: its path, class, "
            "output shape, parameters and FLOPs per sample, and on a probe batch "
            "(the first 128 validation examples) its output mean and std, dead "
            "and saturated fractions and gradient norm, then any warnings. RUN "
            "uses the run's recorded data; a .keras file needs --data/--dataset, "
            "or --random-probe."
        ),
    )
    flag = inspect.add_argument
    flag("model", metavar="RUN|MODEL", help="a finished hlkeras train run, or a .keras file")
    flag("--dataset", help="the data (default: the run's)")
    flag("--data-dir", help="TFDS data directory (default: the run's, else TFDS' own)")
    add_data_flags(flag)
    flag(
        "--random-probe",
        action="store_true",
        help="probe with random inputs and labels (a .keras file without its data)",
    )
    flag("--plot", metavar="PNG", help="also write the picture of the layers (hidden_layers.png)")
    inspect.set_defaults(func=run)


def _load(path):
    """`(model, run_dir or None)` of RUN or MODEL.keras, or a one-line error."""
    from hlkeras import export
    from hlkeras.training import runs

    try:
        if os.path.isdir(path):
            run_dir = runs.finished_run(path)
            return export.load_keras_model(run_dir.file(runs.RunDir.MODEL)), run_dir
        return export.load_keras_model(path), None
    except (export.ExportError, runs.RunError) as error:
        raise UsageError(str(error)) from None


def _data_probe(run_dir, given):
    """The first `runs.PROBE_EXAMPLES` validation (else test) examples of
    the run's data, or of the --data/--dataset given."""
    from hlkeras.training import distill_run
    from hlkeras.training import runs

    try:
        # Batches of 1: only the probe's examples are read, from data of any size.
        settings = distill_run.student_settings(run_dir, {**given, "batch_size": 1})
        (_, val_ds, test_ds), _ = runs.load_data(settings, run_dir)
    except runs.RunError as error:
        raise UsageError(str(error)) from None
    return runs.probe_batch(val_ds if val_ds is not None else test_ds)


def _random_probe(model):
    """Random inputs of the model's input shape (token ids below the first
    embedding's vocabulary for integer inputs) and random labels."""
    import keras

    rng = np.random.default_rng(0)
    (shape,) = [tuple(t.shape[1:]) for t in model.inputs]
    if "int" in model.inputs[0].dtype:
        vocabulary = min(
            layer.input_dim for layer in model.layers if isinstance(layer, keras.layers.Embedding)
        )
        x = rng.integers(0, vocabulary, (PROBE_EXAMPLES, *shape))
    else:
        x = rng.normal(size=(PROBE_EXAMPLES, *shape)).astype("float32")
    return x, rng.integers(0, model.outputs[0].shape[-1], PROBE_EXAMPLES)


def _check_shape(model, x, source):
    expected = tuple(model.inputs[0].shape[1:])
    if tuple(x.shape[1:]) != expected:
        raise UsageError(
            f"{source} gives inputs of shape {tuple(x.shape[1:])} per example, but the "
            f"model takes {expected}"
        )


def _cell(value, form):
    return "-" if value is None else format(value, form)


def table_lines(rows):
    """The printed table of `diagnostics.layer_table` rows."""
    from hlkeras.training.runs import aligned_rows

    header = ["layer", "class", "shape", "params", "FLOPs", "mean", "std", "dead", "saturated"]
    cells = [header + ["grad norm"]]
    for row in rows:
        cells.append(
            [
                row["path"],
                row["class"],
                "x".join(map(str, row["shape"])),
                str(row["params"]),
                str(row["flops"]),
                _cell(row["mean"], ".3g"),
                _cell(row["std"], ".3g"),
                _cell(row["dead_fraction"], ".0%"),
                _cell(row["saturated_fraction"], ".0%"),
                _cell(row["gradient_norm"], ".3g"),
            ]
        )
    return aligned_rows(cells)


def run(args):
    from hlkeras import diagnostics

    given = given_settings(args, TRAIN_DEFAULTS)
    data_given = given.get("data") or given.get("dataset")
    model, run_dir = _load(args.model)
    if args.random_probe and data_given:
        raise UsageError("--random-probe excludes --data and --dataset: probe with one of them")
    if args.random_probe:
        (x, y), source = _random_probe(model), "--random-probe"
    elif run_dir is None and not data_given:
        raise UsageError(
            f"{args.model} is a model file without its data: give --data or --dataset, "
            "or --random-probe to probe with random inputs"
        )
    else:
        (x, y), source = _data_probe(run_dir, given), data_given or "the run's data"
    _check_shape(model, x, source)
    started = time.perf_counter()
    statistics = diagnostics.layer_statistics(model, x)
    gradients = diagnostics.gradient_statistics(model, x, y)
    rows = diagnostics.layer_table(model, statistics, gradients)
    print(f"hlkeras inspect: {model.name}, {len(x)} examples of {source}")
    print("\n".join(table_lines(rows)))
    for _, line in diagnostics.findings(statistics, gradients, epoch=None):
        print(f"hlkeras inspect: warning: {line}")
    if args.plot:
        probe = dict(epoch=0, layers=statistics, gradients=gradients, updates={})
        diagnostics.plot_hidden_layers(diagnostics.diagnostics_report([probe]), args.plot)
        print(f"wrote {args.plot}")
    print(f"inspected {len(rows)} layers in {time.perf_counter() - started:.1f} s")
    return 0
