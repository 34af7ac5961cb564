"""`run_search`: what `hlkeras tune` does, as one library call.

It checks the settings, loads the data, refuses a directory holding a
different search, runs the trials (here, or in a chief and worker processes
with `workers=N`), writes the reports and retrains the best configuration
into `DIR/best.keras`.

Example:

```python
from hlkeras import search

outcome = search.run_search(space="tuning/digits_mlp.toml", directory="runs/s", max_trials=5)
print(outcome.best_spec, outcome.best_path)
```
"""

import json
import operator
import os
import shutil

from hlkeras import _compat
from hlkeras import _files
from hlkeras import _validation
from hlkeras import models
from hlkeras import training
from hlkeras.data.settings import DATA_FILE_DEFAULTS
from hlkeras.search import budget
from hlkeras.search import reports
from hlkeras.search import tuners
from hlkeras.search.budget import BUDGET_DEFAULTS
from hlkeras.search.hypermodel import SpecHyperModel
from hlkeras.search.hypermodel import trial_pruning
from hlkeras.search.outcome import BEST_EXPORT_DIR
from hlkeras.search.outcome import BEST_MODEL
from hlkeras.search.outcome import BEST_TFLITE
from hlkeras.search.outcome import RETRAIN_DIR
from hlkeras.search.outcome import SearchError
from hlkeras.search.outcome import SearchOutcome
from hlkeras.search.outcome import retrained_val_accuracy
from hlkeras.search.space import SEARCH_SPACES
from hlkeras.search.space import TRAINING_KEYS
from hlkeras.search.space import arch_names
from hlkeras.search.space import load_space
from hlkeras.search.space import resolve_space
from hlkeras.search.space import space_arch

OBJECTIVES = ("val_accuracy", "val_loss", "accuracy", "loss")
# The settings of a search and their defaults (the `hlkeras tune` flags; the
# error messages name them as flags). `arch` None: the space file's, else mlp.
SEARCH_DEFAULTS = {
    "arch": None,
    "space": None,
    "dataset": None,  # the embedded digits unless `data` is given
    "data": None,
    **DATA_FILE_DEFAULTS,  # how `data` is read; not used for `dataset`
    "data_dir": None,
    "tuner": "hyperband",
    "max_trials": 10,
    "max_epochs": 20,
    "objective": "val_accuracy",
    "seed": 0,
    "patience": 3,
    "directory": None,
    "workers": 0,
    # Distillation: every trial's model a student of this trained run or
    # .keras file (hlkeras.distill), at this temperature and alpha.
    "teacher": None,
    "temperature": 4.0,
    "alpha": 0.5,
    **BUDGET_DEFAULTS,  # a device budget: see hlkeras.search.budget
}


def check_search_settings(settings):
    """Raises `SearchError` naming the first setting out of its range."""
    _validation.check_flag_choice("--tuner", settings["tuner"], tuners.TUNERS, SearchError)
    for name in ("max_trials", "max_epochs", "patience"):
        if settings[name] < 1:
            raise SearchError(
                f"--{name.replace('_', '-')} must be a positive integer, got {settings[name]}"
            )
    if settings["workers"] < 0:
        raise SearchError(f"--workers must be >= 0, got {settings['workers']}")
    _validation.check_flag_choice("--objective", settings["objective"], OBJECTIVES, SearchError)
    from hlkeras.training import distill_run

    distill_run.check_distillation(settings["temperature"], settings["alpha"], SearchError)
    device_budget = budget.DeviceBudget.from_settings(settings, SearchError)
    if device_budget is not None and "accuracy" not in settings["objective"]:
        raise SearchError(
            f"a device budget needs an accuracy objective, got --objective "
            f"{settings['objective']}: a trial over budget must score below every "
            "trial that fits, which only a metric bounded below can guarantee"
        )


def arch_and_space(arch, space):
    """`(arch, overrides)` from an `arch` and a space (file or dict); checked."""
    where = space if isinstance(space, (str, os.PathLike)) else "--arch"
    try:
        overrides = load_space(space)
        for name in arch_names(arch) if arch else []:
            _validation.check_flag_choice("--arch", name, sorted(SEARCH_SPACES), SearchError)
        chosen = arch or space_arch(overrides)
        if arch and space_arch(overrides, arch) != arch:
            raise SearchError(f"--arch {arch} contradicts arch = {overrides['arch']!r} in {space}")
        resolve_space(chosen, overrides)
    except SearchError:
        raise
    except ValueError as error:
        raise SearchError(f"{where}: {error}") from None
    return chosen, overrides


def run_search(log=print, **given):
    """Runs a whole search, as `hlkeras tune` does.

    Args:
        log: Where the one-line progress messages go.
        **given: Settings (keys of `SEARCH_DEFAULTS`): `arch` (one, or
            several joined by commas to search the family too), `space` (a
            `.toml`/`.json` path or a dict), `dataset` (TFDS; default the
            embedded digits) or `data` (a path, `hlkeras.data.load_path`),
            `data_dir`, `tuner`
            (`"random"`, `"bayesian"`, `"hyperband"`), `max_trials`,
            `max_epochs`, `objective`, `seed`, `patience` (early stopping per
            trial), `directory` (default `runs/tune-<arch>-<data name>`; an
            existing search of the same fingerprint resumes), `workers` (run a
            chief and this many worker processes on this machine);
            `max_tflite_kb`, `max_latency_ms` and `quantize`: a device budget
            (`hlkeras.search.budget`): every trial is exported to `.tflite`
            and measured, the best trial that fits is retrained and also
            exported to `DIR/best.tflite`.

    Returns:
        A `SearchOutcome`.

    Raises:
        SearchError: for a bad setting, space or directory.
    """
    unknown = sorted(set(given) - set(SEARCH_DEFAULTS))
    if unknown:
        raise TypeError(f"run_search() got unknown settings {unknown}")
    settings = {**SEARCH_DEFAULTS, **given}
    check_search_settings(settings)
    # A CSV of texts searches the text arch unless told otherwise.
    default_arch = settings["arch"] or ("text" if settings["text_column"] else None)
    arch, overrides = arch_and_space(default_arch, settings["space"])
    settings["arch"] = arch
    settings["directory"] = settings["directory"] or os.path.join(
        "runs",
        f"tune-{'+'.join(arch_names(arch))}-"
        f"{os.path.basename(os.path.normpath(data_name(settings)))}",
    )
    if settings["workers"]:
        from hlkeras.search import workers

        return workers.run_chief_and_workers(settings, log=log)
    return _search_here(settings, overrides, log)


CLASS_NAMES_JSON = "class_names.json"  # as in a run directory (hlkeras.training.runs.RunDir)


def data_name(settings):
    """What the search trains on: the `data` path, the dataset, or digits."""
    return settings["data"] or settings["dataset"] or "digits"


def _search_here(settings, overrides, log):
    """The search in this process: alone, or as the chief or a worker."""
    import keras

    from hlkeras import data
    from hlkeras.data import texts

    directory = settings["directory"]
    (x_train, y_train), validation, info = _load_arrays(settings)  # seeds the search
    teacher = _teacher(settings, info)
    hypermodel = SpecHyperModel(
        settings["arch"],
        info.input_shape,
        info.num_classes,
        overrides,
        num_train=len(x_train),
        epochs=settings["max_epochs"],
        fixed_spec=_data_spec(settings, info),
        teacher=teacher,
        temperature=settings["temperature"],
        alpha=settings["alpha"],
    )
    if teacher is not None and any(
        key.rpartition(".")[2] == "sparsity" for key in hypermodel.space
    ):
        # Pruning acts on the model being fit, the distiller, teacher and all.
        raise SearchError("--teacher cannot be combined with a 'sparsity' key in the space (yet)")
    device_budget = budget.DeviceBudget.from_settings(settings, SearchError)
    is_worker = _compat.kerastuner_role() == "worker"
    if not is_worker:
        resuming = _check_directory(settings, hypermodel, device_budget)
        log(
            f"hlkeras tune: {settings['tuner']} search over {settings['arch']} on {info.name} "
            f"({keras.backend.backend()} backend) in {directory}"
            + (f" under the device budget {device_budget.describe()}" if device_budget else "")
            + (" (resuming)" if resuming else "")
        )
    tuner = tuners.make_tuner(
        settings["tuner"],
        hypermodel,
        directory=directory,
        objective=settings["objective"],
        max_trials=settings["max_trials"],
        max_epochs=settings["max_epochs"],
        seed=settings["seed"],
        device_budget=device_budget,
    )
    tuners.run_trials(
        tuner,
        x_train,
        y_train,
        validation_data=validation,
        epochs=settings["max_epochs"],
        patience=settings["patience"],
    )
    if is_worker:
        return SearchOutcome(directory)
    rows, best = reports.write_reports(tuner, hypermodel, directory)
    direction = tuner.oracle.objective.direction
    log("\n".join(reports.leaderboard(rows, hypermodel.space, settings["objective"], direction)))
    outcome = SearchOutcome(directory, rows=rows, best_values=best)
    if best is None:
        outcome.error = no_best_message(rows, device_budget, directory)
        return outcome
    outcome.best_spec = hypermodel.spec(best)
    log(f"best spec: {json.dumps(outcome.best_spec, sort_keys=True)}")
    # What `hlkeras predict` reads beside best.keras: the class names and the
    # tokenizer the trials used.
    _files.atomic_write_json(os.path.join(directory, CLASS_NAMES_JSON), list(info.class_names))
    tokenizer = info.tokenizer() if info.kind == "text" else None
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, texts.VOCABULARY_FILE))
    train_ds, val_ds, _, _ = data.load_for(
        settings, batch_size=best["batch_size"], tokenizer=tokenizer
    )
    result = retrain_best(
        hypermodel,
        best,
        train_ds,
        val_ds,
        directory,
        epochs=settings["max_epochs"],
        patience=max(settings["patience"], 5),
    )
    if result.nan_epoch is not None:
        outcome.error = f"retraining the best: {training.nan_message(result)}"
    elif result.best_path is None:
        outcome.error = "the retraining saved no checkpoint"
    else:
        outcome.best_path = os.path.join(directory, BEST_MODEL)
        outcome.best_val_accuracy = retrained_val_accuracy(directory)
        if device_budget is not None:
            outcome.error = export_best(outcome, device_budget, x_train, validation, log)
    return outcome


def no_best_message(rows, device_budget, directory):
    """Why a finished search has no best trial, in one line."""
    where = f"see {directory}/{reports.TRIALS_CSV}"
    if not reports.ranked(rows):
        return f"no trial completed; {where}"
    smallest = reports.smallest_trial(rows)
    if smallest is None:
        return f"no trial could be exported under {device_budget.describe()}; {where}"
    return (
        f"no trial fits the device budget {device_budget.describe()}: the smallest, "
        f"trial {smallest['trial']}, is {smallest['tflite_kb']:.1f} KiB and "
        f"{smallest['latency_ms']:.3f} ms ({smallest['budget']}); {where}"
    )


def export_best(outcome, device_budget, x_train, validation, log):
    """Exports the retrained `best.keras` like the trials (verified, into
    `DIR/export/`) and publishes its `.tflite` as `DIR/best.tflite`.

    Returns:
        Why `best.tflite` was not published, or None.
    """
    from hlkeras import export

    export_dir = os.path.join(outcome.directory, BEST_EXPORT_DIR)
    try:
        report = budget.export_tflite(
            outcome.best_path, export_dir, device_budget, x_train, validation
        )
    except export.ExportError as error:
        return f"best.tflite was not written: {error}"
    measured = budget.measurements(report)
    verdict = device_budget.verdict(measured)
    log(
        f"best.tflite: {measured['tflite_kb']:.1f} KiB, {measured['latency_ms']:.3f} ms, "
        f"accuracy {measured['tflite_accuracy']:.4f} (keras {measured['keras_accuracy']:.4f}): "
        f"{verdict}"
    )
    if measured["tflite_kb"] > (device_budget.max_tflite_kb or float("inf")):
        # The retrained model has the trial's architecture, so its size
        # should be the trial's; a larger file is not what the search chose.
        # Latency is not checked again: a re-measurement differs by noise.
        return f"best.tflite was not written: the retrained model is {verdict}"
    target = os.path.join(outcome.directory, BEST_TFLITE)
    partial = _files.partial_path(target, ".tflite")
    shutil.copyfile(report.artifacts[0].path, partial)
    os.replace(partial, target)
    outcome.best_tflite = target
    return None


def _teacher(settings, info):
    """The loaded `teacher` of a distilling search (checked against the
    data), or None."""
    if settings["teacher"] is None:
        return None
    from hlkeras.training import distill_run
    from hlkeras.training import runs

    try:
        teacher, teacher_run = distill_run.load_teacher(settings["teacher"])
        distill_run.check_pair(teacher, teacher_run, info)
    except runs.RunError as error:
        raise SearchError(str(error)) from None
    return teacher


def _data_spec(settings, info):
    """The spec entries the data decides (a table's normalization, a text's
    vocabulary size), once the arch is checked to take that data."""
    from hlkeras import models

    for arch in arch_names(settings["arch"]):
        models.check_arch_for_data(arch, info.kind, SearchError)
    return info.spec_entries()


def _load_arrays(settings):
    """`((x_train, y_train), (x_val, y_val), info)` of the search's dataset;
    sets the search's seed once a TFDS dataset is prepared."""
    from hlkeras import data
    from hlkeras.training import runs

    try:
        runs.seed_after_preparing(settings)
        train_ds, val_ds, _, info = data.load_for(settings)
    except data.DatasetError as error:
        raise SearchError(str(error)) from None
    if val_ds is None and settings["objective"].startswith("val_"):
        raise SearchError(f"--objective {settings['objective']} needs a validation split")
    return data.to_numpy(train_ds), data.to_numpy(val_ds), info


def _distillation(settings):
    """The distillation part of a search's fingerprint, or None."""
    if settings["teacher"] is None:
        return None
    teacher = os.path.abspath(settings["teacher"])
    return {"teacher": teacher, "temperature": settings["temperature"], "alpha": settings["alpha"]}


def _check_directory(settings, hypermodel, device_budget):
    """Records the search's fingerprint, or checks it against the recorded
    one; returns whether this is a resume."""
    config = tuners.search_config(
        arch=settings["arch"],
        dataset=data_name(settings),
        tuner=settings["tuner"],
        objective=settings["objective"],
        max_epochs=settings["max_epochs"],
        space=hypermodel.space,
        device_budget=device_budget,
        distillation=_distillation(settings),
    )
    try:
        return tuners.check_search_dir(settings["directory"], config)
    except ValueError as error:
        raise SearchError(str(error)) from None


def retrain_best(
    hypermodel, values, train_ds, val_ds, directory, *, epochs, patience=10, verbose=0
):
    """Retrains the best configuration with `hlkeras.training.compile_and_fit`
    in `directory/retrain` (resumable) and copies its best checkpoint to
    `directory/best.keras`. `train_ds` must be batched with `values["batch_size"]`.

    Returns:
        The `hlkeras.training.FitResult` of the retraining.
    """
    run_dir = os.path.join(directory, RETRAIN_DIR)
    os.makedirs(run_dir, exist_ok=True)
    record_path = os.path.join(run_dir, "retrain.json")
    spec = hypermodel.spec(values)
    training_values = {k: values[k] for k in TRAINING_KEYS if k in values}
    record = {"spec": spec, "training": training_values, "epochs": epochs}
    if os.path.exists(record_path):
        with open(record_path) as f:
            if json.load(f) != record:
                # A resumed search found a new best: retrain it from scratch.
                shutil.rmtree(run_dir)
                os.makedirs(run_dir)
    done_path = os.path.join(run_dir, "done.json")
    target = os.path.join(directory, BEST_MODEL)
    if os.path.exists(target) and os.path.exists(done_path):
        with open(done_path) as f:
            if json.load(f) == record:
                # This configuration was retrained before: keep that model.
                rows = training.read_history_rows(os.path.join(run_dir, training.HISTORY_CSV))
                return training.FitResult(rows=rows, nan_epoch=None, best_path=target, seconds=0.0)
    _files.atomic_write_json(record_path, record)
    model = models.build(spec)
    trained = hypermodel.trained_model(model)
    result = training.compile_and_fit(
        trained,
        train_ds,
        val_ds,
        run_dir=run_dir,
        epochs=epochs,
        learning_rate=values["lr"],
        weight_decay=values["weight_decay"],
        patience=patience,
        verbose=verbose,
        extra_callbacks=trial_pruning(values, int(train_ds.cardinality())),
        checkpoint_of=None if trained is model else operator.attrgetter("student"),
    )
    if result.best_path and result.nan_epoch is None:
        partial = _files.partial_path(target, ".keras")
        shutil.copyfile(result.best_path, partial)
        os.replace(partial, target)
        _files.atomic_write_json(done_path, record)
    return result
