"""A run's history: the rows of `history.csv`, the best value of a
monitored metric, the first NaN epoch, and the curves plot."""

import csv
import math
import os

from hlkeras._files import atomic_write_text
from hlkeras._files import save_figure_atomic


def read_history_rows(path):
    """The rows of a history CSV as dicts of floats (`epoch` as int); [] if absent."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
        for row in rows
    ]


def write_history_rows(path, rows):
    keys = ["epoch"] + sorted({k for row in rows for k in row} - {"epoch"})
    lines = [",".join(keys)]
    for row in rows:
        lines.append(",".join(repr(row[k]) if k in row else "" for k in keys))
    atomic_write_text(path, "\n".join(lines) + "\n")


def history_columns(rows):
    """Rows → `{metric: [value per epoch]}` (NaN where an epoch lacks it)."""
    keys = sorted({k for row in rows for k in row})
    return {k: [row.get(k, float("nan")) for row in rows] for k in keys}


def first_nan_epoch(rows):
    """The first epoch whose loss is NaN or infinite, or None."""
    for row in rows:
        if not math.isfinite(row.get("loss", 0.0)):
            return int(row["epoch"])
    return None


def monitor_mode(monitor):
    """`"min"` for a loss, else `"max"` (the `mode` of Keras callbacks and
    the direction of a KerasTuner objective)."""
    return "min" if "loss" in monitor else "max"


def best_value(rows, monitor):
    """The best finite `monitor` value in `rows` (min for losses), or None."""
    values = [row[monitor] for row in rows if monitor in row and math.isfinite(row[monitor])]
    if not values:
        return None
    return min(values) if monitor_mode(monitor) == "min" else max(values)


def plot_history(rows, path):
    """Writes a PNG with the loss, accuracy and learning-rate curves.

    Args:
        rows: History rows (`read_history_rows`), or a `{metric: values}`
            dict such as `keras.callbacks.History.history`.
        path: The PNG file to write (atomically).
    """
    # The object-oriented Agg API leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = rows if isinstance(rows, dict) else history_columns(rows)
    num_epochs = max(len(v) for v in columns.values())
    epochs = columns.get("epoch", list(range(num_epochs)))
    epochs = [e + 1 for e in epochs]
    panels = [("loss", "loss"), ("accuracy", "accuracy"), ("learning_rate", "learning rate")]
    panels = [p for p in panels if p[0] in columns]
    figure = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    for i, (metric, title) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        axes.plot(epochs, columns[metric], marker=".", label="train")
        if f"val_{metric}" in columns:
            axes.plot(epochs, columns[f"val_{metric}"], marker=".", label="validation")
            axes.legend()
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    save_figure_atomic(figure, path)
