"""NumPy oracles of `MixtureOfExperts` (routing, the slot rule, the naive
all-experts mixture), shared by the MoE tests and the layer property tests."""

import math

import keras
import numpy as np

RNG = np.random.default_rng(0)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


# --- NumPy oracles -------------------------------------------------------------


def np_activation(name, x):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":  # exact (erf) gelu, Keras' default
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    raise NotImplementedError(name)


def np_route(logits, top_k):
    """Top-k experts (best first) and softmax over the chosen logits."""
    expert_index = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    chosen = np.take_along_axis(logits, expert_index, axis=1)
    gates = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    return expert_index, gates / gates.sum(axis=1, keepdims=True)


def np_kept(expert_index, num_experts, capacity):
    """The slot rule: first choices of all tokens queue before second
    choices, earlier tokens first; an expert keeps its first `capacity`."""
    num_tokens, top_k = expert_index.shape
    kept = np.zeros((num_tokens, top_k), dtype=bool)
    queue_length = np.zeros(num_experts, dtype=int)
    for choice in range(top_k):
        for token in range(num_tokens):
            expert = expert_index[token, choice]
            kept[token, choice] = queue_length[expert] < capacity
            queue_length[expert] += 1
    return kept


def layer_weights(layer):
    return {
        "router": to_numpy(layer.router.kernel),
        "w1": to_numpy(layer.expert_hidden_kernel),
        "b1": to_numpy(layer.expert_hidden_bias),
        "w2": to_numpy(layer.expert_output_kernel),
        "b2": to_numpy(layer.expert_output_bias),
    }


def np_moe(tokens, weights, top_k, activation, kept=None):
    """Naive MoE: runs every expert on every token, then weights by the gates
    of the chosen (and kept) experts."""
    logits = tokens @ weights["router"]
    expert_index, gates = np_route(logits, top_k)
    if kept is not None:
        gates = gates * kept
    hidden = np_activation(
        activation, np.einsum("td,edh->teh", tokens, weights["w1"]) + weights["b1"]
    )
    all_outputs = np.einsum("teh,eho->teo", hidden, weights["w2"]) + weights["b2"]
    chosen = np.take_along_axis(all_outputs, expert_index[:, :, None], axis=1)
    return np.sum(chosen * gates[:, :, None], axis=1)


def randomize_biases(layer, rng=RNG):
    # Zero-initialized biases would let a missing bias pass the oracle.
    for variable in (layer.expert_hidden_bias, layer.expert_output_bias):
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
