"""Reports of a search: `trials.csv`, `trials.png`, `best_spec.json`,
`best_trial.json`, and the leaderboard printed at the end."""

import csv
import io
import os

from hlkeras import _files
from hlkeras.search import budget
from hlkeras.search.space import _value_kind
from hlkeras.search.tuners import TRAINED
from hlkeras.search.tuners import TRIAL_ERROR_FILE
from hlkeras.search.tuners import TRIAL_TUNER_FILE

TRIALS_CSV = "trials.csv"
TRIALS_PNG = "trials.png"
PARETO_PNG = "pareto.png"
BEST_SPEC_JSON = "best_spec.json"
BEST_TRIAL_JSON = "best_trial.json"


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
    `score` (the objective as trained), `epochs`, `seconds`, every
    hyperparameter, and `error`. In a search with a device budget, also
    the `budget.MEASUREMENT_COLUMNS` and `oracle_score` (what the oracle
    recorded, see `hlkeras.search.budget`)."""
    rows = []
    objective = oracle.objective.name
    for trial_id in sorted(oracle.trials, key=lambda t: (len(t), t)):
        trial = oracle.trials[trial_id]
        epochs = _metric(trial, "epochs")
        completed = trial.status == "COMPLETED"
        row = {
            "trial": trial_id,
            "status": trial.status,
            "score": trial.score if completed else None,
            "epochs": int(epochs) if epochs is not None else None,
            "seconds": _metric(trial, "seconds"),
            "tuner": _read_trial_file(project_dir, trial, TRIAL_TUNER_FILE) or "",
        }
        measured = budget.read_measurement(os.path.join(project_dir, f"trial_{trial_id}"))
        if measured is not None:
            row.update({key: measured[key] for key in budget.MEASUREMENT_COLUMNS})
            if completed:
                row["oracle_score"] = trial.score
                row["score"] = _metric(trial, TRAINED + objective)
        row.update(trial.hyperparameters.values)
        row["error"] = _trial_error(project_dir, trial) if not completed else ""
        rows.append(row)
    return rows


def write_trials_csv(path, rows):
    """`rows` (from `trial_rows`) as CSV, columns in a stable order."""
    fixed = ["trial", "status", "score", "epochs", "seconds", "tuner"]
    if any("budget" in row for row in rows):
        fixed += ["oracle_score", *budget.MEASUREMENT_COLUMNS]
    hyperparameters = sorted({k for row in rows for k in row} - set(fixed) - {"error"})
    columns = fixed + hyperparameters + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    _files.atomic_write_text(path, buffer.getvalue())


def read_trials_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ranked(rows, direction="max"):
    """The completed rows, those that fit the device budget first, each
    group best first (over-budget trials by their oracle score: nearest the
    budget first)."""
    completed = [row for row in rows if row["status"] == "COMPLETED" and row["score"] is not None]
    sign = 1 if direction == "max" else -1

    def rank_key(row):
        return budget.fits(row), sign * row.get("oracle_score", row["score"])

    return sorted(completed, key=rank_key, reverse=True)


def _format_value(value):
    if value is None:
        return "-"  # a hyperparameter inactive in this trial (another arch's)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _measurement_cells(row):
    """A measured row's .tflite size, latency and accuracy, and its verdict."""
    numbers = [
        "-" if row[key] is None else f"{row[key]:{spec}}"
        for key, spec in (("tflite_kb", ".1f"), ("latency_ms", ".3f"), ("tflite_accuracy", ".4f"))
    ]
    return numbers + [row["budget"]]


def leaderboard(rows, space, objective, direction="max", top=5):
    """The best `top` completed trials as text lines (a header first); in a
    search with a device budget, the trials that fit come first and each
    line shows its `.tflite` size, latency, accuracy and verdict."""
    shown = ranked(rows, direction)[:top]
    # Over several archs, only the keys of the archs shown get a column.
    tuned = [
        k
        for k, entry in space.items()
        if "fixed" not in entry and any(row.get(k) is not None for row in shown)
    ]
    measured = any("budget" in row for row in rows)
    header = ["rank", "trial", objective, "epochs", "seconds"] + tuned
    if measured:
        header += ["KiB", "ms", "tflite_acc", "budget"]
    table = [header]
    for rank, row in enumerate(shown, start=1):
        line = [
            str(rank),
            row["trial"],
            f"{row['score']:.4f}",
            str(row["epochs"]),
            f"{row['seconds']:.1f}",
        ]
        line += [_format_value(row.get(k)) for k in tuned]
        table.append(line + (_measurement_cells(row) if measured else []))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    failed = sum(row["status"] != "COMPLETED" for row in rows)
    fitting = ""
    if measured:
        fitting = f" ({sum(budget.fits(row) for row in ranked(rows))} fit the budget)"
    lines.append(
        f"{len(rows)} trials, {len(rows) - failed} completed{fitting}, "
        f"{failed} failed or unfinished"
    )
    return lines


def smallest_trial(rows):
    """The completed, measured row with the smallest `.tflite`, or None."""
    sized = [row for row in ranked(rows) if row.get("tflite_kb") is not None]
    return min(sized, key=lambda row: row["tflite_kb"], default=None)


def plot_pareto(rows, device_budget, objective, path):
    """Writes a PNG: the objective against batch-1 latency and against
    `.tflite` size, trials that fit and those over budget marked apart, the
    budget lines dashed and the Pareto front (most accurate for its cost)
    drawn through its trials."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    measured = [row for row in ranked(rows) if row.get("tflite_kb") is not None]
    costs = (
        ("latency_ms", "batch-1 LiteRT latency (ms)", device_budget.max_latency_ms),
        ("tflite_kb", ".tflite size (KiB)", device_budget.max_tflite_kb),
    )
    for i, (key, label, limit) in enumerate(costs):
        axes = figure.add_subplot(1, 2, i + 1)
        for group, marker, name in ((True, "o", "fits"), (False, "x", "over budget")):
            points = [(r[key], r["score"]) for r in measured if budget.fits(r) == group]
            axes.plot([p[0] for p in points], [p[1] for p in points], marker, label=name)
        points = [(r[key], r["score"]) for r in measured]
        front = [points[j] for j in budget.pareto_front(points)]
        axes.plot([p[0] for p in front], [p[1] for p in front], "-", color="gray",
                  drawstyle="steps-post", label="Pareto front")  # fmt: skip
        if limit is not None:
            axes.axvline(limit, linestyle="--", color="red", label="budget")
        axes.set_xlabel(label)
        axes.set_ylabel(objective)
        axes.set_title(f"{objective} vs {key} ({device_budget.quantization})")
        axes.grid(alpha=0.3)
        axes.legend()
    _files.save_figure_atomic(figure, path)


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
    _files.save_figure_atomic(figure, path)


def best_values(rows, space, direction="max"):
    """The space's values of the best completed row that fits the device
    budget (if any), or None. Keys inactive in that trial are left out."""
    best = ranked(rows, direction)
    if not best or not budget.fits(best[0]):
        return None
    return {key: best[0][key] for key in space if best[0].get(key) is not None}


def write_reports(tuner, hypermodel, directory):
    """Writes `trials.csv`, `trials.png` (and `pareto.png` with a device
    budget), `best_spec.json` and `best_trial.json` into `directory` and
    returns `(rows, best_values)`; `best_values` is None when no trial
    completed (or none fits the budget)."""
    objective = tuner.oracle.objective
    rows = trial_rows(tuner.oracle, tuner.project_dir)
    write_trials_csv(os.path.join(directory, TRIALS_CSV), rows)
    plot_trials(rows, hypermodel.space, objective.name, os.path.join(directory, TRIALS_PNG))
    if tuner.device_budget is not None:
        plot_pareto(rows, tuner.device_budget, objective.name, os.path.join(directory, PARETO_PNG))
    values = best_values(rows, hypermodel.space, objective.direction)
    if values is not None:
        best = ranked(rows, objective.direction)[0]
        _files.atomic_write_json(os.path.join(directory, BEST_SPEC_JSON), hypermodel.spec(values))
        measured = {key: best[key] for key in budget.MEASUREMENT_COLUMNS if key in best}
        _files.atomic_write_json(
            os.path.join(directory, BEST_TRIAL_JSON),
            {
                "trial": best["trial"],
                objective.name: best["score"],
                "hyperparameters": values,
                **measured,
            },
        )
    return rows, values
