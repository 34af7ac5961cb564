"""LoRA model surgery: put low-rank adapters into a trained functional model,
merge them back out, and save or load the adapters alone.

The usual flow:

    adapted = apply_lora(pretrained, rank=8)      # Dense -> LoRADense, rest frozen
    adapted.fit(...)                              # trains adapters + head only
    save_adapters(adapted, "task.lora.npz")       # a few percent of the weights
    shipped = merge_lora(adapted)                 # plain Dense again, same outputs

`apply_lora(..., dora=True)` gives `Dense`, `ResidualBlock` and
`FeedForward` targets weight-decomposed adapters (DoRA:
`LoRADense(dora=True)`, a trainable magnitude per output unit); they merge,
save and load the same way.

Which layers can take an adapter:
- every `keras.layers.Dense` (exactly that class): it becomes a
  `hlkeras.layers.LoRADense` carrying the trained kernel and bias;
- every layer that follows the *LoRA protocol* (all hlkeras layers with
  projections, and a user's own): it is registered with
  `keras.saving.register_keras_serializable` (any package; Keras' built-ins,
  whose configs also have `lora_rank`, are not) and its `get_config()` has a
  `"lora_rank"` key,
  `None` when the layer has no adapters. `apply_lora` rebuilds it from its
  config with `lora_rank=rank` (and `lora_alpha=alpha`,
  `lora_dropout=dropout`, `lora_dora=dora` when those keys are in the
  config too). With
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

`MixtureOfExperts` follows the protocol too: with `lora_rank` set, every
expert gets its own adapters on both stacked kernels (see its docstring).

Layers are found everywhere in the model: nested functional and Sequential
models (a backbone used as a layer) are entered, and a layer inside one is
named by its *path*, `"backbone/dense_1"`. `targets` are glob patterns
(`fnmatch`) over these paths. An hlkeras composite layer (`ResidualBlock`,
`TransformerBlock`, `FeedForward`, `MultiHeadAttention`,
`MixtureOfExperts`) is one target: its protocol decides which of its
projections take adapters.

Several named adapters can share one model (`add_adapter`, `set_adapter`):
the active one lives in the model's variables and the others are NumPy
copies beside it, so switching is a copy into the same variables, with
nothing rebuilt or recompiled on any backend. That is also why the named
adapters of one model share its targets, rank and kind.

Weights always move through NumPy copies: on JAX, a variable's buffer can be
donated by `fit`.
"""

import collections
import contextlib
import fnmatch
import json

import keras
import numpy as np
from keras import ops

from hlkeras import _compat
from hlkeras import _validation
from hlkeras.layers.lora_dense import LoRADense
from hlkeras.layers.lora_dense import check_alpha
from hlkeras.layers.moe import MixtureOfExperts
from hlkeras.layers.weight_options import KERNEL_AND_BIAS_ARGUMENTS

ADAPTER_FORMAT = "hlkeras-lora-adapters"
ADAPTER_FORMAT_VERSION = 1
METADATA_KEY = "metadata"
# `targets` value that adapts every linear layer except the head (peft's name).
ALL_LINEAR = "all-linear"
DEFAULT_ADAPTER = "default"


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


def _is_graph_model(layer):
    return isinstance(layer, keras.Model) and _compat.is_graph_model(layer)


def layer_paths(model, prefix=""):
    """`(path, layer)` of every layer of `model`, depth-first, entering
    nested functional and Sequential models: a layer of nested model
    `backbone` has path `"backbone/<its name>"`."""
    paths = []
    for layer in model.layers:
        paths.append((prefix + layer.name, layer))
        if _is_graph_model(layer):
            paths.extend(layer_paths(layer, f"{prefix}{layer.name}/"))
    return paths


def leaf_layers(model):
    """`layer_paths` without the nested models themselves: the layers that
    hold weights of their own."""
    return [(path, layer) for path, layer in layer_paths(model) if not _is_graph_model(layer)]


def _clone(model, clone_layer):
    """`clone_model` into nested models too, keeping every layer path.

    Nested models are entered here rather than by Keras' `recursive=True`,
    which rebuilds a nested model's inputs under new names (an unnamed
    `keras.Input` comes back as `keras_tensor`), so the clone's paths would
    differ from the model's. Each model level keeps its input names (a fresh
    `Input` gets a new name, which would also rename the inputs of an
    exported model) and its own name.
    """

    def clone_level(layer):
        if _is_graph_model(layer):
            return _clone(layer, clone_layer)
        return clone_layer(layer)

    if isinstance(model, keras.Sequential):
        return keras.models.clone_model(model, clone_function=clone_level)
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
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_level)


def _is_adapted_experts(layer):
    return isinstance(layer, MixtureOfExperts) and layer.lora_rank is not None


def adapted_projections(layer):
    """Every projection in `layer`, itself included, that carries an adapter,
    in tracking order: an hlkeras `LoRADense`, a `MixtureOfExperts` with
    expert adapters, or a Keras `Dense` / `EinsumDense` with Keras' own LoRA
    enabled (what `MultiHeadAttention(lora_rank=...)` uses)."""
    return [
        sublayer
        for sublayer in _compat.sublayers(layer, include_self=True)
        if isinstance(sublayer, LoRADense)
        or _is_adapted_experts(sublayer)
        or getattr(sublayer, "lora_enabled", False)
    ]


def _adapters_of(projection):
    if isinstance(projection, (LoRADense, MixtureOfExperts)):
        return projection.adapter_weights
    return [projection.lora_kernel_a, projection.lora_kernel_b]


def _rank_of(projection):
    return projection.rank if isinstance(projection, LoRADense) else projection.lora_rank


def _kind_of(projection):
    """`"DoRA"` for a weight-decomposed adapter, else `"LoRA"`."""
    return "DoRA" if getattr(projection, "dora", False) else "LoRA"


def _merged_kernels_of(projection):
    """`[(kernel variable, NumPy W + scale * A @ B), ...]` of one projection."""
    if isinstance(projection, LoRADense):
        return [(projection.kernel, projection.merged_kernel())]
    if isinstance(projection, MixtureOfExperts):
        kernels = (projection.expert_hidden_kernel, projection.expert_output_kernel)
        return list(zip(kernels, projection.merged_kernels()))
    # Keras' `kernel` property is the merged kernel when LoRA is enabled.
    return [(_compat.lora_base_kernel(projection), _as_numpy([projection.kernel])[0])]


def _fresh_adapter_values(projection):
    """`{id(variable): value}` that make `projection`'s adapter fresh
    without drawing `A` again: every `B` zero (so the outputs are the
    base's), a DoRA magnitude back at the kernel's column norms."""
    if isinstance(projection, MixtureOfExperts):
        b_weights = [projection.hidden_adapter[1], projection.output_adapter[1]]
    else:
        b_weights = [projection.lora_kernel_b]
    values = {id(b): np.zeros(b.shape, b.dtype) for b in b_weights}
    if getattr(projection, "dora", False):
        norm_squared = _as_numpy([projection.kernel_norm_squared])[0]
        values[id(projection.lora_magnitude)] = np.sqrt(norm_squared)
    return values


def adapter_weights(layer):
    """The adapter variables in `layer`: `A`, `B` of every adapted projection
    (and a DoRA projection's magnitude and kept kernel norms)."""
    return [w for projection in adapted_projections(layer) for w in _adapters_of(projection)]


def follows_lora_protocol(layer):
    """Whether `layer` is a registered serializable layer (`package>Name`;
    not a Keras built-in) with a `lora_rank` config key."""
    registered = keras.saving.get_registered_name(type(layer))
    return ">" in registered and "lora_rank" in layer.get_config()


def _is_plain_dense(layer):
    # Exactly Dense: a subclass may change `call`, which LoRADense would drop.
    return type(layer) is keras.layers.Dense


def _is_adaptable(layer):
    if _is_plain_dense(layer):
        return True
    return follows_lora_protocol(layer) and layer.get_config()["lora_rank"] is None


def _head_path(model):
    """The path of the model's last `Dense` (its head), or None."""
    dense_paths = [path for path, layer in leaf_layers(model) if _is_plain_dense(layer)]
    return dense_paths[-1] if dense_paths else None


def check_patterns_match(model, patterns):
    """The layer paths each glob pattern matches (`targets` of `apply_lora`
    and `hlkeras.prune`); a pattern that matches no layer is an error."""
    all_paths = [path for path, _ in layer_paths(model)]
    matches = {}
    for pattern in patterns:
        matches[pattern] = [path for path in all_paths if fnmatch.fnmatchcase(path, pattern)]
        if not matches[pattern]:
            raise ValueError(
                f"Argument `targets`: pattern {pattern!r} matches no layer of model "
                f"'{model.name}' (glob over layer paths). Layers: {_validation.few(all_paths)}"
            )
    return matches


def select_targets(model, targets=None):
    """Paths of the layers `apply_lora` gives adapters, in model order.

    Args:
        model: The functional or Sequential model.
        targets: None or `"all-linear"` (every adaptable layer, at any depth,
            except the last `Dense`, the head); a glob pattern or a list of
            them (`fnmatch`, matched against whole paths such as
            `"backbone/dense_1"`; a plain name matches itself only, so
            `"*dense_1"` reaches into nested models); or a predicate
            `fn(layer) -> bool` asked about each adaptable layer.
    """
    adaptable = [(path, layer) for path, layer in leaf_layers(model) if _is_adaptable(layer)]
    if targets is None or targets == ALL_LINEAR:
        head = _head_path(model)
        paths = [path for path, _ in adaptable if path != head]
    elif callable(targets):
        paths = [path for path, layer in adaptable if targets(layer)]
    elif isinstance(targets, str):
        paths = _paths_matching(model, adaptable, [targets])
    elif isinstance(targets, (list, tuple, set)) and all(isinstance(t, str) for t in targets):
        paths = _paths_matching(model, adaptable, list(targets))
    else:
        raise ValueError(
            f"Argument `targets` must be None, {ALL_LINEAR!r}, a glob pattern "
            "or a list of them, or a callable `fn(layer) -> bool`. "
            f"Received: targets={targets!r}"
        )
    if not paths:
        raise ValueError(
            "Argument `targets` selected no layer to adapt. Adaptable layers "
            f"of model '{model.name}': {[path for path, _ in adaptable]}. "
            f"Received: targets={targets!r}"
        )
    return paths


def _paths_matching(model, adaptable, patterns):
    """Adaptable paths matching any pattern; a pattern that matches no
    layer, or only layers that cannot take an adapter, is an error."""
    layers = dict(layer_paths(model))
    adaptable_paths = [path for path, _ in adaptable]
    matches = check_patterns_match(model, patterns)
    for pattern, matched in matches.items():
        if not set(matched) & set(adaptable_paths):
            not_adaptable = [f"{path} ({type(layers[path]).__name__})" for path in matched]
            raise ValueError(
                f"Argument `targets`: pattern {pattern!r} matches only layers that "
                f"cannot take an adapter: {_validation.few(not_adaptable)}. Adaptable: "
                "keras.layers.Dense and hlkeras layers with a `lora_rank` argument "
                f"that is not yet set. Adaptable layers: {_validation.few(adaptable_paths)}"
            )
    matched_any = set().union(*matches.values())
    return [path for path in adaptable_paths if path in matched_any]


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
    for key, value in (("lora_alpha", alpha), ("lora_dropout", dropout), ("lora_dora", dora)):
        if key in config:
            config[key] = value
    return type(layer).from_config(config)


def _freeze(layer):
    """Freezes a built layer and every sublayer it built. `trainable=False`
    in a config does not reach the sublayers a composite layer builds later,
    and on TensorFlow `layer.trainable = False` on a layer already False
    never reaches the setter (Keras' TF `__setattr__` skips assigning a
    value that `is` the current one), so each sublayer is set."""
    for sublayer in _compat.sublayers(layer, include_self=True):
        sublayer.trainable = False


def _plain_copy(layer, compute_dtype=None):
    # Also copies operation nodes, such as the `not_equal` of an
    # `Embedding(mask_zero=True)` mask.
    config = layer.get_config()
    if compute_dtype and layer.dtype_policy.name.startswith("mixed"):
        config["dtype"] = compute_dtype
    return type(layer).from_config(config)


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


def _takes_dora(layer):
    """A `Dense`, or an hlkeras layer whose config has a `lora_dora` switch
    (its projections are `LoRADense`; attention's are Keras' LoRA)."""
    return _is_plain_dense(layer) or "lora_dora" in layer.get_config()


def _check_dora_targets(layers_by_path, target_paths):
    lora_only = [
        f"{path} ({type(layers_by_path[path]).__name__})"
        for path in target_paths
        if not _takes_dora(layers_by_path[path])
    ]
    if lora_only:
        raise ValueError(
            "Argument `dora=True` adapts keras.layers.Dense, ResidualBlock and "
            f"FeedForward layers; these targets take LoRA only: {sorted(lora_only)}. "
            "Pass `targets` naming the others, or `dora=False`."
        )


def clone_by_path(model, clone_leaf):
    """`_clone(model)` with `clone_leaf(path, layer)` making every layer's
    twin (an operation node such as a mask's `not_equal` has no path)."""
    path_of = {id(layer): path for path, layer in layer_paths(model)}
    return _clone(model, lambda layer: clone_leaf(path_of.get(id(layer)), layer))


def copy_model(model, compute_dtype=None):
    """A copy of `model` with the same layer paths, configs and weights
    (copied through NumPy); the model passed in is left alone.

    With `compute_dtype` (such as `"float32"`), layers under a mixed
    precision policy compute in that dtype instead: the float32 twin of a
    `mixed_bfloat16` model, which the TFLite converter takes."""
    copy = clone_by_path(model, lambda path, layer: _plain_copy(layer, compute_dtype))
    if [tuple(w.shape) for w in copy.weights] != [tuple(w.shape) for w in model.weights]:
        raise ValueError(f"Model '{model.name}' does not rebuild from its layers' configs.")
    for target, value in zip(copy.weights, _as_numpy(model.weights)):
        target.assign(value)
    return copy


def apply_lora(
    model,
    rank=8,
    alpha=None,
    dropout=0.0,
    targets=None,
    dora=False,
    adapter_name=DEFAULT_ADAPTER,
):
    """Returns a copy of `model` with low-rank adapters on the chosen layers.

    Each targeted `keras.layers.Dense` becomes a `hlkeras.layers.LoRADense`
    that carries the trained kernel and bias, frozen, plus a fresh adapter
    (`B = 0`, so the outputs are unchanged). hlkeras layers with a
    `lora_rank` argument (see the module docstring) are rebuilt with
    `lora_rank=rank`. Every other layer is copied with its weights and frozen,
    except the head (the last `Dense`, when not targeted), which stays
    trainable. So `trainable_weights` holds only the adapters and the head.
    Layers inside nested functional and Sequential models are reached too.

    Args:
        model: A built functional or Sequential `keras.Model`. It is not
            modified.
        rank: Positive int, the adapter rank.
        alpha: Number > 0, the adapter strength (`scale = alpha / rank`).
            Defaults to `rank`.
        dropout: Float in [0, 1), dropout on the adapters' inputs.
        targets: None or `"all-linear"` for every `Dense` (and LoRA-capable
            hlkeras layer) at any depth except the last `Dense`; a glob
            pattern or a list of them, matched against layer paths
            (`"backbone/*"`, `"*attention*"`; see `select_targets`); or a
            predicate `fn(layer) -> bool`.
        dora: Weight-decomposed adapters (DoRA, `LoRADense(dora=True)`):
            each target also trains a magnitude per output unit, starting
            at its trained kernel's column norms. For `Dense`,
            `ResidualBlock` and `FeedForward` targets (attention and MoE
            experts take LoRA only).
        adapter_name: The name of this adapter among the model's named
            adapters (see `add_adapter`).

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
    _check_adapter_name(adapter_name, "adapter_name")
    target_paths = set(select_targets(model, targets))
    layers_by_path = dict(layer_paths(model))
    if dora:
        _check_dora_targets(layers_by_path, target_paths)
    head_path = _head_path(model)

    def clone_leaf(path, layer):
        if path in target_paths:
            return _lora_version(layer, rank, alpha, dropout, bool(dora))
        return _plain_copy(layer)  # frozen below, once built

    adapted = clone_by_path(model, clone_leaf)
    adapted_layers = dict(layer_paths(adapted))
    for path, old_layer in leaf_layers(model):
        new_layer = adapted_layers[path]
        if path in target_paths:
            _copy_values(
                old_layer.weights, _as_numpy(old_layer.weights), _base_weights(new_layer), path
            )
            for projection in adapted_projections(new_layer):
                if getattr(projection, "dora", False):
                    projection.reset_magnitude()  # m = ||trained kernel||_c
            _check_only_adapters_train(new_layer)
        else:
            new_layer.set_weights(_as_numpy(old_layer.weights))
            if path != head_path:
                _freeze(new_layer)
    _attach_bank(adapted, adapter_name)
    return adapted


def _merged_values(layer):
    """`layer`'s base weights and their NumPy values, each adapted kernel
    replaced by its merged kernel."""
    merged_kernels = {
        id(kernel): value
        for projection in adapted_projections(layer)
        for kernel, value in _merged_kernels_of(projection)
    }
    base = _base_weights(layer)
    values = [merged_kernels[id(w)] if id(w) in merged_kernels else _as_numpy([w])[0] for w in base]
    return base, values


def _plain_version(layer):
    """The unbuilt adapter-free twin of a LoRA-protocol layer."""
    config = layer.get_config()
    config["lora_rank"] = None
    if "lora_dora" in config:
        config["lora_dora"] = False
    return type(layer).from_config(config)


def merge_lora(model, name=None):
    """Returns a copy of `model` with every adapter merged into its layer.

    Each `LoRADense` becomes a `keras.layers.Dense` with kernel
    `W + scale * A @ B`; each LoRA-capable hlkeras layer is rebuilt with
    `lora_rank=None` and its merged weights. The result has no LoRA layer,
    the original parameter count, and the same outputs (to float rounding),
    ready for `.keras` saving or TFLite export. Frozen layers stay frozen.

    Args:
        model: A built functional or Sequential `keras.Model`, usually from
            `apply_lora`. It is not modified.
        name: Which named adapter to merge (see `add_adapter`); None for the
            active one. The active adapter stays active.

    Returns:
        A new, uncompiled `keras.Model`.
    """
    _check_model(model)
    if name is not None and name != active_adapter(model):
        with _adapter_active(model, name):
            return merge_lora(model)
    lora_paths = {path for path, layer in leaf_layers(model) if adapter_weights(layer)}

    def clone_leaf(path, layer):
        if isinstance(layer, LoRADense):
            return layer.merged()  # built, merged weights already in
        if path in lora_paths:
            return _plain_version(layer)
        return _plain_copy(layer)

    merged = clone_by_path(model, clone_leaf)
    merged_layers = dict(layer_paths(merged))
    for path, old_layer in leaf_layers(model):
        if isinstance(old_layer, LoRADense):
            continue
        new_layer = merged_layers[path]
        if path in lora_paths:
            sources, values = _merged_values(old_layer)
            _copy_values(sources, values, new_layer.weights, path)
        else:
            new_layer.set_weights(_as_numpy(old_layer.weights))
            if not old_layer.trainable:
                _freeze(new_layer)
    return merged


# One layer of an adapter file: `kind` is "adapter" (its `weights` are the
# adapter variables) or "trainable" (a layer that trains in full, e.g. a head).
_SavedLayer = collections.namedtuple(
    "_SavedLayer", ["path", "layer", "kind", "weights", "ranks", "adapter_kinds"]
)


def _saved_layers(model):
    """A `_SavedLayer` for every layer an adapter file holds: adapter layers
    (only `A`, `B`, and DoRA's magnitude) and layers that train in full."""
    entries = []
    for path, layer in leaf_layers(model):
        adapters = adapter_weights(layer)
        if adapters:
            projections = adapted_projections(layer)
            ranks = [_rank_of(projection) for projection in projections]
            kinds = [_kind_of(projection) for projection in projections]
            entries.append(_SavedLayer(path, layer, "adapter", adapters, ranks, kinds))
        elif layer.trainable_weights:
            entries.append(_SavedLayer(path, layer, "trainable", layer.weights, [], []))
    return entries


def _check_has_adapters(model, entries):
    if not any(entry.kind == "adapter" for entry in entries):
        raise ValueError(
            f"Argument `model` has no LoRA layer, so there are no adapters; "
            f"call `apply_lora` first. Received: model '{model.name}'"
        )


def save_adapters(model, path, name=None):
    """Writes only the adapters (and fully trainable layers, e.g. a new
    head) of `model` to one `.npz` file at exactly `path`.

    The file records each layer's path, class, kind (`"adapter"` or
    `"trainable"`), LoRA ranks and weight names and shapes, so
    `load_adapters` can check it fits before it changes anything.

    Args:
        model: A model from `apply_lora` (possibly with a new head).
        path: File path, conventionally ending in `.lora.npz`.
        name: Which named adapter to save (see `add_adapter`); None for the
            active one.
    """
    _check_model(model)
    entries = _saved_layers(model)
    _check_has_adapters(model, entries)
    values = iter(_adapter_values(model, name))
    arrays, layers = {}, []
    for layer_index, entry in enumerate(entries):
        for weight_index in range(len(entry.weights)):
            arrays[f"layer{layer_index}_weight{weight_index}"] = next(values)
        layers.append(
            {
                "name": entry.path,
                "class": type(entry.layer).__name__,
                "kind": entry.kind,
                "ranks": entry.ranks,
                "adapter_kinds": entry.adapter_kinds,
                "weights": [{"name": w.name, "shape": list(w.shape)} for w in entry.weights],
            }
        )
    metadata = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_FORMAT_VERSION,
        "model": model.name,
        "adapter": name or active_adapter(model),
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
    in_model = {entry.path: entry for entry in _saved_layers(model)}
    in_file = {entry["name"]: entry for entry in metadata["layers"]}
    for name in in_model.keys() - in_file.keys():
        problems.append(
            f"layer '{name}' has {in_model[name].kind} weights in the model but none in the file"
        )
    all_paths = {layer_path for layer_path, _ in layer_paths(model)}
    for name, entry in in_file.items():
        if name not in in_model:
            where = "is frozen and has no adapter" if name in all_paths else "does not exist"
            problems.append(
                f"layer '{name}' has {entry['kind']} weights in the file but {where} in the model"
            )
            continue
        kind, weights, ranks = in_model[name].kind, in_model[name].weights, in_model[name].ranks
        adapter_kinds = in_model[name].adapter_kinds
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


def load_adapters(model, path, name=None):
    """Loads a `save_adapters` file into `model`, in place.

    Everything is checked before any weight changes: the same adapter and
    trainable layers by path, the same LoRA ranks and kinds, and the same
    weight names and shapes. On any mismatch it raises a `ValueError`
    listing every difference (layer, both shapes) and leaves `model`
    untouched.

    Args:
        model: A model with the same adapter layout as the one saved, e.g.
            `apply_lora` of the same pretrained model with the same rank.
        path: The adapter file.
        name: Which named adapter receives the file (see `add_adapter`):
            None for the active one; a name the model does not have yet adds
            it (inactive), as `add_adapter` would.
    """
    _check_model(model)
    _check_has_adapters(model, _saved_layers(model))
    if name is not None:
        _check_adapter_name(name)
    metadata, arrays = _read_adapter_file(path)
    problems = _mismatches(model, metadata)
    if problems:
        raise ValueError(
            f"Argument `path` holds adapters that do not fit model "
            f"'{model.name}' (nothing was loaded). Received: path={path!r}\n- "
            + "\n- ".join(problems)
        )
    file_index = {entry["name"]: index for index, entry in enumerate(metadata["layers"])}
    values = [
        arrays[f"layer{file_index[entry.path]}_weight{weight_index}"]
        for entry in _saved_layers(model)
        for weight_index in range(len(entry.weights))
    ]
    bank = _bank(model)
    if name is None or name == bank.active:
        _assign(_swapped_weights(model), values)
    else:
        bank.stored[name] = [ops.convert_to_tensor(value) for value in values]


# --- named adapters ----------------------------------------------------------


class _AdapterBank:
    """The named adapters of one model. The active one lives in the model's
    variables; `stored` holds the others as backend tensors, one per
    variable of `_swapped_weights(model)`, in that order (tensors, not
    NumPy: a switch then moves nothing through the host; 1.3-2.2x faster
    here, `benchmarks/lora.py`).
    `initial_heads` maps the variables of the layers that train in full
    (heads) to the values a new adapter starts from."""

    def __init__(self, active, initial_heads):
        self.active = active
        self.stored = {}
        self.initial_heads = initial_heads

    @property
    def names(self):
        return [self.active, *self.stored]


# The bank is an attribute of its model, so it lives and dies with it.
_BANK_ATTRIBUTE = "_hlkeras_adapter_bank"


def _swapped_weights(model):
    """The variables a named adapter owns: every adapter variable and every
    fully trainable layer's weights (what an adapter file holds)."""
    return [w for entry in _saved_layers(model) for w in entry.weights]


def _copy(variable):
    # A copy, not the variable's buffer: torch assigns in place, and JAX's
    # `fit` can donate the buffer.
    return ops.copy(variable)


def _assign(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(value)


def _attach_bank(model, active):
    """Gives `model` an adapter bank; its heads' current values are what
    every added adapter's heads start from."""
    heads = [
        w for entry in _saved_layers(model) if entry.kind == "trainable" for w in entry.weights
    ]
    initial_heads = {id(w): value for w, value in zip(heads, _as_numpy(heads))}
    setattr(model, _BANK_ATTRIBUTE, _AdapterBank(active, initial_heads))


def _bank(model):
    """The model's adapter bank; a model from `apply_lora` has one, any
    other model with adapters (e.g. loaded from a `.keras` file) gets one
    whose active adapter is `"default"` and whose heads start from their
    current values."""
    bank = getattr(model, _BANK_ATTRIBUTE, None)
    if bank is None:
        _check_has_adapters(model, _saved_layers(model))
        _attach_bank(model, DEFAULT_ADAPTER)
        bank = getattr(model, _BANK_ATTRIBUTE)
    return bank


def _check_adapter_name(name, argument="name"):
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Argument `{argument}` must be a non-empty string naming an adapter. "
            f"Received: {argument}={name!r}"
        )


def _known_adapter(model, name):
    bank = _bank(model)
    if name not in bank.names:
        raise ValueError(
            f"Argument `name` must be one of the adapters of model '{model.name}': "
            f"{bank.names}. Received: name={name!r}"
        )
    return bank


def _adapter_values(model, name):
    """NumPy values of adapter `name` (None: the active one), in
    `_swapped_weights` order."""
    bank = _bank(model)
    if name is None or name == bank.active:
        return _as_numpy(_swapped_weights(model))
    return _as_numpy(_known_adapter(model, name).stored[name])


def adapter_names(model):
    """The names of `model`'s adapters, the active one first."""
    _check_model(model)
    return _bank(model).names


def active_adapter(model):
    """The name of the adapter `model` computes with (and trains)."""
    _check_model(model)
    return _bank(model).active


def add_adapter(model, name):
    """Adds a fresh adapter called `name` to `model`, inactive.

    It has the model's adapter layout (targets, rank, alpha, kind), and
    starts as `apply_lora` starts one: `B = 0` (DoRA: magnitudes at the
    kernels' column norms) and the heads `apply_lora` copied (for a model
    loaded from a file: the heads it has), so it computes the base model.
    `A` keeps its current values, a fine random start for any task. Then
    `set_adapter(model, name)` makes it active.

    A different rank or kind needs different variables (and on JAX and TF
    a new compiled step), so it needs its own `apply_lora` model.

    Args:
        model: A model with adapters, usually from `apply_lora`.
        name: A new adapter name.
    """
    _check_model(model)
    _check_adapter_name(name)
    bank = _bank(model)
    if name in bank.names:
        raise ValueError(
            f"Argument `name` must be a new adapter name; model '{model.name}' "
            f"has {bank.names}. Received: name={name!r}"
        )
    fresh = dict(bank.initial_heads)
    for _, layer in leaf_layers(model):
        for projection in adapted_projections(layer):
            fresh.update(_fresh_adapter_values(projection))
    bank.stored[name] = [
        ops.convert_to_tensor(fresh[id(variable)]) if id(variable) in fresh else _copy(variable)
        for variable in _swapped_weights(model)
    ]


def set_adapter(model, name):
    """Makes adapter `name` the one `model` computes with and trains.

    The active adapter's values are kept beside the model and `name`'s are
    copied into the same variables: nothing is rebuilt, and compiled
    predict and train steps stay valid on every backend. Before training
    another adapter, `compile` again: the optimizer's moments belong to the
    adapter they were built with.

    Args:
        model: A model with adapters.
        name: One of `adapter_names(model)`.
    """
    _check_model(model)
    bank = _known_adapter(model, name)
    if name == bank.active:
        return
    variables = _swapped_weights(model)
    _check_same_layout(model, variables, bank.stored[name])
    bank.stored[bank.active] = [_copy(variable) for variable in variables]
    _assign(variables, bank.stored.pop(name))
    bank.active = name


def _check_same_layout(model, variables, values):
    """The stored values still line up with the model's adapter variables
    (they do not when a layer was frozen or unfrozen after `add_adapter`)."""
    shapes = [tuple(v.shape) for v in variables]
    if shapes != [tuple(value.shape) for value in values]:
        raise ValueError(
            f"Model '{model.name}' no longer has the layout its named adapters were "
            f"made for: its adapter and trainable layers changed since (now "
            f"{len(shapes)} variables, {len(values)} stored). Nothing was switched; "
            "restore the layers' `trainable` flags, or start again with `apply_lora`."
        )


@contextlib.contextmanager
def _adapter_active(model, name):
    """`name` active inside the block, the previous adapter after it."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield
    finally:
        set_adapter(model, previous)
