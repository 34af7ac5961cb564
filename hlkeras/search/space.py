"""The search-space format: the default space of each architecture, and the
notation a user narrows it with (a dict, or a TOML/JSON file):

    depth = [2, 6]                               # an inclusive range
    lr = {min = 1e-4, max = 3e-3, log = true}    # a range with options
    width = {values = [64, 128]}                 # a choice
    sparsity = {values = [0.0, 0.5, 0.8]}        # magnitude pruning in training
    dropout = 0.1                                # fixed
    arch = "vit"

`resolve_space` turns overrides into canonical entries (`{"fixed": v}`,
`{"values": [...]}` or `{"type", "min", "max", "step", "log"}`), and
`declare` declares one on KerasTuner's `hp`.
"""

import copy
import json
import os
import tomllib

from hlkeras import _validation
from hlkeras import models

# Hyperparameters of the training recipe rather than of the model builder.
# `sparsity` (optional, in no default space) prunes the trial while it
# trains (`hlkeras.search.hypermodel.trial_pruning`).
TRAINING_KEYS = ("lr", "weight_decay", "batch_size", "sparsity")

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
    # Widths are multiples of the default 4 heads and even (bidirectional
    # recurrent encoders split them over two directions).
    "text": {
        "encoder": {"values": ["transformer", "gru", "lstm"]},
        "depth": {"min": 1, "max": 3},
        "width": {"values": [32, 64, 128]},
        "dropout": {"min": 0.0, "max": 0.3, "step": 0.05},
        **_TRAINING_SPACE,
    },
}
_RANGE_FIELDS = ("min", "max", "step", "log")
# A search over several architectures names them joined by this.
ARCH_SEPARATOR = ","


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


def arch_names(arch):
    """The architectures of an `arch` setting: `"vit"` or `"mlp,resnet,vit"`."""
    return arch.split(ARCH_SEPARATOR)


def space_arch(overrides, default="mlp"):
    """The `arch` an overrides dict names (`"vit"`, or several joined by
    commas for `arch = {values = [...]}` / `"mlp,vit"`), or `default`."""
    arch = overrides.get("arch", default)
    if isinstance(arch, dict) and set(arch) == {"values"} and isinstance(arch["values"], list):
        arch = ARCH_SEPARATOR.join(map(str, arch["values"]))
    names = arch.split(ARCH_SEPARATOR) if isinstance(arch, str) else [arch]
    if not all(name in SEARCH_SPACES for name in names) or len(set(names)) != len(names):
        raise ValueError(
            f"space['arch'] must be one of {sorted(SEARCH_SPACES)}, or a choice "
            f"{{values = [...]}} of several. Received: arch={arch!r}"
        )
    return arch


def _value_kind(entry):
    """'int' or 'float' for a numeric canonical entry, else None."""
    if entry is None:
        return None
    if "type" in entry:
        return entry["type"]
    values = entry["values"] if "values" in entry else [entry["fixed"]]
    if all(_validation.is_int(v) for v in values):
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
    kind = _value_kind(default) or (
        "int" if _validation.is_int(low) and _validation.is_int(high) else "float"
    )
    if kind == "int" and not (_validation.is_int(low) and _validation.is_int(high)):
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
        not _validation.is_number(step)
        or step <= 0
        or (kind == "int" and not _validation.is_int(step))
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
    if _value_kind(default) == "int" and not all(_validation.is_int(v) for v in values):
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
        if _value_kind(default) == "int" and not _validation.is_int(raw):
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

    With several architectures (`"mlp,resnet,vit"`) the space has an `arch`
    choice, the training keys (`TRAINING_KEYS`) shared at the top level, and
    each architecture's own keys prefixed by its name (`"vit.depth"`); the
    overrides give those in a table per architecture (`[vit]` in TOML).

    Args:
        arch: A key of `SEARCH_SPACES`, or several joined by commas.
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
    >>> space = resolve_space("mlp,vit", {"vit": {"num_experts": 4}})
    >>> space["arch"], space["vit.num_experts"]
    ({'values': ['mlp', 'vit']}, {'fixed': 4})
    """
    overrides = dict(overrides or {})
    if space_arch(overrides, default=arch) != arch:
        raise ValueError(
            f"space['arch'] is {overrides['arch']!r} but the search is for arch={arch!r}."
        )
    overrides.pop("arch", None)
    if ARCH_SEPARATOR in arch:
        return _resolve_several_archs(arch_names(arch), overrides)
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
    if "sparsity" in space:
        _check_sparsity_entry(space["sparsity"])
    return dict(sorted(space.items()))


def _check_sparsity_entry(entry):
    values = [entry["fixed"]] if "fixed" in entry else entry.get("values")
    values = values or [entry["min"], entry["max"]]
    if not all(_validation.is_number(v) and 0 <= v < 1 for v in values):
        raise ValueError(
            f"space['sparsity'] takes fractions in [0, 1) (0: a dense trial). Received: {entry}"
        )


def _resolve_several_archs(names, overrides):
    """The space of a search over the architectures `names` (see `resolve_space`)."""
    shared = {key: raw for key, raw in overrides.items() if key in TRAINING_KEYS}
    for key in sorted(set(overrides) - set(shared) - set(names)):
        raise ValueError(
            f"space[{key!r}]: a search over several archs {names} takes the training "
            f"keys {list(TRAINING_KEYS)} at the top level and every other key in a "
            f"table per arch, e.g. [{names[0]}] {key} = ..."
        )
    space = {"arch": {"values": list(names)}}
    for name in names:
        own = overrides.get(name, {})
        if not isinstance(own, dict):
            raise ValueError(f"space[{name!r}] must be a table of keys. Received: {own!r}")
        for key in sorted(set(own) & set(TRAINING_KEYS)):
            raise ValueError(
                f"space[{name!r}][{key!r}]: training keys are shared by every arch; "
                "set them at the top level"
            )
        for key, entry in resolve_space(name, {**own, **shared}).items():
            if key in TRAINING_KEYS:
                space[key] = entry
            else:
                space[f"{name}.{key}"] = entry
    return dict(sorted(space.items()))


def split_arch_values(values):
    """`(arch, model values)` of one trial's values in a space over one or
    several archs: the chosen arch's prefixed keys lose their prefix, other
    archs' keys and the training keys are left out."""
    arch = values.get("arch")
    model_values = {}
    for key, value in values.items():
        name, _, own_key = key.rpartition(".")
        if key == "arch" or key in TRAINING_KEYS or (name and name != arch):
            continue
        model_values[own_key] = value
    return arch, model_values


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
