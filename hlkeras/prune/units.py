"""Structured pruning: whole hidden units, attention heads, MoE experts and
convolution channels out, and a smaller plain model back.

Each kind of unit is a slice of a few weights, cut together:
- `"hidden"`: the inner units of `ResidualBlock`, `FeedForward` and a
  `TransformerBlock`'s dense FFN (a column of the first `Dense`, its bias
  entry, a row of the second);
- `"heads"`: the heads of `MultiHeadAttention`, standalone or in a
  `TransformerBlock`, a grouped-query group at a time (one key/value head
  and the query heads it serves);
- `"experts"`: the experts of `MixtureOfExperts`, standalone or in a
  `TransformerBlock` (their kernels, biases and router column);
- `"channels"`: the inner channels of `ConvResidualBlock` (an output
  channel of a branch convolution, its BatchNorm entries, the next
  convolution's input channel). The block's output channels stay, so the
  shortcut and the next layer are untouched.

A unit's saliency is the product of the norms of what flows into it and out
of it (a BatchNorm folded into the convolution before it), so a unit whose
incoming or outgoing weights are all zero ranks first (ties to the lower
index), and removing units whose outgoing weights are zero changes no
output. Experts can instead be ranked by the router load their layer
recorded in training (`criterion="load"`).
"""

import math

import numpy as np
from keras import ops

from hlkeras import _validation
from hlkeras import lora
from hlkeras.layers import ConvResidualBlock
from hlkeras.layers import FeedForward
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import MultiHeadAttention
from hlkeras.layers import ResidualBlock
from hlkeras.layers import TransformerBlock
from hlkeras.prune.masks import check_sparsity
from hlkeras.prune.masks import matched_paths
from hlkeras.prune.masks import smallest

KINDS = ("hidden", "heads", "experts", "channels")
CRITERIA = ("l2", "l1", "load")
# The layers `structured` looks into, for its messages.
PRUNABLE_LAYERS = (
    ResidualBlock,
    FeedForward,
    ConvResidualBlock,
    MultiHeadAttention,
    MixtureOfExperts,
    TransformerBlock,
)


def structured(model, ratio, *, targets=None, kinds=None, criterion="l2"):
    """A new, smaller plain model: `model` with the `ratio` least salient
    units of each kind removed from every selected layer.

    The smaller model has the same graph and layer paths, each pruned
    layer's config narrowed (`hidden_units`, `ffn_units`, `num_heads` and
    `num_kv_heads`, `num_experts`, `inner_filters`), and the surviving
    weights copied. `model` itself is not changed.

    Args:
        model: A functional or Sequential `keras.Model`.
        ratio: The fraction in [0, 1) of each layer's units of each kind to
            remove, rounded down. At least one unit stays, one grouped-query
            group of heads, and `top_k` experts (their top-k would change).
        targets: Which layers, as in `hlkeras.lora` (default: all).
        kinds: The kinds of unit to remove, a subset of `"hidden"`,
            `"heads"`, `"experts"`, `"channels"` (default: all).
        criterion: `"l2"` or `"l1"`, the norm of the saliency; or `"load"`:
            experts by the router load their layer recorded in training
            (`MixtureOfExperts.routing_statistics`), other units by `"l2"`.

    Returns:
        The smaller model.

    Example:

    >>> inputs = keras.Input((16,))
    >>> outputs = hlkeras.layers.ResidualBlock(16, hidden_units=64)(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> smaller = structured(model, 0.5)
    >>> smaller.layers[-1].hidden_units, model.count_params() > smaller.count_params()
    (32, True)
    """
    ratio = check_sparsity(ratio, "ratio")
    criterion = _validation.check_choice("criterion", criterion, CRITERIA)
    kinds = _check_kinds(kinds)
    plans = {}
    for path, layer in _selected_layers(model, targets):
        config, slices = _plan(layer, ratio, criterion, kinds)
        if config:
            plans[path] = (config, slices)
    if not plans:
        raise ValueError(
            f"structured pruning found no unit of kinds {list(kinds)} in the selected "
            f"layers of model '{model.name}': {_validation.few(_prunable_paths(model))}"
        )

    def narrowed(path, layer):
        config = layer.get_config()
        config.update(plans.get(path, ({}, {}))[0])
        return type(layer).from_config(config)

    smaller = lora.clone_by_path(model, narrowed)
    new_layers = dict(lora.leaf_layers(smaller))
    for path, layer in lora.leaf_layers(model):
        slices = plans.get(path, ({}, {}))[1]
        for source, target in zip(layer.weights, new_layers[path].weights):
            value = _numpy(source)
            for axis, kept in slices.get(id(source), {}).items():
                value = np.take(value, kept, axis=axis)
            target.assign(value)
    return smaller


def _check_kinds(kinds):
    kinds = KINDS if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for kind in kinds:
        _validation.check_choice("kinds", kind, KINDS)
    return kinds


def _prunable_paths(model):
    return [p for p, layer in lora.leaf_layers(model) if isinstance(layer, PRUNABLE_LAYERS)]


def _selected_layers(model, targets):
    candidates = [(p, layer) for p, layer in lora.leaf_layers(model)]
    if not any(isinstance(layer, PRUNABLE_LAYERS) for _, layer in candidates):
        raise ValueError(
            f"structured pruning found nothing to prune in model '{model.name}': it removes "
            f"units of {', '.join(c.__name__ for c in PRUNABLE_LAYERS)} layers, and the "
            f"model's layers are {_validation.few([p for p, _ in candidates])}"
        )
    matched = matched_paths(model, targets)
    selected = [
        (p, layer)
        for p, layer in candidates
        if isinstance(layer, PRUNABLE_LAYERS) and (matched is None or p in matched)
    ]
    if not selected:
        raise ValueError(
            f"Argument `targets` selected no {' or '.join(c.__name__ for c in PRUNABLE_LAYERS)} "
            f"layer. Those in model '{model.name}': {_validation.few(_prunable_paths(model))}. "
            f"Received: targets={targets!r}"
        )
    for path, layer in selected:
        if lora.adapter_weights(layer):
            raise ValueError(
                f"Layer '{path}' has LoRA adapters; structured pruning cuts the base weights "
                "only. Merge the adapters first: hlkeras.lora.merge_lora(model)"
            )
    return selected


# --------------------------------------------------------------------------
# One plan per layer: (config updates, {id(variable): {axis: kept indices}})


def _plan(layer, ratio, criterion, kinds):
    order = 1 if criterion == "l1" else 2
    parts = []
    if isinstance(layer, (ResidualBlock, FeedForward)) and "hidden" in kinds:
        key = "hidden_units" if isinstance(layer, ResidualBlock) else "ffn_units"
        parts.append(_hidden_plan(layer, key, ratio, order))
    if isinstance(layer, MultiHeadAttention) and "heads" in kinds:
        parts.append(_heads_plan(layer, ratio, order))
    if isinstance(layer, MixtureOfExperts) and "experts" in kinds:
        parts.append(_experts_plan(layer, ratio, order, criterion))
    if isinstance(layer, ConvResidualBlock) and "channels" in kinds:
        parts.append(_channels_plan(layer, ratio, order))
    if isinstance(layer, TransformerBlock):
        # Its sublayers' config keys (num_heads, ffn_units, num_experts, ...)
        # are the block's own.
        parts += [
            _plan(sublayer, ratio, criterion, kinds) for sublayer in (layer.attention, layer.ffn)
        ]
    config, slices = {}, {}
    for part_config, part_slices in parts:
        config.update(part_config)
        for variable_id, axes in part_slices.items():
            slices.setdefault(variable_id, {}).update(axes)
    return config, slices


def _hidden_plan(block, key, ratio, order):
    """The hidden units of a `hidden_dense` -> `output_dense` pair."""
    hidden, output = block.hidden_dense, block.output_dense
    incoming = _unit_norms([(hidden.kernel, 1), (hidden.bias, 0)], order)
    outgoing = _unit_norms([(output.kernel, 0)], order)
    kept = _kept(incoming * outgoing, _removed(ratio, incoming.size))
    slices = {id(hidden.kernel): {1: kept}, id(hidden.bias): {0: kept}}
    slices[id(output.kernel)] = {0: kept}
    return {key: len(kept)}, slices


def _heads_plan(attention, ratio, order):
    """Whole grouped-query groups: key/value head `g` and the query heads
    `g * size ... (g + 1) * size - 1` it serves (the einsum core's layout)."""
    groups = attention.num_kv_heads
    size = attention.num_heads // groups
    value, output = attention._value_dense, attention._output_dense
    incoming = _unit_norms([(value.kernel, 1), (value.bias, 0)], order)
    per_head = _unit_norms([(output.kernel, 0)], order)
    outgoing = np.linalg.norm(per_head.reshape(groups, size), order, axis=1)
    kept_groups = _kept(incoming * outgoing, _removed(ratio, groups))
    kept_heads = (kept_groups[:, None] * size + np.arange(size)).ravel()
    slices = {}
    query_side = [attention._query_dense] + ([attention._gate_dense] if attention._use_gate else [])
    for dense, kept in [(d, kept_heads) for d in query_side] + [
        (attention._key_dense, kept_groups),
        (value, kept_groups),
    ]:
        slices[id(dense.kernel)] = {1: kept}
        if dense.bias is not None:
            slices[id(dense.bias)] = {0: kept}
    slices[id(output.kernel)] = {0: kept_heads}
    config = {
        "num_heads": len(kept_heads),
        "num_kv_heads": len(kept_groups),
        # A TransformerBlock derives key_dim from num_heads unless it is set.
        "key_dim": attention.key_dim,
    }
    return config, slices


def _experts_plan(moe, ratio, order, criterion):
    """Whole experts: their kernels, biases, router column and load."""
    if criterion == "load":
        saliency = _recorded_load(moe)
    else:
        incoming = _unit_norms([(moe.expert_hidden_kernel, 0), (moe.expert_hidden_bias, 0)], order)
        outgoing = _unit_norms([(moe.expert_output_kernel, 0), (moe.expert_output_bias, 0)], order)
        saliency = incoming * outgoing
    experts = moe.num_experts
    kept = _kept(saliency, min(_removed(ratio, experts), experts - moe.top_k))
    per_expert = (
        moe.expert_hidden_kernel,
        moe.expert_hidden_bias,
        moe.expert_output_kernel,
        moe.expert_output_bias,
        moe.routing_load_total,
    )
    slices = {id(v): {0: kept} for v in per_expert}
    slices[id(moe.router.kernel)] = {1: kept}
    return {"num_experts": len(kept)}, slices


def _recorded_load(moe):
    statistics = moe.routing_statistics()
    if not statistics["calls"]:
        raise ValueError(
            f"criterion='load' ranks experts by the router load recorded in training, and "
            f"layer '{moe.name}' has recorded none (a model fresh from a file or never "
            "trained). Use criterion='l2'."
        )
    return statistics["expert_load"]


def _channels_plan(block, ratio, order):
    """The inner channels between each pair of the branch's convolutions."""
    convs, norms = block.branch_convs, block.branch_norms
    slices = {}
    for conv, norm, following in zip(convs, norms, convs[1:]):
        scale = _numpy(norm.gamma) / np.sqrt(_numpy(norm.moving_variance) + norm.epsilon)
        folded_kernel = _numpy(conv.kernel) * scale
        folded_bias = _numpy(norm.beta) - _numpy(norm.moving_mean) * scale
        incoming = _unit_norms([(folded_kernel, -1), (folded_bias, 0)], order)
        outgoing = _unit_norms([(following.kernel, -2)], order)
        kept = _kept(incoming * outgoing, _removed(ratio, incoming.size))
        slices.setdefault(id(conv.kernel), {})[conv.kernel.ndim - 1] = kept
        slices.setdefault(id(following.kernel), {})[following.kernel.ndim - 2] = kept
        for variable in (norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance):
            slices[id(variable)] = {0: kept}
    return {"inner_filters": len(kept)}, slices


# --------------------------------------------------------------------------
# Saliency


def _numpy(value):
    return np.asarray(ops.convert_to_numpy(value), dtype="float64")


def _unit_norms(parts, order):
    """The `order`-norm per unit of the concatenation of `parts`, each an
    `(array, unit axis)`: `(sum_i ||part_i[unit]||^p)^(1/p)`."""
    total = 0.0
    for array, axis in parts:
        array = _numpy(array)
        per_unit = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
        total = total + np.sum(np.abs(per_unit) ** order, axis=1)
    return total ** (1 / order)


def _removed(ratio, count):
    # Rounded down, and the ratio is below 1: at least one unit stays.
    return math.floor(ratio * count)


def _kept(saliency, removed):
    """The sorted indices of the units that stay."""
    return np.flatnonzero(~smallest(saliency, removed))
