"""`hlkeras prune`: a finished training run pruned and fine-tuned into a new
run directory, its `.tflite` verified like any other (`prune_run`).

The fine-tuning follows tfmot's recipe: the sparsity rises along the
polynomial schedule (`hlkeras.prune.Pruning`) over the first two thirds of
the steps, with the masks updated ten times, and the last third recovers at
the final sparsity. The model kept is the last epoch's, so it has the full
sparsity (an earlier, better-scoring epoch is less sparse, so no `best.keras`
is kept). With `epochs=0` the run prunes in one shot (`prune.magnitude`).
With `structured=R` the run instead removes the fraction R of the units of
each block (`prune.structured`: hidden units, heads, experts, channels) and
fine-tunes the smaller model as it is.

`metrics.json` holds what `hlkeras train` writes, and the dense model's
numbers measured in the same run beside the pruned one's:
`dense_test_accuracy`, `sparsity`, `structured`, `params`,
`nonzero_params`, `dense_params`, `tflite_bytes` and `dense_tflite_bytes`.
"""

import json
import os
import time
import warnings

from hlkeras import _files
from hlkeras._validation import HlkerasWarning
from hlkeras.training import runs
from hlkeras.training.runs import RunDir
from hlkeras.training.runs import RunError

# Fractions of the fine-tuning steps: the schedule ends here, the rest recovers.
SCHEDULE_FRACTION = 2 / 3
MASK_UPDATES = 10
# What a pruned run's files are where they differ from a training run's.
FILE_ROLES = {RunDir.MODEL: "the pruned model (the last epoch: the fully sparse one)"}
STRUCTURED_FILE_ROLES = {
    RunDir.MODEL: "the smaller model (the last epoch)",
    RunDir.SPEC: "the spec of the dense model it was narrowed from",
}
# Files of the source run the pruned run keeps as they are.
COPIED = (RunDir.SPEC, RunDir.CLASS_NAMES, RunDir.VOCABULARY)


def schedule(epochs, steps_per_epoch):
    """`(end_step, frequency)` of the fine-tuning's pruning schedule: the end
    on the mask-update grid, so the final sparsity is reached."""
    end_step = max(1, int(SCHEDULE_FRACTION * epochs * steps_per_epoch))
    frequency = max(1, end_step // MASK_UPDATES)
    return frequency * (end_step // frequency), frequency


def prune_run(
    source_path,
    run_dir,
    *,
    sparsity=None,
    pattern=None,
    scope="layer",
    structured=None,
    epochs=10,
    lr=None,
    log=print,
):
    """Prunes the model of a finished run and fine-tunes it into `run_dir`.

    Args:
        source_path: The `hlkeras train` run directory.
        run_dir: The new run's `RunDir` (`RunDir.open`).
        sparsity, pattern, scope: As in `hlkeras.prune.magnitude`.
        structured: Instead, the ratio of `hlkeras.prune.structured`.
        epochs: Fine-tuning epochs (0: one-shot pruning only).
        lr: The fine-tuning learning rate (default: the run's).
        log: Where the one-line progress messages go.

    Returns:
        A `runs.RunOutcome`; its `metrics` also hold the dense model's.
    """
    import keras

    from hlkeras import prune
    from hlkeras import training

    started = time.perf_counter()
    source = runs.finished_run(source_path)
    if structured is None:
        prune.Pruning(sparsity, pattern=pattern, scope=scope)  # checks them before any work
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"Argument `epochs` must be an integer >= 0. Received: epochs={epochs!r}")
    settings = {**source.recorded_settings(), "distribute": None, "mesh": None}
    if lr is not None:  # else the run's: on digits a tenth of it recovered less
        settings["lr"] = lr
    keras.utils.set_random_seed(settings["seed"])
    dense = keras.saving.load_model(source.file(RunDir.MODEL))
    smaller = None if structured is None else _narrowed(dense, structured)
    if pattern is not None:
        _check_pattern_fits(dense, pattern)
    (train_ds, val_ds, test_ds), info = runs.load_data(settings, source)
    with open(source.file(RunDir.SPEC)) as file:
        spec = json.load(file)
    run_dir.prepare()
    for name in COPIED:
        if os.path.exists(source.file(name)):
            with open(source.file(name), "rb") as file:
                _files.atomic_write_bytes(run_dir.file(name), file.read())
    _files.atomic_write_json(run_dir.file(RunDir.CONFIG), {**settings, "epochs": epochs})
    if smaller is not None:
        what = f"{structured:.0%} fewer units ({dense.count_params():,} -> "
        what += f"{smaller.count_params():,} params)"
    else:
        what = f"pattern {pattern}" if pattern else f"{sparsity:.0%} sparsity ({scope})"
    log(f"hlkeras prune: {source.path} to {what} over {epochs} epochs -> {run_dir.path}")

    if smaller is not None:
        model = training.compile_model(smaller)
        rows, seconds = [], 0.0
        if epochs:
            result = _fine_tune(model, train_ds, val_ds, run_dir, settings, epochs, [])
            if result.nan_epoch is not None:
                return runs.RunOutcome(run_dir, nan_message=training.nan_message(result))
            rows, seconds = result.rows, result.seconds
    elif epochs == 0:
        model = training.compile_model(
            prune.magnitude(dense, sparsity, scope=scope, pattern=pattern)
        )
        rows, seconds = [], 0.0
    else:
        model = prune.strip(dense)
        end_step, frequency = schedule(epochs, int(train_ds.cardinality()))
        pruning = prune.Pruning(
            sparsity, pattern=pattern, scope=scope, end_step=end_step, frequency=frequency
        )
        result = _fine_tune(model, train_ds, val_ds, run_dir, settings, epochs, [pruning])
        if result.nan_epoch is not None:
            return runs.RunOutcome(run_dir, nan_message=training.nan_message(result))
        rows, seconds = result.rows, result.seconds

    metrics = runs.evaluate_and_export(model, settings, run_dir, test_ds)
    dense_results = dense.evaluate(test_ds, verbose=0, return_dict=True)
    metrics.update(
        {
            "dense_test_accuracy": float(dense_results["accuracy"]),
            "sparsity": prune.sparsity(model),
            "pattern": pattern,
            "scope": scope,
            "structured": structured,
            "params": int(model.count_params()),
            "nonzero_params": int(model.count_params()) - _pruned_count(model),
            "dense_params": int(dense.count_params()),
            "tflite_bytes": runs.file_size(run_dir.file(RunDir.TFLITE)),
            "dense_tflite_bytes": runs.file_size(source.file(RunDir.TFLITE)),
            "epochs": len(rows),
            "seconds": round(seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
            "backend": keras.backend.backend(),
            "dataset": info.name,
            "arch": spec["arch"],
            "pruned_from": os.path.abspath(source.path),
        }
    )
    _files.atomic_write_json(run_dir.file(RunDir.METRICS), metrics)
    return runs.RunOutcome(run_dir, metrics=metrics, refused=metrics["tflite_refused"])


def _narrowed(dense, ratio):
    """`prune.structured(dense, ratio)`, its refusals as run errors (one line)."""
    from hlkeras import prune

    try:
        return prune.structured(dense, ratio)
    except ValueError as error:
        raise RunError(str(error)) from None


def _check_pattern_fits(dense, pattern):
    """A pattern no weight of the model fits is a run error, before any work."""
    from hlkeras import prune

    try:
        with warnings.catch_warnings():  # the pruning itself warns of what it skips
            warnings.simplefilter("ignore", HlkerasWarning)
            prune.prunable_weights(dense, pattern=pattern)
    except ValueError as error:
        raise RunError(str(error).replace("Argument `pattern`", "--pattern")) from None


def _fine_tune(model, train_ds, val_ds, run_dir, settings, epochs, callbacks):
    """`compile_and_fit` for the whole fine-tuning: the model kept is the last
    epoch's (the fully sparse one), so no best.keras stays."""
    from hlkeras import training

    result = training.compile_and_fit(
        model,
        train_ds,
        val_ds,
        run_dir=run_dir.path,
        epochs=epochs,
        learning_rate=settings["lr"],
        weight_decay=settings["weight_decay"],
        clipnorm=settings["clipnorm"],
        patience=epochs + 1,
        extra_callbacks=callbacks,
    )
    if result.best_path:
        os.remove(result.best_path)
    return result


def _pruned_count(model):
    """How many of `model`'s prunable weights are exactly zero."""
    import keras

    from hlkeras import prune

    return sum(
        int((keras.ops.convert_to_numpy(w.variable) == 0).sum())
        for w in prune.prunable_weights(model)
    )


def before_after_table(metrics):
    """The printed dense-against-pruned lines of a `prune_run`'s metrics."""

    structured = metrics.get("structured")
    rows = [
        ("", "dense", "pruned"),
        (
            "test accuracy",
            f"{metrics['dense_test_accuracy']:.2%}",
            f"{metrics['test_accuracy']:.2%}",
        ),
        ("units removed", "-", f"{structured:.0%}")
        if structured is not None
        else ("sparsity", "-", f"{metrics['sparsity']:.1%}"),
        ("params (nonzero)", f"{metrics['dense_params']:,}", f"{metrics['nonzero_params']:,}"),
        (
            "model.tflite",
            runs.kilobytes(metrics["dense_tflite_bytes"]),
            runs.kilobytes(metrics["tflite_bytes"]),
        ),
    ]
    return runs.aligned_rows(rows)
