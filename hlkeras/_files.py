"""Atomic file writes: every file hlkeras writes goes to a temporary sibling
and is renamed into place, so a killed process never leaves a half-written
file and a failure never replaces a good one. (Imports nothing of hlkeras,
so every stage can use it.)"""

import json
import os


def partial_path(path, suffix=""):
    """A temporary sibling of `path`; `suffix` keeps an extension Keras needs."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.partial-{os.getpid()}{suffix}")


def atomic_write_bytes(path, data):
    partial = partial_path(path)
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_figure_atomic(figure, path):
    """Saves a matplotlib `figure` as a PNG through a temporary file and a rename."""
    partial = partial_path(path, ".png")
    figure.savefig(partial, dpi=100)
    os.replace(partial, path)


def save_model_atomic(model, path):
    """`model.save(path)` through a temporary `.keras` file and a rename."""
    partial = partial_path(path, ".keras")
    model.save(partial)
    os.replace(partial, path)
