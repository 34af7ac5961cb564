"""Hyperparameter search over the hlkeras model builders with KerasTuner.

A `SpecHyperModel` maps KerasTuner's `hp` to a `hlkeras.models.build` spec
plus the training hyperparameters (`lr`, `weight_decay`, `batch_size`), and
compiles the model with `hlkeras.training.compile_model`. The default space of
each architecture lives in one table, `SEARCH_SPACES`, written in the same
notation a user narrows it with (a dict, or a TOML/JSON file):

    depth = [2, 6]                               # an inclusive range
    lr = {min = 1e-4, max = 3e-3, log = true}    # a range with options
    width = {values = [64, 128]}                 # a choice
    dropout = 0.1                                # fixed
    arch = "vit"

The search directory is resumable: KerasTuner writes the oracle and every trial
to `DIR/search/` (atomically here, so a SIGKILL never leaves a half-written
file), a rerun reloads them, completed trials stay done and the trial that
was running is run again. `DIR/search_config.json` records the search's
fingerprint (architecture, dataset, tuner, objective, epochs, space) so a
rerun asking for a different search refuses instead of mixing the two.
"""

import copy
import csv
import io
import json
import math
import os
import shutil
import time
import tomllib

import keras
import keras_tuner as kt
from keras_tuner.src import utils as kt_utils
from keras_tuner.src.distribute import utils as kt_distribute
from keras_tuner.src.engine import tuner_utils

from hlkeras import _validation
from hlkeras import models
from hlkeras import training

TUNERS = ("random", "bayesian", "hyperband")
# Hyperparameters of the training recipe rather than of the model builder.
TRAINING_KEYS = ("lr", "weight_decay", "batch_size")

_TRAINING_SPACE = {
    "lr": {"min": 3e-4, "max": 1e-2, "log": True},
    "weight_decay": 1e-4,
    "batch_size": {"values": [32, 64, 128]},
}

# The default search space of each architecture. `vit` keys follow
# `hlkeras.models.vit` (depth, width, num_heads, patch_size, dropout,
# num_experts, top_k); the space works as soon as `build({"arch": "vit"})`
# does. Widths are multiples of every head count so defaults never conflict.
SEARCH_SPACES = {
    "mlp": {
        "depth": {"min": 1, "max": 4},
        "width": {"values": [32, 64, 128, 256]},
        "dropout": {"min": 0.0, "max": 0.3, "step": 0.05},
        **_TRAINING_SPACE,
    },
    "resnet": {
        "depth": {"min": 1, "max": 3},
        "width": {"values": [16, 32, 64]},
        "dropout": {"min": 0.0, "max": 0.3, "step": 0.05},
        **_TRAINING_SPACE,
    },
    "vit": {
        "depth": {"min": 1, "max": 4},
        "width": {"values": [32, 64, 128]},
        "num_heads": {"values": [1, 2, 4]},
        "patch_size": {"values": [2, 4]},
        "dropout": {"min": 0.0, "max": 0.3, "step": 0.05},
        "num_experts": {"values": [0, 4, 8]},
        "top_k": {"values": [1, 2]},
        **_TRAINING_SPACE,
    },
}

SEARCH_PROJECT = "search"
SEARCH_CONFIG_JSON = "search_config.json"
TRIALS_CSV = "trials.csv"
TRIALS_PNG = "trials.png"
BEST_SPEC_JSON = "best_spec.json"
BEST_TRIAL_JSON = "best_trial.json"
BEST_MODEL = "best.keras"
RETRAIN_DIR = "retrain"
TRIAL_ERROR_FILE = "error.txt"
TRIAL_TUNER_FILE = "tuner_id.txt"
# A search stops only after this many failed trials in a row (KerasTuner's
# default of 3 would end a search at a short run of impossible combinations).
MAX_CONSECUTIVE_FAILED_TRIALS = 10
_RANGE_FIELDS = ("min", "max", "step", "log")


# --- Space files --------------------------------------------------------------


def load_space(source):
    """Reads space overrides from a dict, or a `.toml` / `.json` file path.

    Returns:
        A dict of overrides (the format is checked by `resolve_space`).

    Raises:
        ValueError: for a missing file, an unknown extension, or a file
            that does not parse (with the parser's message).
    """
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = os.fspath(source)
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".toml", ".json"):
        raise ValueError(f"A space file must end in .toml or .json. Received: {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"The space file {path!r} does not exist.")
    try:
        with open(path, "rb") as f:
            overrides = tomllib.load(f) if extension == ".toml" else json.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"The space file {path!r} does not parse: {error}") from None
    if not isinstance(overrides, dict):
        raise ValueError(
            f"The space file {path!r} must hold a table of keys. Received: {overrides!r}"
        )
    return overrides


def space_arch(overrides, default="mlp"):
    """The `arch` an overrides dict names, or `default`."""
    arch = overrides.get("arch", default)
    if arch not in SEARCH_SPACES:
        raise ValueError(
            f"space['arch'] must be one of {sorted(SEARCH_SPACES)}. Received: arch={arch!r}"
        )
    return arch


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _value_kind(entry):
    """'int' or 'float' for a numeric canonical entry, else None."""
    if entry is None:
        return None
    if "type" in entry:
        return entry["type"]
    values = entry["values"] if "values" in entry else [entry["fixed"]]
    if all(_is_int(v) for v in values):
        return "int"
    if all(_validation.is_number(v) for v in values):
        return "float"
    return None


def _parse_range(key, fields, default):
    """`{"min", "max"[, "step", "log"]}` → a canonical range entry."""
    unknown = sorted(set(fields) - set(_RANGE_FIELDS))
    if unknown or "min" not in fields or "max" not in fields:
        raise ValueError(
            f"space[{key!r}]: a range needs `min` and `max` and may have `step` "
            f"and `log`; use {{values = [...]}} for a choice. Received: {fields!r}"
        )
    low, high = fields["min"], fields["max"]
    if not (_validation.is_number(low) and _validation.is_number(high)):
        raise ValueError(
            f"space[{key!r}]: `min` and `max` must be numbers. Received: min={low!r}, max={high!r}"
        )
    if not low < high:
        raise ValueError(
            f"space[{key!r}]: `min` must be less than `max` (give one value to fix "
            f"it). Received: min={low!r}, max={high!r}"
        )
    inherited = default if default and "min" in default else {}
    kind = _value_kind(default) or ("int" if _is_int(low) and _is_int(high) else "float")
    if kind == "int" and not (_is_int(low) and _is_int(high)):
        raise ValueError(
            f"space[{key!r}] is an integer hyperparameter; `min` and `max` must be "
            f"integers. Received: min={low!r}, max={high!r}"
        )
    log = fields.get("log", inherited.get("log", False))
    if not isinstance(log, bool):
        raise ValueError(f"space[{key!r}]: `log` must be true or false. Received: log={log!r}")
    if log and low <= 0:
        raise ValueError(
            f"space[{key!r}]: a log-scale range needs `min` > 0. Received: min={low!r}"
        )
    step = fields.get("step", None if log else inherited.get("step"))
    if step is not None and (
        not _validation.is_number(step) or step <= 0 or (kind == "int" and not _is_int(step))
    ):
        raise ValueError(
            f"space[{key!r}]: `step` must be a positive {kind}. Received: step={step!r}"
        )
    if log and step is not None:
        raise ValueError(f"space[{key!r}]: give `step` or `log = true`, not both.")
    if kind == "float":
        low, high = float(low), float(high)
    return {"type": kind, "min": low, "max": high, "step": step, "log": log}


def _parse_choice(key, values, default):
    scalar_types = (bool, int, float, str)
    if not isinstance(values, list) or not values:
        raise ValueError(f"space[{key!r}]: `values` must be a non-empty list. Received: {values!r}")
    if not all(isinstance(v, scalar_types) for v in values):
        raise ValueError(
            f"space[{key!r}]: choices must be numbers, strings or booleans. Received: {values!r}"
        )
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"space[{key!r}]: `values` has duplicates. Received: {values!r}")
    if _value_kind(default) == "int" and not all(_is_int(v) for v in values):
        raise ValueError(
            f"space[{key!r}] is an integer hyperparameter; its values must be "
            f"integers. Received: {values!r}"
        )
    return {"values": list(values)}


def parse_entry(key, raw, default=None):
    """One space entry in user notation → its canonical dict.

    Canonical forms: `{"fixed": v}`, `{"values": [...]}`, or
    `{"type": "int"|"float", "min", "max", "step", "log"}`. A range inherits
    `log` and `step` from `default` (the table's canonical entry) unless given.
    """
    if isinstance(raw, (bool, int, float, str)):
        if _value_kind(default) == "int" and not _is_int(raw):
            raise ValueError(f"space[{key!r}] is an integer hyperparameter. Received: {raw!r}")
        return {"fixed": raw}
    if isinstance(raw, list):
        if len(raw) != 2:
            raise ValueError(
                f"space[{key!r}]: a list must be an inclusive range [min, max] of two "
                f"numbers; write {{values = [...]}} for a choice. Received: {raw!r}"
            )
        return _parse_range(key, {"min": raw[0], "max": raw[1]}, default)
    if isinstance(raw, dict):
        if "values" in raw:
            if set(raw) != {"values"}:
                raise ValueError(f"space[{key!r}]: a choice has only `values`. Received: {raw!r}")
            return _parse_choice(key, raw["values"], default)
        return _parse_range(key, raw, default)
    raise ValueError(
        f"space[{key!r}] must be a value, a [min, max] list, a {{min, max}} table "
        f"or a {{values = [...]}} table. Received: {raw!r}"
    )


def tunable_keys(arch):
    """The keys a space for `arch` may set: its table, the builder's
    keyword arguments (once the builder exists) and the training keys."""
    keys = set(SEARCH_SPACES[arch]) | set(TRAINING_KEYS)
    if arch in models.ARCHITECTURES:
        keys |= set(models.hyperparameter_defaults(arch))
    return sorted(keys)


def resolve_space(arch, overrides=None):
    """The full canonical space of `arch`: the table's defaults with
    `overrides` (a dict from `load_space`) applied.

    Args:
        arch: A key of `SEARCH_SPACES`.
        overrides: Dict of entries in user notation; an `arch` key must agree
            with `arch`.

    Returns:
        `{key: canonical entry}`, sorted by key, JSON-friendly.

    Raises:
        ValueError: naming the key and what is wrong with it.

    Example:

    >>> space = resolve_space("mlp", {"depth": [2, 3], "dropout": 0.0})
    >>> space["depth"], space["dropout"]
    ({'type': 'int', 'min': 2, 'max': 3, 'step': None, 'log': False}, {'fixed': 0.0})
    """
    overrides = dict(overrides or {})
    if space_arch(overrides, default=arch) != arch:
        raise ValueError(
            f"space['arch'] is {overrides['arch']!r} but the search is for arch={arch!r}."
        )
    overrides.pop("arch", None)
    allowed = tunable_keys(arch)
    space = {}
    for key, raw in SEARCH_SPACES[arch].items():
        space[key] = parse_entry(key, raw)
    for key, raw in overrides.items():
        if key not in allowed:
            raise ValueError(
                f"space[{key!r}] is not a hyperparameter of arch={arch!r}. Allowed keys: {allowed}"
            )
        space[key] = parse_entry(key, raw, space.get(key))
    return dict(sorted(space.items()))


# --- HyperModels ----------------------------------------------------------------


def declare(hp, key, entry):
    """Declares one canonical entry on `hp` and returns its current value."""
    if "fixed" in entry:
        return hp.Fixed(key, entry["fixed"])
    if "values" in entry:
        return hp.Choice(key, entry["values"])
    sampling = "log" if entry["log"] else "linear"
    if entry["type"] == "int":
        return hp.Int(key, entry["min"], entry["max"], step=entry["step"], sampling=sampling)
    return hp.Float(key, entry["min"], entry["max"], step=entry["step"], sampling=sampling)


class SpecHyperModel(kt.HyperModel):
    """A KerasTuner `HyperModel` for one hlkeras architecture.

    `build(hp)` samples the space, builds `hlkeras.models.build(spec)` and
    compiles it with AdamW at the sampled `lr` and `weight_decay` (warmup +
    cosine over `epochs` when `num_train` and `epochs` are given, so trials
    train like `hlkeras train`). `fit` trains with the sampled `batch_size`,
    so `x`/`y` are arrays (e.g. from `hlkeras.data.to_numpy`).

    Args:
        arch: A key of `SEARCH_SPACES` (`"mlp"`, `"resnet"`, `"vit"`).
        input_shape: The images' shape without the batch axis.
        num_classes: Positive int.
        space: Overrides in user notation (dict), or None for the defaults.
        num_train: Number of training examples (for the schedule length).
        epochs: Epochs of a full trial (for the schedule length).

    Example:

    >>> hypermodel = SpecHyperModel("mlp", (8, 8, 1), 10, space={"depth": 1, "width": 32})
    >>> model = hypermodel.build(keras_tuner.HyperParameters())
    >>> model.name
    'mlp'
    """

    def __init__(self, arch, input_shape, num_classes, space=None, *, num_train=None, epochs=None):
        super().__init__(name=f"hlkeras_{arch}")
        space_arch({"arch": arch})
        self.arch = arch
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.space = resolve_space(arch, load_space(space))
        self.num_train = num_train
        self.epochs = epochs

    def declare_hyperparameters(self, hp):
        for key, entry in self.space.items():
            declare(hp, key, entry)

    def values(self, hp):
        """`{key: value}` of this hypermodel's space, declared on `hp`."""
        return {key: declare(hp, key, entry) for key, entry in self.space.items()}

    def spec(self, values):
        """The resolved `hlkeras.models` spec for a dict of sampled values."""
        spec = {
            "arch": self.arch,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }
        spec.update({k: v for k, v in values.items() if k not in TRAINING_KEYS})
        return models.resolve_spec(spec)

    def build(self, hp):
        values = self.values(hp)
        model = models.build(self.spec(values))
        schedule = {}
        if self.num_train and self.epochs:
            steps_per_epoch = math.ceil(self.num_train / values["batch_size"])
            schedule = {
                "total_steps": steps_per_epoch * self.epochs,
                "warmup_steps": steps_per_epoch,
            }
        return training.compile_model(
            model,
            learning_rate=values["lr"],
            weight_decay=values["weight_decay"],
            **schedule,
        )

    def fit(self, hp, model, *args, **kwargs):
        return model.fit(*args, batch_size=hp.get("batch_size"), **kwargs)


# --- Tuners -----------------------------------------------------------------------


def _atomic_save_json(path, obj):
    text = json.dumps(obj)
    training.atomic_write_text(os.fspath(path), text)
    return text


def _install_atomic_json():
    # Every KerasTuner state file (oracle.json, trial.json, tuner0.json) goes
    # through `keras_tuner.src.utils.save_json`, which writes in place; a
    # SIGKILL mid-write would leave a file the resume cannot parse.
    kt_utils.save_json = _atomic_save_json


def _error_line(error):
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"


class _RecordingTuner:
    """Tuner mixin: reports each trial's `epochs` and `seconds` with its
    metrics (so they reach the chief's oracle over gRPC), writes a failed
    trial's error to `trial_<id>/error.txt`, and serves the chief's oracle
    with short polls."""

    def run_trial(self, trial, *args, **kwargs):
        start = time.perf_counter()
        # Which tuner ran the trial, for the report (workers share the directory).
        training.atomic_write_text(
            os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_TUNER_FILE), self.tuner_id
        )
        try:
            histories = super().run_trial(trial, *args, **kwargs)
        except Exception as error:
            path = os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_ERROR_FILE)
            training.atomic_write_text(path, _error_line(error) + "\n")
            print(f"trial {trial.trial_id} failed: {_error_line(error)}", flush=True)
            raise
        objective = self.oracle.objective.name
        metrics = dict(tuner_utils.convert_to_metrics_dict(histories, self.oracle.objective))
        metrics["epochs"] = float(len(histories[-1].epoch))
        metrics["seconds"] = time.perf_counter() - start
        print(
            f"trial {trial.trial_id}: {objective}={metrics[objective]:.4f} after "
            f"{int(metrics['epochs'])} epochs, {metrics['seconds']:.1f}s ({self.tuner_id})",
            flush=True,
        )
        return metrics

    def _populate_initial_space(self):
        # The space is flat (no conditional scopes), so declaring it is
        # enough. KerasTuner's default also builds a model from the default
        # values, and would abort the whole search if that one combination
        # is impossible, instead of failing just that trial.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        # KerasTuner 1.4.8 imports `tensorboard` on the TF backend for every
        # trial, TensorBoard callback or not; tensorflow-cpu 2.21 does not
        # install it, so every trial would fail with ModuleNotFoundError.
        if any(type(c).__name__ == "TensorBoard" for c in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)

    def search(self, *args, **kwargs):
        if kt_distribute.is_chief_oracle():
            self.save()
            serve_oracle(self.oracle)
            return
        super().search(*args, **kwargs)


class RandomSearchTuner(_RecordingTuner, kt.RandomSearch):
    """`keras_tuner.RandomSearch` with hlkeras' trial records (`make_tuner`)."""


class BayesianTuner(_RecordingTuner, kt.BayesianOptimization):
    """`keras_tuner.BayesianOptimization` with hlkeras' trial records (`make_tuner`)."""


class HyperbandTuner(_RecordingTuner, kt.Hyperband):
    """`keras_tuner.Hyperband` with hlkeras' trial records (`make_tuner`)."""


def serve_oracle(oracle, poll_seconds=0.2):
    """Runs the chief: serves `oracle` over KerasTuner's gRPC service on
    `$KERASTUNER_ORACLE_IP:$KERASTUNER_ORACLE_PORT` until the oracle stopped
    handing out trials and no worker is running one.

    KerasTuner's own `start_server` does the same with 20 s polls.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    if not server.add_insecure_port(address):
        raise RuntimeError(f"The chief cannot listen on {address}.")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1.0)
        oracle.save()


def make_tuner(
    kind,
    hypermodel,
    *,
    directory,
    objective="val_accuracy",
    max_trials=10,
    max_epochs=10,
    seed=0,
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
    """
    if kind not in TUNERS:
        raise ValueError(f"Argument `kind` must be one of {list(TUNERS)}. Received: kind={kind!r}")
    _install_atomic_json()
    common = {
        "objective": kt.Objective(objective, "min" if "loss" in objective else "max"),
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
    if isinstance(tuner.oracle, kt.Oracle):
        _record_only_running_trials_as_ongoing(tuner.oracle)
    return tuner


def _record_only_running_trials_as_ongoing(oracle):
    """Makes `oracle.json` list a trial as ongoing only while it runs.

    `Oracle.end_trial` saves its state before it drops the finished trial
    from `ongoing_trials`, and a reload sends every ongoing trial to be run
    again. A kill right after that save (or a chief, which saves nothing
    more) would re-run a completed trial on resume.
    """
    get_state = oracle.get_state

    def get_state_of_running_trials():
        state = get_state()
        state["ongoing_trials"] = {
            tuner_id: trial_id
            for tuner_id, trial_id in state["ongoing_trials"].items()
            if oracle.trials[trial_id].status == "RUNNING"
        }
        return state

    oracle.get_state = get_state_of_running_trials


def search_config(*, arch, dataset, tuner, objective, max_epochs, space):
    """The fingerprint of a search: what must match for a rerun to resume."""
    return {
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
            training.atomic_write_json(path, config)
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
        else:
            detail = f"it has {key}={recorded.get(key)!r}, this run asks for {config[key]!r}"
        raise ValueError(
            f"--dir {directory} holds a different search, so it cannot resume: "
            f"{detail}. Use a new --dir, or the recorded settings "
            f"({SEARCH_CONFIG_JSON}) to continue it."
        )
    return True


def search(
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


# --- Reports ------------------------------------------------------------------------


def _read_trial_file(project_dir, trial, name):
    path = os.path.join(project_dir, f"trial_{trial.trial_id}", name)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return None


def _trial_error(project_dir, trial):
    # The error file is written where the trial ran; the oracle's message
    # does not travel over gRPC.
    written = _read_trial_file(project_dir, trial, TRIAL_ERROR_FILE)
    if written is not None:
        return written
    lines = [line for line in (trial.message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _metric(trial, name):
    if trial.metrics.exists(name):
        return trial.metrics.get_last_value(name)
    return None


def trial_rows(oracle, project_dir):
    """One dict per trial of `oracle`, in trial order: `trial`, `status`,
    `score`, `epochs`, `seconds`, every hyperparameter, and `error`."""
    rows = []
    for trial_id in sorted(oracle.trials, key=lambda t: (len(t), t)):
        trial = oracle.trials[trial_id]
        epochs = _metric(trial, "epochs")
        row = {
            "trial": trial_id,
            "status": trial.status,
            "score": trial.score if trial.status == "COMPLETED" else None,
            "epochs": int(epochs) if epochs is not None else None,
            "seconds": _metric(trial, "seconds"),
            "tuner": _read_trial_file(project_dir, trial, TRIAL_TUNER_FILE) or "",
        }
        row.update(trial.hyperparameters.values)
        row["error"] = _trial_error(project_dir, trial) if trial.status != "COMPLETED" else ""
        rows.append(row)
    return rows


def write_trials_csv(path, rows):
    """`rows` (from `trial_rows`) as CSV, columns in a stable order."""
    fixed = ["trial", "status", "score", "epochs", "seconds", "tuner"]
    hyperparameters = sorted({k for row in rows for k in row} - set(fixed) - {"error"})
    columns = fixed + hyperparameters + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    training.atomic_write_text(path, buffer.getvalue())


def read_trials_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ranked(rows, direction="max"):
    """The completed rows, best score first."""
    completed = [row for row in rows if row["status"] == "COMPLETED" and row["score"] is not None]
    return sorted(completed, key=lambda row: row["score"], reverse=direction == "max")


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def leaderboard(rows, space, objective, direction="max", top=5):
    """The best `top` completed trials as text lines (a header first)."""
    tuned = [k for k, entry in space.items() if "fixed" not in entry]
    header = ["rank", "trial", objective, "epochs", "seconds"] + tuned
    table = [header]
    for rank, row in enumerate(ranked(rows, direction)[:top], start=1):
        table.append(
            [
                str(rank),
                row["trial"],
                f"{row['score']:.4f}",
                str(row["epochs"]),
                f"{row['seconds']:.1f}",
            ]
            + [_format_value(row.get(k)) for k in tuned]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table]
    failed = sum(row["status"] != "COMPLETED" for row in rows)
    lines.append(
        f"{len(rows)} trials, {len(rows) - failed} completed, {failed} failed or unfinished"
    )
    return lines


def plot_trials(rows, space, objective, path):
    """Writes a PNG: the score of each trial, then the score against each
    tuned numeric hyperparameter (log axis for log ranges). Failed trials
    are marked on the trial axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tuned = [
        k for k, entry in space.items() if "fixed" not in entry and _value_kind(entry) is not None
    ][:4]
    figure = Figure(figsize=(4 * (1 + len(tuned)), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    completed = [row for row in rows if row["status"] == "COMPLETED" and row["score"] is not None]
    axes = figure.add_subplot(1, 1 + len(tuned), 1)
    axes.plot([int(r["trial"]) for r in completed], [r["score"] for r in completed], "o")
    failed = [int(r["trial"]) for r in rows if r["status"] != "COMPLETED"]
    if failed and completed:
        low = min(r["score"] for r in completed)
        axes.plot(failed, [low] * len(failed), "x", color="red", label="failed")
        axes.legend()
    axes.set_xlabel("trial")
    axes.set_ylabel(objective)
    axes.set_title("score per trial")
    axes.grid(alpha=0.3)
    for i, key in enumerate(tuned):
        axes = figure.add_subplot(1, 1 + len(tuned), i + 2)
        points = [(r[key], r["score"]) for r in completed if r.get(key) is not None]
        axes.plot([p[0] for p in points], [p[1] for p in points], "o")
        if space[key].get("log"):
            axes.set_xscale("log")
        axes.set_xlabel(key)
        axes.set_title(f"{objective} vs {key}")
        axes.grid(alpha=0.3)
    partial = training._partial_path(path, ".png")
    figure.savefig(partial, dpi=100)
    os.replace(partial, path)


def best_values(rows, space, direction="max"):
    """The space's values of the best completed row, or None."""
    best = ranked(rows, direction)
    if not best:
        return None
    return {key: best[0][key] for key in space}


def write_reports(tuner, hypermodel, directory):
    """Writes `trials.csv`, `trials.png`, `best_spec.json` and
    `best_trial.json` into `directory` and returns `(rows, best_values)`;
    `best_values` is None when no trial completed."""
    objective = tuner.oracle.objective
    rows = trial_rows(tuner.oracle, tuner.project_dir)
    write_trials_csv(os.path.join(directory, TRIALS_CSV), rows)
    plot_trials(rows, hypermodel.space, objective.name, os.path.join(directory, TRIALS_PNG))
    values = best_values(rows, hypermodel.space, objective.direction)
    if values is not None:
        best = ranked(rows, objective.direction)[0]
        training.atomic_write_json(os.path.join(directory, BEST_SPEC_JSON), hypermodel.spec(values))
        training.atomic_write_json(
            os.path.join(directory, BEST_TRIAL_JSON),
            {"trial": best["trial"], objective.name: best["score"], "hyperparameters": values},
        )
    return rows, values


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
    record = {"spec": spec, "training": {k: values[k] for k in TRAINING_KEYS}, "epochs": epochs}
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
    training.atomic_write_json(record_path, record)
    result = training.compile_and_fit(
        models.build(spec),
        train_ds,
        val_ds,
        run_dir=run_dir,
        epochs=epochs,
        learning_rate=values["lr"],
        weight_decay=values["weight_decay"],
        patience=patience,
        verbose=verbose,
    )
    if result.best_path and result.nan_epoch is None:
        partial = training._partial_path(target, ".keras")
        shutil.copyfile(result.best_path, partial)
        os.replace(partial, target)
        training.atomic_write_json(done_path, record)
    return result
