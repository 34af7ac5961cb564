"""A device budget for a search: the most accurate model that fits the phone.

With a budget, every trial's model (its best epoch, as the oracle scored
it) is exported to `.tflite` through `hlkeras.export` (builtin ops only,
verified one sample at a time against Keras) into `trial_<id>/tflite/`, and
its file size and batch-1 LiteRT latency (median of `LATENCY_RUNS`) are
recorded in `trial_<id>/device.json` and with the trial's metrics.

How an infeasible trial is scored (`oracle_score`): the oracle sees the
trial's accuracy only when the trial fits. A trial over budget scores
`-min(overshoot, 1)`, where `overshoot` is how far its worst measurement is
over its budget as a fraction (0.3 for 130 KiB against 100 KiB); a trial
whose export fails or is refused scores -1. So every infeasible trial ranks
below every feasible one (accuracies are >= 0), Bayesian optimization still
learns in which direction the budget lies (a trial 10% over scores above
one 3x over), and Hyperband promotes feasible trials first. The penalty is
capped at -1 so one huge configuration does not stretch the Gaussian
process' scale and flatten the differences among the feasible trials.
Budgets therefore need an accuracy objective (bounded below by 0).
"""

import dataclasses
import json
import os
import time

from hlkeras import _files
from hlkeras import _validation

# The `hlkeras tune` flags of a budget, as settings of `run_search`.
BUDGET_DEFAULTS = {"max_tflite_kb": None, "max_latency_ms": None, "quantize": None}
DEVICE_JSON = "device.json"
TRIAL_EXPORT_DIR = "tflite"
LATENCY_RUNS = 50
# Calibration inputs for int8, as `hlkeras export` takes them.
REPRESENTATIVE_SAMPLES = 200
FITS = "fits"
# The numeric measurements recorded with a trial's metrics.
MEASUREMENT_METRICS = ("tflite_kb", "latency_ms", "tflite_accuracy", "measure_seconds")
# A trial's measurements in `trials.csv`: the metrics and the verdict.
MEASUREMENT_COLUMNS = ("budget", "tflite_kb", "latency_ms", "tflite_accuracy", "measure_seconds")
# The score of a trial that cannot be exported or was refused.
UNSHIPPABLE_SCORE = -1.0


@dataclasses.dataclass(frozen=True)
class DeviceBudget:
    """What a trial's `.tflite` may cost; None means no limit.

    Attributes:
        max_tflite_kb: Largest file size, in KiB (1024 bytes).
        max_latency_ms: Largest median batch-1 latency in the LiteRT
            interpreter on this machine, in milliseconds.
        quantization: The `.tflite` quantization every trial is measured with
            (`hlkeras.export.QUANTIZATIONS`).
    """

    max_tflite_kb: float = None
    max_latency_ms: float = None
    quantization: str = "none"

    @classmethod
    def from_settings(cls, settings, error=ValueError):
        """The budget of a search's settings, or None when no budget flag
        (nor `quantize`) was given. Raises `error` naming a bad flag."""
        from hlkeras import export

        if all(settings.get(key) is None for key in BUDGET_DEFAULTS):
            return None
        for key in ("max_tflite_kb", "max_latency_ms"):
            value = settings.get(key)
            if value is not None and (not _validation.is_number(value) or not value > 0):
                flag = "--" + key.replace("_", "-")
                raise error(f"{flag} must be a number > 0, got {value!r}")
        quantization = settings.get("quantize") or "none"
        _validation.check_flag_choice("--quantize", quantization, export.QUANTIZATIONS, error)
        return cls(settings.get("max_tflite_kb"), settings.get("max_latency_ms"), quantization)

    def to_config(self):
        return dataclasses.asdict(self)

    def limits(self):
        """`[(measurement key, limit, unit, name)]` of the budgets set."""
        limits = []
        if self.max_tflite_kb is not None:
            limits.append(("tflite_kb", self.max_tflite_kb, "KiB", "size"))
        if self.max_latency_ms is not None:
            limits.append(("latency_ms", self.max_latency_ms, "ms", "latency"))
        return limits

    def overshoot(self, measured):
        """How far the worst measurement is over its budget, as a fraction
        of the budget (0 when every measurement fits)."""
        return max([0.0] + [measured[key] / limit - 1.0 for key, limit, _, _ in self.limits()])

    def verdict(self, measured):
        """`"fits"`, or which budgets `measured` broke, e.g.
        `"over size: 130.2 KiB > 100 KiB"`."""
        broken = [
            f"over {name}: {measured[key]:.4g} {unit} > {limit:g} {unit}"
            for key, limit, unit, name in self.limits()
            if measured[key] > limit
        ]
        return "; ".join(broken) or FITS

    def describe(self):
        """The budget as flags, e.g. `--max-tflite-kb 100 --quantize int8`."""
        flags = [
            f"--{key.replace('_', '-')} {value:g}"
            for key, value in (
                ("max_tflite_kb", self.max_tflite_kb),
                ("max_latency_ms", self.max_latency_ms),
            )
            if value is not None
        ]
        return " ".join(flags + [f"--quantize {self.quantization}"])


def oracle_score(value, measured, budget):
    """The objective value the oracle records for a measured trial (see the
    module docstring): `value` when it fits, else a penalty in [-1, 0)."""
    if measured.get("refused"):
        return UNSHIPPABLE_SCORE
    if measured["budget"] == FITS:
        return value
    return -min(budget.overshoot(measured), 1.0)


def export_tflite(model_or_path, out_dir, device_budget, x_train, validation_data):
    """The verified `.tflite` export every trial, and the retrained best,
    gets: `hlkeras.export.export_model` with the budget's quantization,
    calibrated on the first training inputs. Returns its `ExportReport`."""
    from hlkeras import export

    return export.export_model(
        model_or_path,
        out_dir,
        formats=("tflite",),
        quantization=device_budget.quantization,
        representative_data=x_train[:REPRESENTATIVE_SAMPLES],
        verify_data=validation_data,
        overwrite=True,
        latency_runs=LATENCY_RUNS,
    )


def measurements(report):
    """`tflite_kb`, `latency_ms`, `tflite_accuracy` and `keras_accuracy` of
    an `ExportReport` (None where it measured nothing)."""
    artifact = report.artifacts[0] if report and report.artifacts else None
    return {
        "tflite_kb": artifact.size_bytes / 1024 if artifact else None,
        "latency_ms": artifact.latency_ms if artifact else None,
        "tflite_accuracy": artifact.accuracy if artifact else None,
        "keras_accuracy": report.keras_accuracy if report else None,
    }


def measure_on_device(model, device_budget, trial_dir, x_train, validation_data):
    """Exports `model` into `trial_dir/tflite/` and measures it against the budget.

    Returns:
        A dict written to `trial_dir/device.json`: the `measurements`,
        `budget` (`"fits"`, the budgets broken, or why the export failed),
        `refused` (the export's refusal or failure, else "") and
        `measure_seconds`.
    """
    from hlkeras import export

    start = time.perf_counter()
    out_dir = os.path.join(trial_dir, TRIAL_EXPORT_DIR)
    try:
        report = export_tflite(model, out_dir, device_budget, x_train, validation_data)
        refused = ""
    except export.ExportRefused as error:
        report, refused = error.report, f"export refused: {error.report.refused}"
    except export.ExportError as error:
        report, refused = None, f"export failed: {error}"
    measured = measurements(report)
    measured["refused"] = refused
    measured["budget"] = refused or device_budget.verdict(measured)
    measured["measure_seconds"] = time.perf_counter() - start
    _files.atomic_write_json(os.path.join(trial_dir, DEVICE_JSON), measured)
    return measured


def read_measurement(trial_dir):
    """A trial's `device.json`, or None when it was not measured."""
    path = os.path.join(trial_dir, DEVICE_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fits(row):
    """Whether a `trial_rows` row fits its search's budget (every completed
    row fits a search without one)."""
    return row.get("budget") in (None, "", FITS)


def pareto_front(points):
    """The indices of `points` `(cost, accuracy)` on the Pareto front: no
    other point costs at most as much with at least the accuracy, one of the
    two strictly. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_accuracy = [], float("-inf")
    for i in order:
        if points[i][1] > best_accuracy:
            front.append(i)
            best_accuracy = points[i][1]
    return front
