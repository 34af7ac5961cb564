"""LoRA model surgery: put low-rank adapters into a trained functional model,
merge them back out, and save or load the adapters alone.

The usual flow:

    adapted = apply_lora(pretrained, rank=8)      # Dense -> LoRADense, rest frozen
    adapted.fit(...)                              # trains adapters + head only
    save_adapters(adapted, "task.lora.npz")       # a few percent of the weights
    shipped = merge_lora(adapted)                 # plain Dense again, same outputs

`apply_lora(..., dora=True)` gives `Dense` targets weight-decomposed
adapters (DoRA: `LoRADense(dora=True)`, a trainable magnitude per output
unit); they merge, save and load the same way.

Which layers can take an adapter:
- every `keras.layers.Dense` (exactly that class): it becomes a
  `hlkeras.layers.LoRADense` carrying the trained kernel and bias;
- every hlkeras layer that follows the *LoRA protocol*: it is registered
  under the package "hlkeras" and its `get_config()` has a `"lora_rank"` key,
  `None` when the layer has no adapters. `apply_lora` rebuilds it from its
  config with `lora_rank=rank` (and `lora_alpha=alpha`,
  `lora_dropout=dropout` when those keys are in the config too). With
  `lora_rank` set, the layer must
    1. build its adaptable projections as `LoRADense` sublayers, or as Keras
       `Dense` / `EinsumDense` with Keras' LoRA enabled (`MultiHeadAttention`,
       whose weights are Keras'), and create its weights in the same order
       as without adapters, so that its `weights` with the adapter variables
       left out line up one to one (same names, same shapes) with the plain
       layer's `weights`;
    2. keep exactly the adapters `A` and `B` in `trainable_weights` (freeze
       its other weights, e.g. norms and biases).
  `merge_lora` rebuilds it with `lora_rank=None` and copies the weights back,
  each adapted kernel replaced by its merged kernel.

Only top-level layers of `model.layers` are considered. Weights always move
through NumPy copies: on JAX, a variable's buffer can be donated by `fit`.
"""

import json

import keras
import numpy as np
from keras import ops

from hlkeras import _compat
from hlkeras import _validation
from hlkeras.layers.lora import LoRADense
from hlkeras.layers.lora import check_alpha
from hlkeras.layers.weight_options import KERNEL_AND_BIAS_ARGUMENTS

ADAPTER_FORMAT = "hlkeras-lora-adapters"
ADAPTER_FORMAT_VERSION = 1
METADATA_KEY = "metadata"


def _as_numpy(variables):
    # np.array copies: a view of a JAX buffer dies when `fit` donates it.
    return [np.array(ops.convert_to_numpy(v)) for v in variables]


def _check_model(model):
    if not isinstance(model, keras.Model) or not _compat.is_graph_model(model):
        raise ValueError(
            "Argument `model` must be a built functional or Sequential "
            f"keras.Model (subclassed models cannot be cloned). Received: "
            f"model={model!r}"
        )
    if not model.built:
        raise ValueError(
            "Argument `model` must be built: call it on data or give it an "
            f"Input first. Received: model '{model.name}' (not built)"
        )


def _clone(model, clone_layer):
    """`clone_model`, keeping the input names (a fresh `Input` gets a new
    name, which would rename the inputs of an exported model)."""
    if isinstance(model, keras.Sequential):
        return keras.models.clone_model(model, clone_function=clone_layer)
    input_layer_names = {
        id(layer.output): layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.InputLayer)
    }
    inputs = keras.tree.map_structure(
        lambda tensor: keras.Input(
            batch_shape=tensor.shape,
            dtype=tensor.dtype,
            name=input_layer_names[id(tensor)],
        ),
        model.input,
    )
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)


def adapted_projections(layer):
    """Every projection in `layer`, itself included, that carries an adapter,
    in tracking order: an hlkeras `LoRADense`, or a Keras `Dense` /
    `EinsumDense` with Keras' own LoRA enabled (what
    `MultiHeadAttention(lora_rank=...)` uses)."""
    return [
        sublayer
        for sublayer in _compat.sublayers(layer, include_self=True)
        if isinstance(sublayer, LoRADense) or getattr(sublayer, "lora_enabled", False)
    ]


def _adapters_of(projection):
    if isinstance(projection, LoRADense):
        return projection.adapter_weights
    return [projection.lora_kernel_a, projection.lora_kernel_b]


def _rank_of(projection):
    return projection.rank if isinstance(projection, LoRADense) else projection.lora_rank


def _kind_of(projection):
    """`"DoRA"` for a weight-decomposed adapter, else `"LoRA"`."""
    return "DoRA" if getattr(projection, "dora", False) else "LoRA"


def _merged_kernel_of(projection):
    """`(kernel variable, NumPy W + scale * A @ B)` of one projection."""
    if isinstance(projection, LoRADense):
        return projection.kernel, projection.merged_kernel()
    # Keras' `kernel` property is the merged kernel when LoRA is enabled.
    return _compat.lora_base_kernel(projection), _as_numpy([projection.kernel])[0]


def adapter_weights(layer):
    """The adapter variables in `layer`: `A`, `B` of every adapted projection
    (and a DoRA projection's magnitude and kept kernel norms)."""
    return [w for projection in adapted_projections(layer) for w in _adapters_of(projection)]


def follows_lora_protocol(layer):
    """Whether `layer` is an hlkeras layer with a `lora_rank` config key."""
    registered = keras.saving.get_registered_name(type(layer))
    return registered.startswith("hlkeras>") and "lora_rank" in layer.get_config()


def _is_plain_dense(layer):
    # Exactly Dense: a subclass may change `call`, which LoRADense would drop.
    return type(layer) is keras.layers.Dense


def _is_adaptable(layer):
    if _is_plain_dense(layer):
        return True
    return follows_lora_protocol(layer) and layer.get_config()["lora_rank"] is None


def _last_dense_name(model):
    dense_names = [layer.name for layer in model.layers if _is_plain_dense(layer)]
    return dense_names[-1] if dense_names else None


def select_targets(model, targets=None):
    """Names of the layers `apply_lora` gives adapters, in model order.

    Args:
        model: The functional or Sequential model.
        targets: None (every adaptable layer except the last `Dense`, the
            head), a list of layer names, or a predicate `fn(layer) -> bool`
            asked about each adaptable layer.
    """
    adaptable = [layer for layer in model.layers if _is_adaptable(layer)]
    if targets is None:
        head = _last_dense_name(model)
        names = [layer.name for layer in adaptable if layer.name != head]
    elif callable(targets):
        names = [layer.name for layer in adaptable if targets(layer)]
    elif isinstance(targets, (list, tuple, set)) and all(isinstance(name, str) for name in targets):
        names = _check_target_names(model, adaptable, list(targets))
    else:
        raise ValueError(
            "Argument `targets` must be None, a list of layer names or a "
            f"callable `fn(layer) -> bool`. Received: targets={targets!r}"
        )
    if not names:
        raise ValueError(
            "Argument `targets` selected no layer to adapt. Adaptable layers "
            f"of model '{model.name}': {[layer.name for layer in adaptable]}. "
            f"Received: targets={targets!r}"
        )
    return names


def _check_target_names(model, adaptable, names):
    all_names = [layer.name for layer in model.layers]
    adaptable_names = [layer.name for layer in adaptable]
    unknown = [name for name in names if name not in all_names]
    if unknown:
        raise ValueError(
            f"Argument `targets` names layers that model '{model.name}' does "
            f"not have: {unknown}. Adaptable layers: {adaptable_names}"
        )
    not_adaptable = [
        f"{name} ({type(model.get_layer(name)).__name__})"
        for name in names
        if name not in adaptable_names
    ]
    if not_adaptable:
        raise ValueError(
            "Argument `targets` names layers that cannot take an adapter: "
            f"{not_adaptable}. Adaptable: keras.layers.Dense and hlkeras "
            "layers with a `lora_rank` argument that is not yet set. "
            f"Adaptable layers: {adaptable_names}"
        )
    return [name for name in all_names if name in names]


def _lora_version(layer, rank, alpha, dropout, dora):
    """The unbuilt adapted twin of `layer` (a target)."""
    config = layer.get_config()
    if _is_plain_dense(layer):
        return LoRADense(
            config["units"],
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            dora=dora,
            activation=config["activation"],
            use_bias=config["use_bias"],
            name=layer.name,
            dtype=layer.dtype_policy,
            activity_regularizer=config.get("activity_regularizer"),
            **{name: config[name] for name in KERNEL_AND_BIAS_ARGUMENTS},
        )
    config["lora_rank"] = rank
    for key, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if key in config:
            config[key] = value
    return type(layer).from_config(config)


def _frozen_copy(layer):
    if not isinstance(layer, keras.layers.Layer):
        # An operation node such as the `not_equal` of an
        # `Embedding(mask_zero=True)` mask: no weights, nothing to freeze.
        return _plain_copy(layer)
    config = layer.get_config()
    config["trainable"] = False
    return type(layer).from_config(config)


def _plain_copy(layer):
    return type(layer).from_config(layer.get_config())


def _base_weights(layer):
    """`layer.weights` without the adapter variables."""
    adapter_ids = {id(w) for w in adapter_weights(layer)}
    return [w for w in layer.weights if id(w) not in adapter_ids]


def _copy_values(source_variables, values, target_variables, layer_name):
    """Assigns `values` (NumPy, one per source variable) to the targets,
    checking that the two lists line up by name and shape."""
    if len(source_variables) != len(target_variables):
        raise ValueError(
            f"Layer '{layer_name}' does not follow the LoRA protocol: "
            f"{len(source_variables)} weights to copy into "
            f"{len(target_variables)} ({[w.name for w in target_variables]})."
        )
    for source, value, target in zip(source_variables, values, target_variables):
        if source.name != target.name or tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"Layer '{layer_name}' does not follow the LoRA protocol: "
                f"weight '{source.name}' {tuple(value.shape)} lines up with "
                f"'{target.name}' {tuple(target.shape)}."
            )
        target.assign(value)


def _check_only_adapters_train(layer):
    adapter_ids = {id(w) for w in adapter_weights(layer)}
    extra = [w.path for w in layer.trainable_weights if id(w) not in adapter_ids]
    if extra:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) does not follow the "
            f"LoRA protocol: with `lora_rank` set, only its adapters may be "
            f"trainable, but these are too: {extra}"
        )


def _check_dora_targets(model, target_names):
    """DoRA adapts `Dense` targets; the hlkeras layers that follow the LoRA
    protocol take plain LoRA only (their configs have no DoRA switch)."""
    lora_only = [
        f"{name} ({type(model.get_layer(name)).__name__})"
        for name in target_names
        if not _is_plain_dense(model.get_layer(name))
    ]
    if lora_only:
        raise ValueError(
            "Argument `dora=True` adapts keras.layers.Dense layers; these "
            f"targets take LoRA only: {sorted(lora_only)}. Pass `targets` "
            "naming Dense layers, or `dora=False`."
        )


def apply_lora(model, rank=8, alpha=None, dropout=0.0, targets=None, dora=False):
    """Returns a copy of `model` with low-rank adapters on the chosen layers.

    Each targeted `keras.layers.Dense` becomes a `hlkeras.layers.LoRADense`
    that carries the trained kernel and bias, frozen, plus a fresh adapter
    (`B = 0`, so the outputs are unchanged). hlkeras layers with a
    `lora_rank` argument (see the module docstring) are rebuilt with
    `lora_rank=rank`. Every other layer is copied with its weights and frozen,
    except the head (the last `Dense`, when not targeted), which stays
    trainable. So `trainable_weights` holds only the adapters and the head.

    Args:
        model: A built functional or Sequential `keras.Model`. It is not
            modified.
        rank: Positive int, the adapter rank.
        alpha: Number > 0, the adapter strength (`scale = alpha / rank`).
            Defaults to `rank`.
        dropout: Float in [0, 1), dropout on the adapters' inputs.
        targets: None for every `Dense` (and LoRA-capable hlkeras layer)
            except the last `Dense`; a list of layer names; or a predicate
            `fn(layer) -> bool`.
        dora: Weight-decomposed adapters (DoRA, `LoRADense(dora=True)`):
            each target also trains a magnitude per output unit, starting
            at its trained kernel's column norms. `Dense` targets only.

    Returns:
        A new, uncompiled `keras.Model` with the same inputs and outputs.

    Example:

    >>> inputs = keras.Input(shape=(8,))
    >>> hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    >>> outputs = keras.layers.Dense(3, name="head")(hidden)
    >>> adapted = apply_lora(keras.Model(inputs, outputs), rank=2)
    >>> [w.path for w in adapted.trainable_weights]
    ['hidden/lora_kernel_a', 'hidden/lora_kernel_b', 'head/kernel', 'head/bias']
    """
    _check_model(model)
    _validation.check_positive_int("rank", rank)
    check_alpha(alpha)
    _validation.check_rate("dropout", dropout)
    target_names = set(select_targets(model, targets))
    if dora:
        _check_dora_targets(model, target_names)
    head_name = _last_dense_name(model)

    def clone_layer(layer):
        if layer.name in target_names:
            return _lora_version(layer, rank, alpha, dropout, bool(dora))
        if layer.name == head_name:
            return _plain_copy(layer)
        return _frozen_copy(layer)

    adapted = _clone(model, clone_layer)
    for old_layer in model.layers:
        new_layer = adapted.get_layer(old_layer.name)
        if old_layer.name in target_names:
            _copy_values(
                old_layer.weights,
                _as_numpy(old_layer.weights),
                _base_weights(new_layer),
                old_layer.name,
            )
            if dora:
                new_layer.reset_magnitude()  # m = ||trained kernel||_c
            _check_only_adapters_train(new_layer)
        else:
            new_layer.set_weights(_as_numpy(old_layer.weights))
    return adapted


def _merged_values(layer):
    """`layer`'s base weights and their NumPy values, each `LoRADense`
    kernel replaced by its merged kernel."""
    merged_kernels = dict(
        (id(kernel), value) for kernel, value in map(_merged_kernel_of, adapted_projections(layer))
    )
    base = _base_weights(layer)
    values = [merged_kernels[id(w)] if id(w) in merged_kernels else _as_numpy([w])[0] for w in base]
    return base, values


def _plain_version(layer):
    """The unbuilt adapter-free twin of a LoRA-protocol layer."""
    config = layer.get_config()
    config["lora_rank"] = None
    return type(layer).from_config(config)


def merge_lora(model):
    """Returns a copy of `model` with every adapter merged into its layer.

    Each `LoRADense` becomes a `keras.layers.Dense` with kernel
    `W + scale * A @ B`; each LoRA-capable hlkeras layer is rebuilt with
    `lora_rank=None` and its merged weights. The result has no LoRA layer,
    the original parameter count, and the same outputs (to float rounding),
    ready for `.keras` saving or TFLite export. Frozen layers stay frozen.

    Args:
        model: A built functional or Sequential `keras.Model`, usually from
            `apply_lora`. It is not modified.

    Returns:
        A new, uncompiled `keras.Model`.
    """
    _check_model(model)
    lora_names = {layer.name for layer in model.layers if adapter_weights(layer)}

    def clone_layer(layer):
        if isinstance(layer, LoRADense):
            return layer.merged()  # built, merged weights already in
        if layer.name in lora_names:
            return _plain_version(layer)
        return _plain_copy(layer)

    merged = _clone(model, clone_layer)
    for old_layer in model.layers:
        new_layer = merged.get_layer(old_layer.name)
        if isinstance(old_layer, LoRADense):
            continue
        if old_layer.name in lora_names:
            sources, values = _merged_values(old_layer)
            _copy_values(sources, values, new_layer.weights, old_layer.name)
        else:
            new_layer.set_weights(_as_numpy(old_layer.weights))
    return merged


def _saved_layers(model):
    """`(layer, kind, weights, ranks, adapter kinds)` for every layer an
    adapter file holds: adapter layers (only `A`, `B`, and DoRA's magnitude)
    and layers that train in full (heads)."""
    entries = []
    for layer in model.layers:
        adapters = adapter_weights(layer)
        if adapters:
            projections = adapted_projections(layer)
            ranks = [_rank_of(projection) for projection in projections]
            kinds = [_kind_of(projection) for projection in projections]
            entries.append((layer, "adapter", adapters, ranks, kinds))
        elif layer.trainable_weights:
            entries.append((layer, "trainable", layer.weights, [], []))
    return entries


def save_adapters(model, path):
    """Writes only the adapters (and fully trainable layers, e.g. a new
    head) of `model` to one `.npz` file at exactly `path`.

    The file records each layer's name, class, kind (`"adapter"` or
    `"trainable"`), LoRA ranks and weight names and shapes, so
    `load_adapters` can check it fits before it changes anything.

    Args:
        model: A model from `apply_lora` (possibly with a new head).
        path: File path, conventionally ending in `.lora.npz`.
    """
    _check_model(model)
    entries = _saved_layers(model)
    if not any(kind == "adapter" for _, kind, _, _, _ in entries):
        raise ValueError(
            f"Argument `model` has no LoRA layer, so there are no adapters to "
            f"save; call `apply_lora` first. Received: model '{model.name}'"
        )
    arrays, layers = {}, []
    for layer_index, (layer, kind, weights, ranks, adapter_kinds) in enumerate(entries):
        for weight_index, value in enumerate(_as_numpy(weights)):
            arrays[f"layer{layer_index}_weight{weight_index}"] = value
        layers.append(
            {
                "name": layer.name,
                "class": type(layer).__name__,
                "kind": kind,
                "ranks": ranks,
                "adapter_kinds": adapter_kinds,
                "weights": [{"name": w.name, "shape": list(w.shape)} for w in weights],
            }
        )
    metadata = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_FORMAT_VERSION,
        "model": model.name,
        "layers": layers,
    }
    arrays[METADATA_KEY] = np.array(json.dumps(metadata))
    # A file object, because `np.savez` appends `.npz` to a path without it.
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def _read_adapter_file(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            metadata = json.loads(str(data[METADATA_KEY]))
            arrays = {key: data[key] for key in data.files if key != METADATA_KEY}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(
            f"Argument `path` is not an hlkeras adapter file "
            f"({type(error).__name__}: {error}). Received: path={path!r}"
        ) from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"Argument `path` is not an hlkeras adapter file (format "
            f"{metadata.get('format')!r}). Received: path={path!r}"
        )
    return metadata, arrays


def _mismatches(model, metadata):
    """Every way the file's layers differ from the model's, as sentences."""
    problems = []
    in_model = {
        layer.name: (kind, weights, ranks, adapter_kinds)
        for layer, kind, weights, ranks, adapter_kinds in _saved_layers(model)
    }
    in_file = {entry["name"]: entry for entry in metadata["layers"]}
    for name in in_model.keys() - in_file.keys():
        problems.append(
            f"layer '{name}' has {in_model[name][0]} weights in the model but none in the file"
        )
    for name, entry in in_file.items():
        if name not in in_model:
            known = name in [layer.name for layer in model.layers]
            where = "is frozen and has no adapter" if known else "does not exist"
            problems.append(
                f"layer '{name}' has {entry['kind']} weights in the file but {where} in the model"
            )
            continue
        kind, weights, ranks, adapter_kinds = in_model[name]
        if kind != entry["kind"]:
            problems.append(
                f"layer '{name}' is '{entry['kind']}' in the file but '{kind}' in the model"
            )
            continue
        # Files written before DoRA hold LoRA adapters only.
        file_kinds = entry.get("adapter_kinds", ["LoRA"] * len(entry["ranks"]))
        if file_kinds != adapter_kinds:
            problems.append(
                f"layer '{name}' holds {'/'.join(file_kinds)} adapters in the file but "
                f"{'/'.join(adapter_kinds)} adapters in the model"
            )
            continue
        if ranks != entry["ranks"]:
            problems.append(
                f"layer '{name}' has LoRA rank {entry['ranks']} in the file but "
                f"{ranks} in the model"
            )
        file_shapes = [(w["name"], tuple(w["shape"])) for w in entry["weights"]]
        model_shapes = [(w.name, tuple(w.shape)) for w in weights]
        if len(file_shapes) != len(model_shapes):
            problems.append(
                f"layer '{name}' has weights {file_shapes} in the file but "
                f"{model_shapes} in the model"
            )
            continue
        for (file_name, file_shape), (model_name, model_shape) in zip(file_shapes, model_shapes):
            if file_name != model_name or file_shape != model_shape:
                problems.append(
                    f"layer '{name}' weight '{model_name}': shape {file_shape} "
                    f"('{file_name}') in the file but {model_shape} in the model"
                )
    return problems


def load_adapters(model, path):
    """Loads a `save_adapters` file into `model`, in place.

    Everything is checked before any weight changes: the same adapter and
    trainable layers by name, the same LoRA ranks, and the same weight names
    and shapes. On any mismatch it raises a `ValueError` listing every
    difference (layer, both shapes) and leaves `model` untouched.

    Args:
        model: A model with the same adapter layout as the one saved, e.g.
            `apply_lora` of the same pretrained model with the same rank.
        path: The adapter file.
    """
    _check_model(model)
    metadata, arrays = _read_adapter_file(path)
    problems = _mismatches(model, metadata)
    if problems:
        raise ValueError(
            f"Argument `path` holds adapters that do not fit model "
            f"'{model.name}' (nothing was loaded). Received: path={path!r}\n- "
            + "\n- ".join(problems)
        )
    weights_by_name = {layer.name: weights for layer, _, weights, _, _ in _saved_layers(model)}
    for layer_index, entry in enumerate(metadata["layers"]):
        for weight_index, variable in enumerate(weights_by_name[entry["name"]]):
            variable.assign(arrays[f"layer{layer_index}_weight{weight_index}"])
