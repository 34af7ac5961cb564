"""A training run: its directory (`RunDir`) and the train -> evaluate ->
export -> verify flow of `hlkeras train`, as one library call (`train_run`).

A run directory holds `spec.json` (the model spec, `hlkeras.models.build`),
`train_config.json` (the settings), the training files of
`hlkeras.training` (`best.keras`, `history.csv`, `curves.png`, `backup/`),
then `model.keras`, `model.tflite` (only when it passes the per-sample
check of `hlkeras.export`) and `metrics.json`, written last: a run with
`metrics.json` has finished. Every file is written to a temporary name and
renamed into place.

Example:

```python
from hlkeras.training import runs

run_dir, resuming = runs.RunDir.open("runs/vit", resume=False, overwrite=False)
settings = runs.settings_for(run_dir, resuming, {"epochs": 10})
outcome = runs.train_run(settings, run_dir, resuming=resuming)
print(outcome.metrics["test_accuracy"], outcome.refused)
```
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

from hlkeras import _files
from hlkeras import _validation
from hlkeras.data.settings import DATA_FILE_DEFAULTS

# The settings of a run and their defaults (the `hlkeras train` flags; the
# error messages name them as flags). `experts` None means
# MOE_EXPERTS_DEFAULT for the archs in MOE_BY_DEFAULT and none for the others.
TRAIN_DEFAULTS = {
    "arch": None,  # DEFAULT_ARCH by the data's kind
    "dataset": None,  # the embedded digits unless --data is given
    "data": None,
    **DATA_FILE_DEFAULTS,
    "augment": True,  # images only
    "data_dir": None,
    # 60 epochs with patience 15: with augmented batches the validation loss
    # keeps improving late (benchmarks/train.py).
    "epochs": 60,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "clipnorm": None,
    "encoder": None,  # text: transformer (hlkeras.models.text's default), gru or lstm
    "depth": None,
    "width": None,
    "dropout": None,
    "experts": None,
    # None: dropless MoE (every token reaches its top-k experts). A capacity
    # factor of 1.25 per example drops 17-22% of the assignments on digits.
    "capacity_factor": None,
    "seed": 0,
    "patience": 15,
    "mixed_precision": False,
    "distribute": None,  # hlkeras.training.distribute.STRATEGIES: data or model (JAX)
    "mesh": None,  # "BATCHxMODEL" for --distribute model
}
MOE_EXPERTS_DEFAULT = 4
# The arch of a run that names none, by `DatasetInfo.kind`. On the digits a
# resnet scores 98.9-99.4% test (seeds 0-2) where the vit+MoE scores
# 95.0-98.1% in the same time (benchmarks/train.py); the vit stays one flag away.
DEFAULT_ARCH = {"images": "resnet", "table": "mlp", "text": "text"}
# The archs whose FFNs are MoE unless --experts 0 (a text transformer's are
# dense unless --experts N).
MOE_BY_DEFAULT = ("vit",)


class RunError(ValueError):
    """A user mistake about a run (its settings or directory), in one line."""


class RunDir:
    """A run directory: every file name in it, and create / resume / overwrite.

    Attributes:
        path: The directory.
    """

    SPEC = "spec.json"
    CLASS_NAMES = "class_names.json"
    VOCABULARY = "vocabulary.json"  # hlkeras.data.texts.VOCABULARY_FILE
    CONFIG = "train_config.json"
    MODEL = "model.keras"
    TFLITE = "model.tflite"
    METRICS = "metrics.json"
    DIAGNOSTICS = "diagnostics.json"
    HIDDEN_LAYERS = "hidden_layers.png"
    # Files a run directory may hold, in the order the closing block of
    # `hlkeras train` lists them, with what each is; an overwrite deletes
    # only these and DIRS.
    FILE_ROLES = {
        MODEL: "the trained model (weights of the best epoch)",
        TFLITE: "float32 TFLite, verified sample by sample at batch 1",
        METRICS: "test accuracy, LiteRT parity and timings",
        "history.csv": "per-epoch metrics (and per-layer MoE statistics)",
        "curves.png": "loss, accuracy and learning-rate curves",
        "best.keras": "checkpoint of the best epoch (by validation loss)",
        SPEC: "the model spec: hlkeras.models.build(spec) rebuilds it",
        CLASS_NAMES: "class index -> name, for hlkeras predict",
        VOCABULARY: "the tokenizer: vocabulary and max length, for hlkeras predict",
        CONFIG: "the settings, which --resume reuses",
        DIAGNOSTICS: "--diagnose: each hidden layer's statistics per epoch, the warnings",
        HIDDEN_LAYERS: "--diagnose: outputs, gradient norms and dead units per layer",
    }
    FILES = tuple(FILE_ROLES)
    DIRS = ("backup", "logs")

    def __init__(self, path, overwrite=False):
        self.path = path
        self.overwrite = overwrite

    def file(self, name):
        """The path of `name` inside the run directory."""
        return os.path.join(self.path, name)

    @classmethod
    def open(cls, out, *, resume=False, overwrite=False):
        """Returns `(RunDir, resuming)` for `out`; never overwrites a run
        without `resume` or `overwrite`. Nothing is created or deleted here:
        `prepare` does that once the settings and the data checked out, so a
        mistake leaves no empty directory and no half-cleared run. With
        `out=None` the path is `runs/<timestamp>/`, made by `prepare`.
        """
        if resume and overwrite:
            raise RunError("--resume and --overwrite exclude each other")
        if out is None:
            if resume:
                raise RunError("--resume needs --out <run directory> to resume")
            return cls(None), False
        if os.path.exists(out) and not os.path.isdir(out):
            raise RunError(f"--out {out} is a file, not a directory")
        run_dir = cls(out, overwrite=overwrite)
        if resume:
            run_dir.check_resumable()
            return run_dir, True
        if os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise RunError(
                f"--out {out} already exists and is not empty; pass --resume to "
                "continue that run or --overwrite to replace it"
            )
        return run_dir, False

    def prepare(self):
        """Makes the directory (`runs/<timestamp>/` when no path was given),
        first deleting the previous run's files when overwriting."""
        from hlkeras import training

        if self.path is None:
            self.path = training.new_run_dir("runs")
        elif self.overwrite:
            self.clear()
        os.makedirs(self.path, exist_ok=True)

    def record(self, spec, settings, info):
        """Writes what a run is before it trains: its spec, settings, class
        names and (texts) tokenizer, from the dataset's `info`."""
        _files.atomic_write_json(self.file(self.SPEC), spec)
        _files.atomic_write_json(self.file(self.CONFIG), settings)
        _files.atomic_write_json(self.file(self.CLASS_NAMES), list(info.class_names))
        if info.kind == "text":
            info.tokenizer().save(self.file(self.VOCABULARY))

    def check_resumable(self):
        if not os.path.exists(self.file(self.CONFIG)):
            raise RunError(f"--resume: {self.path} holds no hlkeras run (no {self.CONFIG})")
        if os.path.exists(self.file(self.METRICS)):
            raise RunError(f"--resume: the run in {self.path} already finished")

    def clear(self):
        """Deletes the run's own files and folders, nothing else."""
        for name in self.FILES:
            if os.path.exists(self.file(name)):
                os.remove(self.file(name))
        for name in self.DIRS:
            shutil.rmtree(self.file(name), ignore_errors=True)

    def recorded_settings(self):
        with open(self.file(self.CONFIG)) as file:
            return json.load(file)

    def written_files(self):
        return [name for name in self.FILES if os.path.exists(self.file(name))]

    def summary(self, roles=None):
        """Lines saying where everything was written and what each file is
        (`roles` overrides some of `FILE_ROLES`)."""
        roles = {**self.FILE_ROLES, **(roles or {})}
        names = self.written_files()
        width = max(map(len, names), default=0)
        lines = [f"wrote {self.path}{os.sep}"]
        lines += [f"  {name:<{width}}  {roles[name]}" for name in names]
        if os.path.isdir(self.file("logs")):
            lines.append(
                f"  {'logs/':<{width}}  TensorBoard logs: tensorboard --logdir {self.file('logs')}"
            )
        return lines


def finished_run(path):
    """The `RunDir` of the finished `hlkeras train` run at `path`."""
    if not os.path.isdir(path):
        raise RunError(
            f"{path} is not a run directory: give the --out directory of a finished "
            "hlkeras train (its recorded data is the one used)"
        )
    source = RunDir(path)
    missing = [
        n for n in (RunDir.CONFIG, RunDir.SPEC, RunDir.MODEL) if not os.path.exists(source.file(n))
    ]
    if missing or not os.path.exists(source.file(RunDir.METRICS)):
        raise RunError(
            f"{path} holds no finished hlkeras train run (missing: "
            f"{', '.join(missing or [RunDir.METRICS])})"
        )
    return source


def settings_for(run_dir, resuming, given):
    """The settings of a run: the defaults updated with `given` (the flags
    the user gave), or, when resuming, the recorded settings, which a
    contradicting flag may not change. Checked; raises `RunError`."""
    if not resuming:
        settings = {**TRAIN_DEFAULTS, **given}
    else:
        # A run recorded before a setting existed gets its default.
        settings = {**TRAIN_DEFAULTS, **run_dir.recorded_settings()}
        for key, value in given.items():
            if key != "data_dir" and settings.get(key) != value:
                raise RunError(
                    f"--resume continues the recorded run, which has "
                    f"--{key.replace('_', '-')} {settings.get(key)}; got {value}"
                )
        settings.update({k: v for k, v in given.items() if k == "data_dir"})
    check_settings(settings)
    return settings


def check_settings(settings):
    """Raises `RunError` naming the first setting out of its range."""
    for name in ("epochs", "batch_size", "depth", "width", "patience"):
        value = settings[name]
        if value is not None and value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("lr", "clipnorm"):
        value = settings[name]
        if value is not None and not value > 0:
            raise RunError(f"--{name} must be a positive number, got {value}")
    if settings["weight_decay"] < 0:
        raise RunError(f"--weight-decay must be >= 0, got {settings['weight_decay']}")
    if settings["dropout"] is not None and not 0 <= settings["dropout"] < 1:
        raise RunError(f"--dropout must be in [0, 1), got {settings['dropout']}")
    if settings["seed"] < 0:
        raise RunError(f"--seed must be >= 0, got {settings['seed']}")
    for name in ("val_split", "test_split"):
        if not 0 <= settings[name] < 1:
            raise RunError(f"--{name.replace('_', '-')} must be in [0, 1), got {settings[name]}")
    if settings["val_split"] + settings["test_split"] >= 1:
        raise RunError("--val-split + --test-split must leave training examples (sum < 1)")
    size = settings["image_size"]
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise RunError(f"--image-size needs two positive integers H W, got {size}")
    if settings["color_mode"] is not None:
        from hlkeras.data import COLOR_MODES

        _validation.check_flag_choice("--color-mode", settings["color_mode"], COLOR_MODES, RunError)
    if settings["capacity_factor"] is not None and not settings["capacity_factor"] > 0:
        raise RunError(f"--capacity-factor must be > 0, got {settings['capacity_factor']}")
    if settings["experts"] is not None and settings["experts"] < 0:
        raise RunError(f"--experts must be >= 0, got {settings['experts']}")
    if settings["distribute"] is not None:
        from hlkeras.training import distribute

        _validation.check_flag_choice(
            "--distribute", settings["distribute"], distribute.STRATEGIES, RunError
        )
    if settings["mesh"] is not None and settings["distribute"] != "model":
        given = settings["distribute"]
        raise RunError("--mesh needs --distribute model" + (f"; got {given}" if given else ""))


def model_spec(settings, info):
    """The `hlkeras.models` spec the settings describe for dataset `info`."""
    from hlkeras import models

    arch = settings["arch"] or DEFAULT_ARCH[info.kind]
    _validation.check_flag_choice("--arch", arch, sorted(models.ARCHITECTURES), RunError)
    models.check_arch_for_data(arch, info.kind, RunError)
    spec = {"arch": arch, "input_shape": list(info.input_shape), "num_classes": info.num_classes}
    for key in ("depth", "width", "dropout"):
        if settings[key] is not None:
            spec[key] = settings[key]
    if settings["encoder"] is not None:
        if arch != "text":
            raise RunError(f"--encoder needs --arch text; --arch {arch} has no encoder choice")
        spec["encoder"] = _validation.check_flag_choice(
            "--encoder", settings["encoder"], models.TEXT_ENCODERS, RunError
        )
    has_moe = "num_experts" in models.hyperparameter_defaults(arch)
    experts = settings["experts"]
    if experts is None:
        experts = MOE_EXPERTS_DEFAULT if arch in MOE_BY_DEFAULT else 0
    if experts:
        if not has_moe:
            raise RunError(f"--experts needs an arch with MoE FFNs; --arch {arch} has none")
        spec["num_experts"] = experts
        spec["capacity_factor"] = settings["capacity_factor"]
    elif settings["capacity_factor"] is not None:
        raise RunError("--capacity-factor needs MoE FFNs (--experts > 0)")
    spec.update(info.spec_entries())
    try:
        return models.resolve_spec(spec)
    except ValueError as error:
        raise RunError(str(error)) from None


@dataclasses.dataclass
class RunOutcome:
    """What `train_run` did.

    Attributes:
        run_dir: The `RunDir`.
        metrics: What `metrics.json` holds, or `None` when training stopped
            on a NaN loss (then `nan_message` says why).
        nan_message: The one-line explanation of a NaN stop, else `None`.
        refused: Why `model.tflite` was not written, else `None`.
        process: This process' index in a multi-host run; only process 0
            evaluates, exports and has `metrics`.
    """

    run_dir: RunDir
    metrics: dict = None
    nan_message: str = None
    refused: str = None
    process: int = 0


def train_run(settings, run_dir, *, resuming=False, tensorboard=False, diagnose=False, log=print):
    """Trains, evaluates, exports and verifies one run, as `hlkeras train` does.

    Args:
        settings: Checked settings (`settings_for`).
        run_dir: The `RunDir` (`RunDir.open`).
        resuming: Continue the killed run in `run_dir`.
        tensorboard: Also log to `run_dir/logs`.
        diagnose: Probe the hidden layers (`hlkeras.diagnostics.
            HiddenLayerMonitor` on the first validation examples): True
            for about `PROBES_PER_RUN` probes a run, or every n-th epoch
            for an int n. Writes diagnostics.json, hidden_layers.png and
            `metrics["warnings"]`.
        log: Where the one-line progress messages go.

    Returns:
        A `RunOutcome`.
    """
    import keras

    from hlkeras import models
    from hlkeras import training
    from hlkeras.training import distribute

    started = time.perf_counter()
    (train_ds, val_ds, test_ds), info = load_data(settings, run_dir if resuming else None)
    spec = model_spec(settings, info)
    distribution, val_ds, initial_weights = distribution_for(settings, spec, val_ds, info, log)
    if not resuming:
        run_dir.prepare()
        run_dir.record(spec, settings, info)
    backend = keras.backend.backend()
    log(f"hlkeras train: {spec['arch']} on {info.name} ({backend} backend) -> {run_dir.path}")

    layer_monitor = None
    if diagnose:
        every = diagnose_every(settings["epochs"], None if diagnose is True else diagnose)
        layer_monitor = hidden_layer_monitor(val_ds or train_ds, run_dir, every, tensorboard)
    with _dtype_policy("mixed_bfloat16" if settings["mixed_precision"] else None):
        with distribution.scope() if distribution else contextlib.nullcontext():
            model = models.build(spec)
            if initial_weights is not None:
                model.set_weights(initial_weights)
            result = training.compile_and_fit(
                model,
                train_ds,
                val_ds,
                run_dir=run_dir.path,
                epochs=settings["epochs"],
                learning_rate=settings["lr"],
                weight_decay=settings["weight_decay"],
                clipnorm=settings["clipnorm"],
                patience=settings["patience"],
                tensorboard=tensorboard,
                extra_callbacks=[layer_monitor] if layer_monitor else (),
            )
            if layer_monitor:
                write_diagnostics(layer_monitor, run_dir)
            if result.nan_epoch is not None:
                return RunOutcome(run_dir, nan_message=training.nan_message(result))
            if result.best_path:
                # In place, so the compiled evaluation functions are reused.
                model.load_weights(result.best_path)
        if distribution:
            process = distribute.process_index()
            if process != 0:
                shutil.rmtree(run_dir.path, ignore_errors=True)
                return RunOutcome(run_dir, process=process)
            # Evaluated and exported on one device, like any other run.
            model = training.compile_model(rebuilt_copy(model, spec))
        metrics = evaluate_and_export(model, settings, run_dir, test_ds)

    monitor = "val_loss" if val_ds is not None else "loss"
    best_row = min(result.rows, key=lambda row: row.get(monitor, float("inf")))
    metrics.update(
        {
            "epochs": len(result.rows),
            "best_epoch": int(best_row["epoch"]) + 1,
            "seconds": round(result.seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
            "backend": backend,
            "dataset": info.name,
            "arch": spec["arch"],
            "params": int(model.count_params()),
        }
    )
    if layer_monitor:
        metrics["warnings"] = layer_monitor.warnings
    _files.atomic_write_json(run_dir.file(RunDir.METRICS), metrics)
    return RunOutcome(run_dir, metrics=metrics, refused=metrics["tflite_refused"])


# A probe of 128 digits costs about 0.3 s on the main job's resnet (the
# percentiles of ~30 layers' outputs, one eager backward pass).
PROBE_EXAMPLES = 128
# --diagnose probes about this many times a run by default.
PROBES_PER_RUN = 10


def diagnose_every(epochs, every=None):
    """The epochs between probes: `every`, else about `PROBES_PER_RUN` a run."""
    return every or max(1, epochs // PROBES_PER_RUN)


def hidden_layer_monitor(dataset, run_dir, every_n_epochs, tensorboard):
    """A `HiddenLayerMonitor` probing the first `PROBE_EXAMPLES` examples of
    `dataset` every `every_n_epochs` epochs (TensorBoard summaries in
    logs/hidden_layers with --tensorboard)."""
    from hlkeras import diagnostics

    log_dir = os.path.join(run_dir.file("logs"), "hidden_layers") if tensorboard else None
    return diagnostics.HiddenLayerMonitor(
        probe_batch(dataset), every_n_epochs=every_n_epochs, log_dir=log_dir
    )


def probe_batch(dataset):
    """`(x, y)`: the first `PROBE_EXAMPLES` examples of a batched dataset,
    the probe of `--diagnose` and `hlkeras inspect`."""
    from hlkeras import data

    return data.to_numpy(dataset.unbatch().take(PROBE_EXAMPLES).batch(PROBE_EXAMPLES))


def write_diagnostics(monitor, run_dir):
    from hlkeras import diagnostics

    report = monitor.report()
    # Not atomic_write_json: its sorted keys would lose the model order.
    _files.atomic_write_text(run_dir.file(RunDir.DIAGNOSTICS), json.dumps(report, indent=1) + "\n")
    if report["epochs"]:
        diagnostics.plot_hidden_layers(report, run_dir.file(RunDir.HIDDEN_LAYERS))


def distribution_for(settings, spec, val_ds, info, log):
    """`(distribution, val_ds, initial_weights)` of `--distribute`: the
    `keras.distribution` (None without it), the validation batches rebatched
    for it, and the weights the model starts from, those an undistributed
    run with the same seed starts from (the model built first, here)."""
    if settings["distribute"] is None:
        return None, val_ds, None
    from hlkeras import data
    from hlkeras import models
    from hlkeras.training import distribute

    model = models.build(spec)  # its variables also give the layout
    try:
        distribution, replicas, description = distribute.make_distribution(
            settings["distribute"], model, settings["batch_size"], settings["mesh"]
        )
        if settings["distribute"] == "model" and distribute.num_processes() > 1:
            raise distribute.DistributeError(
                "--distribute model runs on one host in this version; use --distribute data "
                "across hosts"
            )
    except distribute.DistributeError as error:
        raise RunError(str(error)) from None
    if val_ds is not None:
        val_ds, dropped = data.evenly_divisible_batches(
            val_ds, info.num_val, settings["batch_size"], replicas
        )
        if dropped:
            description += f"; {dropped} of {info.num_val} validation examples left out"
    log(f"hlkeras train: {description}")
    return distribution, val_ds, model.get_weights()


def open_run_dir(out, *, resume=False, overwrite=False, process=0):
    """`RunDir.open` for process `process` of a run: process 0 opens `out`.
    Every other process of a multi-host run writes the same files to a
    private directory of its own (its backup lets it resume with the
    others), which the run deletes when it finishes."""
    if process == 0:
        return RunDir.open(out, resume=resume, overwrite=overwrite)
    private = RunDir(private_run_path(out, process), overwrite=True)
    if resume:
        try:
            private.check_resumable()
        except RunError:
            raise RunError(
                f"--resume: process {process} kept no copy of the run at {private.path}, "
                "so it cannot resume with process 0"
            ) from None
    return private, resume


def private_run_path(out, process):
    """Where process `process` (> 0) of a multi-host run into `out` writes."""
    key = hashlib.sha1(os.path.abspath(out or "runs").encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"hlkeras-process-{process}-{key}")


def seed_after_preparing(settings):
    """Prepares the settings' TFDS dataset (`hlkeras.data.prepare`), then
    sets their seed (`keras.utils.set_random_seed`), so a missing dataset is
    reported before anything is drawn. (The preparation leaves the random
    states as it found them: `data.prepare`.) Raises `DatasetError`."""
    import keras

    from hlkeras import data

    if settings["data"] is None:
        data.prepare(settings["dataset"] or "digits", settings["data_dir"])
    keras.utils.set_random_seed(settings["seed"])


def load_data(settings, resumed_run_dir=None):
    """`((train_ds, val_ds, test_ds), info)` of the run's dataset; a resumed
    text run tokenizes with the vocabulary it recorded. Sets the run's seed
    (`keras.utils.set_random_seed`), once a TFDS dataset is prepared."""
    from hlkeras import data
    from hlkeras.data import texts

    try:
        seed_after_preparing(settings)
        tokenizer = resumed_run_dir and texts.saved_tokenizer(resumed_run_dir.path)
        train_ds, val_ds, test_ds, info = data.load_for(
            settings,
            batch_size=settings["batch_size"],
            augment=settings["augment"],
            tokenizer=tokenizer,
        )
    except data.DatasetError as error:
        raise RunError(str(error)) from None
    if test_ds is None:
        raise RunError(f"--data {settings['data']} gives no test split; use --test-split > 0")
    if settings["batch_size"] > info.num_train:
        raise RunError(
            f"--batch-size {settings['batch_size']} is larger than the "
            f"{info.num_train} training examples of {info.name}"
        )
    return (train_ds, val_ds, test_ds), info


def evaluate_and_export(model, settings, run_dir, test_ds):
    """Saves model.keras, evaluates it on the test split, exports and
    verifies model.tflite; returns the accuracy metrics."""
    from hlkeras import data
    from hlkeras import export
    from hlkeras import lora

    _files.save_model_atomic(model, run_dir.file(RunDir.MODEL))
    results = model.evaluate(test_ds, verbose=0, return_dict=True)
    test_images, test_labels = data.to_numpy(test_ds)
    exportable = lora.copy_model(model, "float32") if settings["mixed_precision"] else model
    metrics = {"test_accuracy": float(results["accuracy"]), "test_loss": float(results["loss"])}
    try:
        report = export_verified_tflite(
            exportable, test_images, test_labels, run_dir.file(RunDir.TFLITE)
        )
    except export.ExportError as error:
        # A model the converter cannot take is trained all the same: the run
        # keeps model.keras and says in one line why there is no .tflite.
        return {**metrics, "keras_batch1_accuracy": None, "tflite_refused": str(error)}
    metrics.update(keras_batch1_accuracy=report.keras_accuracy, tflite_refused=report.refused)
    # A model refused before conversion (its outputs depend on the batch)
    # has no .tflite measurements.
    for artifact in report.artifacts:
        metrics.update(
            tflite_accuracy=artifact.accuracy,
            tflite_top1_agreement=artifact.top1_agreement,
            tflite_max_abs_diff=artifact.max_abs_diff,
            tflite_gap_points=round(100 * (report.keras_accuracy - artifact.accuracy), 4),
        )
    return metrics


def export_verified_tflite(model, test_images, test_labels, path):
    """Exports `model` to `path` as a builtins-only float32 .tflite through
    `hlkeras.export` (any backend), verified per sample at batch 1.

    Returns:
        The `ExportReport`. When verification refused the file, nothing is
        written to `path` and `report.refused` says why.
    """
    from hlkeras import export

    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as staging:
        try:
            report = export.export_model(
                model,
                os.path.join(staging, "export"),
                formats=("tflite",),
                verify_data=(test_images, test_labels),
                latency_runs=0,
            )
        except export.ExportRefused as refusal:
            return refusal.report
        shutil.move(report.artifact("tflite").path, path)  # same filesystem: a rename
    return report


def file_size(path):
    """The size in bytes of the file at `path`, or None when there is none."""
    return os.path.getsize(path) if os.path.exists(path) else None


def kilobytes(size):
    """A table cell for a file size in bytes (None: no file)."""
    return f"{size / 1024:.1f} KB" if size is not None else "-"


def aligned_rows(rows):
    """Rows of cells as printed lines, each column padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]


def rebuilt_copy(model, spec, policy=None):
    """`models.build(spec)` with `model`'s weights, under dtype `policy`
    (default: the current one) and outside any distribution scope.

    The TFLite converter rejects the bfloat16 ops of a mixed_bfloat16 model
    (its export uses a float32 copy), and a distributed run evaluates and
    exports a single-device copy, like any other run.
    """
    from hlkeras import models

    with _dtype_policy(policy):
        copy = models.build(spec)
    copy.set_weights(model.get_weights())
    return copy


@contextlib.contextmanager
def _dtype_policy(name):
    """Sets Keras' global dtype policy for a block (no change for None)."""
    import keras

    previous = keras.config.dtype_policy()
    if name:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
