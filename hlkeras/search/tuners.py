"""hlkeras' KerasTuner tuners: resumable, with per-trial records, a chief
that polls its workers quickly, and a fingerprint that stops a rerun from
mixing two different searches in one directory.

KerasTuner writes the oracle and every trial to `DIR/search/` (atomically
here, so a SIGKILL never leaves a half-written file); a rerun reloads them,
completed trials stay done and the trial that was running is run again.
`DIR/search_config.json` records the search's fingerprint (architecture,
dataset, tuner, objective, epochs, space).
"""

import json
import os
import time
import warnings

import keras
import keras_tuner as kt

from hlkeras import _compat
from hlkeras import _files
from hlkeras import training
from hlkeras.search import budget

TUNERS = ("random", "bayesian", "hyperband")
SEARCH_PROJECT = "search"
SEARCH_CONFIG_JSON = "search_config.json"
TRIAL_ERROR_FILE = "error.txt"
TRIAL_TUNER_FILE = "tuner_id.txt"
# With a budget, the objective as trained is kept under this prefix (the
# oracle's objective is the budget-aware score).
TRAINED = "trained_"
# A search stops only after this many failed trials in a row (KerasTuner's
# default of 3 would end a search at a short run of impossible combinations).
MAX_CONSECUTIVE_FAILED_TRIALS = 10


def _error_line(error):
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"


class _RecordingTuner(_compat.TunerOverrides):
    """Tuner mixin: reports each trial's `epochs` and `seconds` with its
    metrics (so they reach the chief's oracle over gRPC), writes a failed
    trial's error to `trial_<id>/error.txt`, and serves the chief's oracle
    with short polls. With a `device_budget` (`hlkeras.search.budget`), it
    exports and measures each trial's model and scores it against the
    budget."""

    device_budget = None

    def run_trial(self, trial, *args, **kwargs):
        start = time.perf_counter()
        # Which tuner ran the trial, for the report (workers share the directory).
        _files.atomic_write_text(
            os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_TUNER_FILE), self.tuner_id
        )
        try:
            histories = super().run_trial(trial, *args, **kwargs)
        except Exception as error:
            path = os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_ERROR_FILE)
            _files.atomic_write_text(path, _error_line(error) + "\n")
            print(f"trial {trial.trial_id} failed: {_error_line(error)}", flush=True)
            raise
        objective = self.oracle.objective.name
        metrics = _compat.trial_metrics(histories, self.oracle.objective)
        metrics["epochs"] = float(len(histories[-1].epoch))
        metrics["seconds"] = time.perf_counter() - start
        measured = ""
        if self.device_budget is not None:
            measured = self._measure_on_device(trial, metrics, args[0], kwargs["validation_data"])
        trained = metrics.get(TRAINED + objective, metrics[objective])
        print(
            f"trial {trial.trial_id}: {objective}={trained:.4f} "
            f"after {int(metrics['epochs'])} epochs, {metrics['seconds']:.1f}s{measured} "
            f"({self.tuner_id})",
            flush=True,
        )
        return metrics

    def _measure_on_device(self, trial, metrics, x_train, validation_data):
        """Exports the trial's best epoch, records its size and latency with
        `metrics`, and replaces the objective with `budget.oracle_score`.
        Returns the measurements for the trial's log line."""
        objective = self.oracle.objective.name
        with warnings.catch_warnings():
            # The checkpoint holds the optimizer's state too; the export
            # needs only the weights.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = self.load_model(trial)  # the best epoch, which the oracle scores
        measured = budget.measure_on_device(
            model,
            self.device_budget,
            self.get_trial_dir(trial.trial_id),
            x_train,
            validation_data,
        )
        metrics[TRAINED + objective] = metrics[objective]
        metrics[objective] = budget.oracle_score(metrics[objective], measured, self.device_budget)
        # Metrics travel to a chief's oracle over gRPC; the status text
        # stays in device.json.
        for key in budget.MEASUREMENT_METRICS:
            if measured[key] is not None:
                metrics[key] = float(measured[key])
        if measured["refused"]:
            return f"; {measured['refused']}"
        return (
            f"; .tflite {measured['tflite_kb']:.1f} KiB, {measured['latency_ms']:.3f} ms, "
            f"accuracy {measured['tflite_accuracy']:.4f}: {measured['budget']}"
        )

    def search(self, *args, **kwargs):
        if _compat.kerastuner_role() == "chief":
            self.save()
            _compat.serve_oracle(self.oracle)
            return
        super().search(*args, **kwargs)


class RandomSearchTuner(_RecordingTuner, kt.RandomSearch):
    """`keras_tuner.RandomSearch` with hlkeras' trial records (`make_tuner`)."""


class BayesianTuner(_RecordingTuner, kt.BayesianOptimization):
    """`keras_tuner.BayesianOptimization` with hlkeras' trial records (`make_tuner`)."""


class HyperbandTuner(_RecordingTuner, kt.Hyperband):
    """`keras_tuner.Hyperband` with hlkeras' trial records (`make_tuner`)."""


def _atomic_save_json(path, obj):
    _files.atomic_write_text(os.fspath(path), json.dumps(obj))


def make_tuner(
    kind,
    hypermodel,
    *,
    directory,
    objective="val_accuracy",
    max_trials=10,
    max_epochs=10,
    seed=0,
    device_budget=None,
):
    """A resumable KerasTuner tuner writing to `directory/search`.

    Args:
        kind: `"random"`, `"bayesian"` or `"hyperband"`.
        hypermodel: A `SpecHyperModel`.
        directory: The search directory; an existing search there resumes.
        objective: A logged metric, minimized if it is a loss, else maximized.
        max_trials: Positive int; for Hyperband, a cap on its own schedule.
        max_epochs: Positive int, Hyperband's largest epoch budget per trial
            (the other tuners take `epochs` in `search`).
        seed: Int, the oracle's seed.
        device_budget: A `hlkeras.search.budget.DeviceBudget`, or None.
    """
    if kind not in TUNERS:
        raise ValueError(f"Argument `kind` must be one of {list(TUNERS)}. Received: kind={kind!r}")
    common = {
        "objective": kt.Objective(objective, training.monitor_mode(objective)),
        "seed": seed,
        "max_consecutive_failed_trials": MAX_CONSECUTIVE_FAILED_TRIALS,
        "directory": directory,
        "project_name": SEARCH_PROJECT,
        "overwrite": False,
    }
    if kind == "random":
        tuner = RandomSearchTuner(hypermodel, max_trials=max_trials, **common)
    elif kind == "bayesian":
        tuner = BayesianTuner(
            hypermodel, max_trials=max_trials, num_initial_points=min(max_trials, 3), **common
        )
    else:
        tuner = HyperbandTuner(hypermodel, max_epochs=max_epochs, factor=3, **common)
        if isinstance(tuner.oracle, kt.Oracle):
            # Hyperband has no `max_trials` argument; the base oracle honours one.
            tuner.oracle.max_trials = max_trials
    tuner.device_budget = device_budget
    # KerasTuner writes its state files in place; a SIGKILL mid-write would
    # leave a file the resume cannot parse.
    _compat.save_tuner_state_with(tuner, _atomic_save_json)
    if isinstance(tuner.oracle, kt.Oracle):
        # The oracle (here, or a chief's) was reloaded in the constructor.
        _compat.record_only_running_trials_as_ongoing(tuner.oracle)
        _compat.retry_orphaned_running_trials(tuner.oracle)
    return tuner


def search_config(
    *, arch, dataset, tuner, objective, max_epochs, space, device_budget=None, distillation=None
):
    """The fingerprint of a search: what must match for a rerun to resume
    (a search recorded before `distillation` existed had none)."""
    return {
        "distillation": distillation,
        "device_budget": device_budget.to_config() if device_budget else None,
        "arch": arch,
        "dataset": dataset,
        "tuner": tuner,
        "objective": objective,
        "max_epochs": max_epochs,
        "space": space,
    }


def check_search_dir(directory, config, *, record=True):
    """Refuses a `directory` that holds a search with a different fingerprint.

    On first use it records `config` in `directory/search_config.json`.

    Returns:
        True when `directory` already held this search (a resume).

    Raises:
        ValueError: naming what differs between the recorded search and
            `config`.
    """
    path = os.path.join(directory, SEARCH_CONFIG_JSON)
    if not os.path.exists(path):
        # oracle.json, not the project folder: workers create the folder too.
        if os.path.exists(os.path.join(directory, SEARCH_PROJECT, "oracle.json")):
            raise ValueError(
                f"--dir {directory} holds a KerasTuner project without "
                f"{SEARCH_CONFIG_JSON}; it cannot tell which search it is. Use a new --dir."
            )
        if record:
            os.makedirs(directory, exist_ok=True)
            _files.atomic_write_json(path, config)
        return False
    with open(path) as f:
        recorded = json.load(f)
    for key in config:
        if recorded.get(key) == config[key]:
            continue
        if key == "space":
            keys = sorted(
                k
                for k in set(recorded.get("space", {})) | set(config["space"])
                if recorded.get("space", {}).get(k) != config["space"].get(k)
            )
            detail = f"the space differs in {keys}"
        elif key == "device_budget":
            # Trials measured against one budget cannot be scored against another.
            detail = (
                f"it was searched {_budget_words(recorded.get(key))}, this run "
                f"is {_budget_words(config[key])}"
            )
        else:
            detail = f"it has {key}={recorded.get(key)!r}, this run asks for {config[key]!r}"
        raise ValueError(
            f"--dir {directory} holds a different search, so it cannot resume: "
            f"{detail}. Use a new --dir, or the recorded settings "
            f"({SEARCH_CONFIG_JSON}) to continue it."
        )
    return True


def _budget_words(config):
    if config is None:
        return "without a device budget"
    return f"with the device budget {budget.DeviceBudget(**config).describe()}"


def run_trials(
    tuner,
    x,
    y,
    *,
    validation_data,
    epochs,
    patience=3,
    verbose=0,
):
    """Runs `tuner.search` with early stopping per trial on `objective`."""
    objective = tuner.oracle.objective.name
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=objective,
        mode=tuner.oracle.objective.direction,
        patience=patience,
    )
    tuner.search(
        x,
        y,
        validation_data=validation_data,
        epochs=epochs,
        callbacks=[early_stopping],
        shuffle=True,
        verbose=verbose,
    )
    return tuner
