"""Reports of a search: `trials.csv`, `trials.png`, `best_spec.json`,
`best_trial.json`, and the leaderboard printed at the end."""

import csv
import io
import os

from hlkeras import training
from hlkeras.search.space import _value_kind
from hlkeras.search.tuners import TRIAL_ERROR_FILE
from hlkeras.search.tuners import TRIAL_TUNER_FILE

TRIALS_CSV = "trials.csv"
TRIALS_PNG = "trials.png"
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
