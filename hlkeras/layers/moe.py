"""Sparse Mixture-of-Experts: a router picks `top_k` of `num_experts` FFN
experts per token, and each expert computes only the tokens sent to it.

The layer is built from small pure functions (keras.ops only), in the order
the data moves:

1. `route_top_k`: router logits -> chosen experts, gates, router probabilities.
2. `expert_positions`: each (token, choice) assignment's position in its
   queue, and the assignments sorted by queue. In capacity mode every
   (expert, example) pair has its own queue (GShard groups), so a token's
   fate never depends on the other examples in the batch.
3. `capacity_layout` / `dropless_layout`: which buffer row each assignment
   goes to (or that it is dropped), and which token fills each buffer row.
4. `dispatch_tokens`: gathers the tokens into the expert buffer.
5. `expert_ffn`: every expert's FFN as one batched matmul over the buffer.
   (On eager torch, where shapes may be dynamic, `grouped_experts_eager`
   replaces 3-6: torch's grouped GEMM runs each expert on exactly the rows
   it keeps, nothing padded.)
6. `combine_expert_outputs`: gathers each assignment's row back and sums the
   gate-weighted results per token.

Tokens move only by gathers (`ops.take`), never by a dense
`[tokens, experts, capacity]` one-hot einsum (quadratic in tokens) nor by
`ops.scatter` (a Python loop on torch); a custom gradient makes the backward
pass gathers too, instead of the scatter-adds autodiff would emit. Priority
in a queue is "choice-major": every token's first choice is queued before
any second choice, and within a choice earlier tokens come first
(Switch/GShard). Sorting
uses unique keys, so the order is deterministic on every backend even where
argsort is unstable.

`expert_parallel_layout` is a `keras.distribution.LayoutMap` recipe that
shards the expert weights over a device-mesh axis (expert parallelism on JAX).
"""

import collections
import fractions
import math

import keras
import numpy as np
from keras import ops

from hlkeras import _validation
from hlkeras.layers.lora_dense import check_lora_arguments
from hlkeras.layers.lora_dense import lora_scale
from hlkeras.layers.weight_options import WeightOptions

# Rows per block in dropless mode, as a fraction of the average expert load:
# a block of `ceil(assignments / (experts * DROPLESS_BLOCKS_PER_EXPERT))`
# rows wastes at most one partial block per expert, so the buffer holds at
# most `(1 + 1 / DROPLESS_BLOCKS_PER_EXPERT)` times the assignments.
DROPLESS_BLOCKS_PER_EXPERT = 2


# --- 1. routing --------------------------------------------------------------


def route_top_k(router_logits, top_k):
    """Chooses `top_k` experts per token.

    Args:
        router_logits: `(tokens, experts)` float32 logits.
        top_k: Number of experts per token.

    Returns:
        `(expert_index, gates, router_probs)`: `(tokens, top_k)` int32 chosen
        experts (best first), `(tokens, top_k)` gates (softmax over the chosen
        logits) and `(tokens, experts)` softmax over all logits.
    """
    top_logits, expert_index = ops.top_k(router_logits, k=top_k)
    gates = _softmax(top_logits)
    router_probs = _softmax(router_logits)
    return ops.cast(expert_index, "int32"), gates, router_probs


def _softmax(logits):
    # By hand: `ops.softmax` warns on a size-1 axis (top_k=1 or one expert),
    # where this still gives 1, or NaN for NaN logits, as it should.
    shifted = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
    return shifted / ops.sum(shifted, axis=-1, keepdims=True)


def load_balance_loss(router_probs, expert_index, num_experts):
    """Switch Transformer load-balance loss (without its weight).

    `E * sum_i f_i * P_i`, where `f_i` is the fraction of the
    `tokens * top_k` assignments that chose expert i (before any capacity
    drop) and `P_i` the mean router probability of expert i. It is 1 for a
    perfectly uniform router and grows as routing concentrates.
    """
    chosen = ops.one_hot(ops.reshape(expert_index, (-1,)), num_experts)
    assignment_fraction = ops.mean(chosen, axis=0)
    mean_probability = ops.mean(router_probs, axis=0)
    return num_experts * ops.sum(assignment_fraction * mean_probability)


def router_z_loss(router_logits):
    """ST-MoE router z-loss (without its weight): `mean(logsumexp(logits)^2)`.

    It keeps the logits small, which keeps the router softmax stable in low
    precision.
    """
    return ops.mean(ops.square(ops.logsumexp(router_logits, axis=-1)))


# --- 2. queue positions ------------------------------------------------------


def expert_positions(expert_index, num_experts, group_size=None):
    """Places every (token, choice) assignment in its queue.

    Tokens form groups of `group_size` consecutive tokens (one group of all
    tokens when `None`), and every (expert, group) pair has a queue of its
    own, numbered `queue = expert * groups + group`. Within a queue,
    priority is choice-major: every token's first choice before any second
    choice, earlier tokens first. Assignments are numbered choice-major over
    all tokens: `a = choice * tokens + token`.

    Args:
        expert_index: `(tokens, top_k)` int32 chosen experts.
        num_experts: Number of experts.
        group_size: Tokens per group; must divide the token count.

    Returns:
        `(assignment_queue, position_in_queue, queue_lengths,
        sorted_assignments)`: `(A,)` queue of each assignment, `(A,)` its
        0-based position in that queue, `(E * groups,)` queue lengths, and
        the `(A,)` assignment numbers sorted by (queue, priority).
    """
    num_tokens = ops.shape(expert_index)[0]
    top_k = expert_index.shape[-1]
    if group_size is None:
        group_size = num_tokens
    num_groups = num_tokens // group_size

    def in_assignment_order(per_group):
        # (groups, top_k * group_size) choice-major per group -> (A,)
        per_group = ops.reshape(per_group, (-1, top_k, group_size))
        return ops.reshape(ops.transpose(per_group, (1, 0, 2)), (-1,))

    grouped = ops.reshape(expert_index, (-1, group_size, top_k))
    grouped = ops.reshape(ops.transpose(grouped, (0, 2, 1)), (-1, top_k * group_size))
    chosen = ops.one_hot(grouped, num_experts, dtype="int32")
    # Running count per (group, expert): the n-th assignment to a queue sees n.
    position = ops.sum(ops.cumsum(chosen, axis=1) * chosen, axis=-1) - 1
    queue_lengths = ops.reshape(ops.transpose(ops.sum(chosen, axis=1)), (-1,))

    assignment = ops.arange(num_tokens * top_k, dtype="int32")
    choice, token = assignment // num_tokens, assignment % num_tokens
    # Priority inside a group: choice * group_size + token-in-group.
    priority = choice * group_size + token % group_size
    assignment_queue = in_assignment_order(grouped) * num_groups + token // group_size
    # Unique keys make the sort order independent of argsort stability.
    sort_keys = assignment_queue * (top_k * group_size) + priority
    sorted_assignments = ops.cast(ops.argsort(sort_keys), "int32")
    return (
        assignment_queue,
        in_assignment_order(position),
        queue_lengths,
        sorted_assignments,
    )


# --- 3. buffer layouts -------------------------------------------------------
# A layout cuts the expert buffer into `num_blocks` blocks of `block_size`
# rows; every block belongs to one expert (`block_expert`), and an expert's
# queue fills its blocks in order from `first_block[e]`. Kept assignments and
# used rows map one-to-one: `assignment_row` and `row_assignment` are the
# two directions of that map, so both dispatch and combine, and their
# gradients, are gathers.

BufferLayout = collections.namedtuple(
    "BufferLayout",
    [
        "assignment_row",  # (A,) buffer row of each assignment (0 if dropped)
        "assignment_kept",  # (A,) bool
        "row_assignment",  # (R,) assignment in each row (arbitrary if unused)
        "row_valid",  # (R,) bool: the row holds an assignment
        "block_expert",  # (blocks,) expert of each block, or None: block e = e
        "block_size",  # rows per block
    ],
)


def _rows_to_assignments(
    block_expert,
    first_block,
    block_size,
    tokens_per_expert,
    sorted_assignments,
    max_position,
):
    """The assignment that fills each buffer row, and whether the row is used."""
    num_blocks = ops.shape(block_expert)[0]
    row_in_block = ops.arange(block_size, dtype="int32")
    block_offset = (
        ops.arange(num_blocks, dtype="int32") - ops.take(first_block, block_expert, axis=0)
    ) * block_size
    position = ops.reshape(block_offset[:, None] + row_in_block[None, :], (-1,))
    row_expert = ops.repeat(block_expert, block_size)
    queue_length = ops.minimum(ops.take(tokens_per_expert, row_expert, axis=0), max_position)
    row_valid = position < queue_length
    queue_start = ops.cumsum(tokens_per_expert) - tokens_per_expert
    sorted_slot = ops.take(queue_start, row_expert, axis=0) + position
    num_assignments = ops.shape(sorted_assignments)[0]
    # Unused rows point at a valid index; `row_valid` masks them out later.
    sorted_slot = ops.where(row_valid, sorted_slot, 0)
    sorted_slot = ops.minimum(sorted_slot, num_assignments - 1)
    row_assignment = ops.take(sorted_assignments, sorted_slot, axis=0)
    return row_assignment, row_valid


def capacity_layout(
    assignment_queue,
    position_in_queue,
    queue_lengths,
    sorted_assignments,
    num_tokens,
    expert_capacity,
):
    """One block of `expert_capacity` rows per queue; overflow is dropped.

    The queues are numbered expert-major (`expert * groups + group`, see
    `expert_positions`), so the buffer's blocks reshape to
    `(E, groups * capacity)` rows per expert.

    Returns:
        A `BufferLayout`; its `block_expert` is `None`: the blocks of
        expert e are contiguous, so the expert weights need no gather.
    """
    num_queues = ops.shape(queue_lengths)[0]
    assignment_kept = position_in_queue < expert_capacity
    assignment_row = ops.where(
        assignment_kept, assignment_queue * expert_capacity + position_in_queue, 0
    )
    block_queue = ops.arange(num_queues, dtype="int32")
    row_assignment, row_valid = _rows_to_assignments(
        block_queue,
        block_queue,
        expert_capacity,
        queue_lengths,
        sorted_assignments,
        expert_capacity,
    )
    return BufferLayout(
        assignment_row,
        assignment_kept,
        row_assignment,
        row_valid,
        None,
        expert_capacity,
    )


def dropless_block_size(num_assignments, num_experts):
    """Rows per block: the average expert load / DROPLESS_BLOCKS_PER_EXPERT.

    `num_assignments` may be a tensor (dynamic batch); the result then is one.
    """
    blocks = num_experts * DROPLESS_BLOCKS_PER_EXPERT
    if isinstance(num_assignments, int):
        return max(1, -(-num_assignments // blocks))
    return ops.maximum(1, (num_assignments + blocks - 1) // blocks)


def dropless_num_blocks(num_assignments, num_experts, block_size):
    """Upper bound on the blocks needed: each expert wastes < one block."""
    return num_assignments // block_size + num_experts


def dropless_layout(
    assignment_expert,
    position_in_expert,
    tokens_per_expert,
    sorted_assignments,
    num_tokens,
    block_size,
    num_blocks,
):
    """Every assignment kept: each expert gets `ceil(load / block_size)` blocks.

    This is a block-sparse grouped matmul (as in MegaBlocks): the buffer has a
    static size of `num_blocks * block_size` rows, so it jits, while no token
    is ever dropped.

    Returns:
        Like `capacity_layout`, with `block_expert` the `(num_blocks,)` expert
        of every block (unused trailing blocks point at expert 0, all rows
        invalid).
    """
    num_experts = ops.shape(tokens_per_expert)[0]
    blocks_per_expert = (tokens_per_expert + block_size - 1) // block_size
    block_end = ops.cumsum(blocks_per_expert)
    first_block = block_end - blocks_per_expert
    block_index = ops.arange(num_blocks, dtype="int32")
    # Block j belongs to the first expert whose blocks end after j.
    block_expert = ops.sum(ops.cast(block_end[None, :] <= block_index[:, None], "int32"), axis=-1)
    block_expert = ops.minimum(block_expert, num_experts - 1)
    row_assignment, row_valid = _rows_to_assignments(
        block_expert,
        first_block,
        block_size,
        tokens_per_expert,
        sorted_assignments,
        num_tokens,
    )
    # Trailing spare blocks were clamped onto the last expert: mask them.
    spare_block = block_index >= block_end[-1]
    row_valid = ops.logical_and(row_valid, ops.logical_not(ops.repeat(spare_block, block_size)))
    assignment_row = (
        ops.take(first_block, assignment_expert, axis=0) * block_size + position_in_expert
    )
    assignment_kept = ops.ones_like(position_in_expert, dtype="bool")
    return BufferLayout(
        assignment_row,
        assignment_kept,
        row_assignment,
        row_valid,
        block_expert,
        block_size,
    )


# --- 4.-6. dispatch, experts, combine -----------------------------------------


def _sum_of_row_blocks(rows, blocks, weights=None):
    """`sum_i weights[:, i:i+1] * rows[i*n:(i+1)*n]` over `blocks` equal row
    blocks of `rows` (`weights` optional, `(n, blocks)`).

    Static slices added one by one, not `ops.sum` over a reshaped leading
    axis: XLA on CPU fuses the gather that produced `rows` into such a
    reduction and runs it 30x slower (13 ms against 0.35 ms for 8192 rows of
    256, JAX 0.10).
    """
    block_rows = ops.shape(rows)[0] // blocks
    total = None
    for i in range(blocks):
        block = rows[i * block_rows : (i + 1) * block_rows]
        if weights is not None:
            block = block * weights[:, i : i + 1]
        total = block if total is None else total + block
    return total


def _masked_take(source, index, valid):
    rows = ops.take(source, index, axis=0)
    return ops.where(valid[:, None], rows, ops.cast(0, rows.dtype))


def _gather_rows(source, index, valid, inverse_index, inverse_valid, groups):
    """`where(valid, source[index], 0)` whose gradient is a gather too.

    Autodiff turns a gather's gradient into a scatter-add, which XLA runs
    slowly on CPU. Here the rows moved form a one-to-one map (up to `groups`
    rows per source row: a token's top-k choices), so the gradient of
    `source` is a gather through the inverse map, summed over the groups.

    Args:
        source: `(N, d)`.
        index, valid: `(M,)` row of `source` for each output row, and whether
            that output row is used.
        inverse_index, inverse_valid: `(groups * N,)` output row for each
            (group, source row), group-major, and whether it exists.
        groups: Static int.
    """

    @ops.custom_gradient
    def gather(source):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            source_grad = _masked_take(upstream, inverse_index, inverse_valid)
            return _sum_of_row_blocks(source_grad, groups)

        return _masked_take(source, index, valid), grad

    return gather(source)


def dispatch_tokens(tokens, layout, top_k):
    """Gathers `(tokens, d)` into the `(blocks, block_size, d)` expert buffer."""
    num_tokens = ops.shape(tokens)[0]
    rows = _gather_rows(
        tokens,
        layout.row_assignment % num_tokens,
        layout.row_valid,
        layout.assignment_row,
        layout.assignment_kept,
        top_k,
    )
    return ops.reshape(rows, (-1, layout.block_size, ops.shape(tokens)[-1]))


def expert_ffn(
    expert_inputs,
    hidden_kernel,
    hidden_bias,
    output_kernel,
    output_bias,
    activation,
    block_expert=None,
    hidden_dropout=None,
    training=None,
    hidden_adapter=None,
    output_adapter=None,
    adapter_scale=1.0,
    row_loads=None,
):
    """Runs every block of the buffer through its expert's FFN.

    Args:
        expert_inputs: `(blocks, rows, d)` buffer, or with `row_loads`,
            `(rows, d)` rows sorted by expert.
        hidden_kernel, hidden_bias, output_kernel, output_bias: The stacked
            expert weights `(E, d, h)`, `(E, h)`, `(E, h, o)`, `(E, o)`.
        activation: Activation function.
        block_expert: `None` when block e is expert e, else `(blocks,)`
            expert of every block (the weights are gathered per block).
        hidden_dropout: Optional dropout layer for the hidden activations.
        training: Passed to the dropout layer.
        hidden_adapter, output_adapter: Optional per-expert LoRA adapters
            `(A, B)` of the two kernels, `(E, d_in, r)` and `(E, r, d_out)`:
            each expert computes `x @ W_e + scale * (x @ A_e) @ B_e`.
        adapter_scale: The adapters' `scale`.
        row_loads: Eager torch only (`grouped_mm_fits`): NumPy ints, expert
            e's FFN runs on the next `row_loads[e]` rows of `expert_inputs`,
            through `torch.nn.functional.grouped_mm`.

    Returns:
        `(blocks, rows, o)` expert outputs (`(rows, o)` with `row_loads`).
    """
    if row_loads is None:
        matmul, add_bias = _batched_ops(block_expert)
    else:
        matmul, add_bias = _grouped_mm_ops(row_loads, expert_inputs)

    def project(x, kernel, bias, adapter):
        outputs = matmul(x, kernel)
        if adapter is not None:
            a, b = adapter
            # Scale the thin (..., r) activation, as `LoRADense` does.
            outputs = outputs + matmul(matmul(x, a) * adapter_scale, b)
        return add_bias(outputs, bias)

    hidden = activation(project(expert_inputs, hidden_kernel, hidden_bias, hidden_adapter))
    if hidden_dropout is not None:
        hidden = hidden_dropout(hidden, training=training)
    return project(hidden, output_kernel, output_bias, output_adapter)


def _batched_ops(block_expert):
    """`(matmul, add_bias)` of the `(blocks, rows, d)` buffer: block e is
    expert e (capacity), or each block gathers its expert's weights."""

    def per_block(weight):
        return weight if block_expert is None else ops.take(weight, block_expert, axis=0)

    def matmul(x, kernel):
        return ops.matmul(x, per_block(kernel))

    def add_bias(x, bias):
        return x + per_block(bias)[:, None, :]

    return matmul, add_bias


def _grouped_mm_ops(row_loads, rows):
    """`(matmul, add_bias)` of `(rows, d)` sorted by expert, `row_loads[e]`
    rows each: torch's grouped GEMM, one call over every expert, nothing
    padded (eager torch; `grouped_mm_fits` says when it applies)."""
    import torch

    offsets = torch.as_tensor(np.cumsum(row_loads), dtype=torch.int32, device=rows.device)
    loads = torch.as_tensor(row_loads, device=rows.device)

    def matmul(x, kernel):
        return torch.nn.functional.grouped_mm(x, ops.convert_to_tensor(kernel), offs=offsets)

    def add_bias(x, bias):
        return x + torch.repeat_interleave(ops.convert_to_tensor(bias), loads, dim=0)

    return matmul, add_bias


def grouped_mm_fits(tokens, compute_dtype, widths):
    """Whether `torch.nn.functional.grouped_mm` takes this call: a torch
    that has it (2.13 here), on CPU (where it is measured), a
    float16/bfloat16/float32 compute dtype, and every matrix width (`d`,
    hidden, output, LoRA rank) a multiple of 16 bytes, the stride its
    kernel requires."""
    import torch

    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}.get(compute_dtype)
    if not hasattr(torch.nn.functional, "grouped_mm") or tokens.device.type != "cpu":
        return False
    return itemsize is not None and all(width * itemsize % 16 == 0 for width in widths)


def combine_expert_outputs(expert_outputs, layout, gates):
    """Sums each token's gate-weighted expert outputs.

    A dropped assignment contributes zero (the residual around the block
    carries the token). The gate multiplies last, so a NaN gate (from NaN
    router logits) makes that token's output NaN even when it was dropped:
    NaN routing never passes silently.

    Args:
        expert_outputs: `(blocks, rows, o)`.
        layout: The `BufferLayout` the buffer was dispatched with.
        gates: `(tokens, top_k)`.

    Returns:
        `(tokens, o)`.
    """
    output_dim = ops.shape(expert_outputs)[-1]
    flat_outputs = ops.reshape(expert_outputs, (-1, output_dim))
    gathered = _gather_rows(
        flat_outputs,
        layout.assignment_row,
        layout.assignment_kept,
        layout.row_assignment,
        layout.row_valid,
        1,
    )
    # `gathered` is choice-major: row `choice * tokens + token`.
    return _sum_of_row_blocks(gathered, gates.shape[-1], ops.cast(gates, gathered.dtype))


def grouped_experts_eager(
    tokens, expert_index, gates, num_experts, run_experts, group_size=None, capacity=None
):
    """Steps 3-6 where shapes may be dynamic (eager torch): expert e's FFN
    runs on exactly the assignments it keeps, with nothing padded.

    The generic layouts (static shapes, for XLA and TFLite) pad every queue
    to its capacity, or every dropless expert to whole blocks with a
    gathered copy of its weights per block; on torch that costs 1.5-4x a
    dense FFN. Here only the tokens are gathered, sorted by expert, and
    `run_experts` runs them in one grouped GEMM. The result equals the
    generic path's (tests/layers/test_moe.py checks outputs and gradients).

    Args:
        tokens: `(tokens, d)`.
        expert_index, gates: `(tokens, top_k)` from `route_top_k`.
        num_experts: Number of experts.
        run_experts: `fn(rows, loads)`: every expert's FFN on `(n, d)` rows
            sorted by expert, `loads[e]` rows of expert e (NumPy ints);
            returns `(n, o)`.
        group_size, capacity: Capacity mode as in `capacity_layout`: an
            assignment at position >= `capacity` of its (expert, group)
            queue is dropped (contributes zero). `capacity=None`: dropless.

    Returns:
        `(outputs, assignment_kept)`: `(tokens, o)` and the `(A,)` bool of
        `BufferLayout`.
    """
    num_tokens = ops.shape(tokens)[0]
    _, position, queue_lengths, sorted_assignments = expert_positions(
        expert_index, num_experts, group_size
    )
    # Queues are numbered expert-major, so each expert's kept assignments
    # are contiguous in sorted order. (Index arithmetic in NumPy: eager only.)
    kept_order = ops.convert_to_numpy(sorted_assignments)
    queue_lengths = ops.convert_to_numpy(queue_lengths).reshape(num_experts, -1)
    if capacity is not None:
        kept_order = kept_order[ops.convert_to_numpy(position)[kept_order] < capacity]
        queue_lengths = np.minimum(queue_lengths, capacity)
    kept_tokens = ops.take(tokens, ops.convert_to_tensor(kept_order % num_tokens), axis=0)
    outputs = run_experts(kept_tokens, queue_lengths.sum(axis=1))
    # A dropped assignment reads the zero row appended last.
    outputs = ops.concatenate([outputs, ops.zeros((1, ops.shape(outputs)[-1]), outputs.dtype)])
    row_of_assignment = np.full(int(ops.size(sorted_assignments)), len(kept_order))
    row_of_assignment[kept_order] = np.arange(len(kept_order))
    assignment_outputs = ops.take(outputs, ops.convert_to_tensor(row_of_assignment), axis=0)
    outputs = _sum_of_row_blocks(
        assignment_outputs, gates.shape[-1], ops.cast(gates, assignment_outputs.dtype)
    )
    if capacity is None:
        return outputs, ops.ones_like(position, dtype="bool")
    return outputs, position < capacity


def expert_capacity_for(num_tokens, num_experts, top_k, capacity_factor):
    """`min(ceil(capacity_factor * tokens * top_k / E), tokens)`, at least 1.

    An expert never holds more than `tokens` assignments (a token picks
    distinct experts), so the cap costs nothing. `num_tokens` may be a tensor
    (a dynamic sequence length in an exported model); the result then is one
    too, computed in integers: a float capacity in a full-integer `.tflite`
    would be int8-quantized with the range calibration saw, and saturate
    for longer inputs (this is how whole-batch capacity once cost the int8
    export of the default model 29 points). `capacity_factor * top_k / E`
    is taken as a fraction with denominator <= 1000.
    """
    ratio = fractions.Fraction(capacity_factor * top_k / num_experts)
    ratio = ratio.limit_denominator(1000)
    if isinstance(num_tokens, int):
        capacity = -(-num_tokens * ratio.numerator // ratio.denominator)
        return max(1, min(capacity, num_tokens))
    capacity = (num_tokens * ratio.numerator + ratio.denominator - 1) // ratio.denominator
    return ops.maximum(1, ops.minimum(capacity, num_tokens))


# --- the layer ----------------------------------------------------------------


@keras.saving.register_keras_serializable(package="hlkeras")
class MixtureOfExperts(keras.layers.Layer):
    """Sparse Mixture-of-Experts FFN: each token runs only its `top_k` experts.

    Maps `(..., d)` to `(..., output_units or d)`. Every expert is an FFN
    `d -> hidden_units -> out`. A float32 linear router (float32 even under a
    mixed-precision policy) picks the `top_k` experts of each token; their
    gates are the softmax over the chosen logits.

    With `capacity_factor` set, capacity is per example (GShard-style
    groups: one group is the `T` tokens of one batch row, all positions of
    `inputs[i]`). In each example, each expert takes at most
    `C = min(ceil(capacity_factor * T * top_k / E), T)` of that example's
    assignments; later ones (the example's first choices are queued before
    its second choices, earlier positions first) are dropped and contribute
    zero, so the residual around the block carries the token. Which tokens
    are dropped therefore never depends on the other examples in the batch:
    with `training=False` a sample's output is the same at any batch size,
    in Keras and in the exported SavedModel and `.tflite`, and training
    drops exactly what inference drops. A `(batch, d)` input is a group of
    one token per row, whose capacity can drop nothing (a token picks
    distinct experts): the layer then runs the dropless layout below. Shapes
    are static: it jits and converts to TFLite with builtin ops only.

    With `capacity_factor=None` the layer is dropless: the assignments are
    grouped by expert into blocks, and a block-sparse grouped matmul computes
    every one of them. Its cost is at most 1.5x the routed FLOPs plus a gather
    of the expert weights per block. It also has static shapes, jits and
    converts to TFLite with builtin ops only.

    Two auxiliary losses are added with `add_loss` in every call:
    `load_balance_weight * E * sum_i f_i P_i` (Switch Transformer, `f_i` the
    fraction of assignments to expert i, `P_i` its mean router probability)
    and `router_z_weight * mean(logsumexp(logits)^2)` (ST-MoE).

    Routing statistics are layer state, summed over training calls (like
    BatchNormalization's moving statistics, so they work under every
    backend's `fit`, JAX's stateless one included):
    `routing_statistics()` returns the fraction of assignments dropped and
    each expert's share of the assignments. Add
    `hlkeras.training.RoutingStatistics()` to `fit`'s callbacks to log each
    epoch's `<name>_dropped_fraction` and `<name>_max_expert_load` (the
    largest expert share times E: 1.0 is balanced, E means one expert gets
    everything); `hlkeras train` adds it.

    NaN router logits (e.g. from NaN inputs) are not routed silently: the
    output of those tokens is NaN, and so are the auxiliary losses, so
    `keras.callbacks.TerminateOnNaN` stops training. (Which experts a NaN
    token occupies is backend-specific; it can take a slot another token
    would have had, but its NaN never reaches another token's output.)

    Args:
        num_experts: Positive int, the number of experts E.
        hidden_units: Positive int, the hidden width of every expert.
        top_k: Int in [1, num_experts], experts per token.
        capacity_factor: Float > 0 (capacity mode) or `None` (dropless).
        output_units: Positive int, output width. Defaults to the input width.
        activation: Name of a Keras activation for the expert hidden layer.
        load_balance_weight: Float >= 0, weight of the load-balance loss.
        router_z_weight: Float >= 0, weight of the router z-loss.
        router_jitter: Float in [0, 1). In training, the router input is
            multiplied by noise uniform in `[1 - jitter, 1 + jitter]`.
        dropout: Float in [0, 1), dropout on the expert hidden activations.
        lora_rank: Optional positive int. When set, every expert gets its own
            rank-`lora_rank` LoRA adapters on both kernels (`A`:
            `(E, d_in, r)`, Kaiming-uniform per expert; `B`: `(E, r, d_out)`,
            zeros, so a fresh adapter changes nothing), and only they train:
            the experts, their biases and the router are frozen, so routing
            stays what pretraining learned. One adapter per expert rather
            than one shared by all: experts specialize, and a shared update
            would move them all the same way. Usually set by
            `hlkeras.lora.apply_lora`; `merge_lora` folds them back in.
        lora_alpha: Optional number > 0, the adapters' strength
            (`scale = lora_alpha / lora_rank`). Defaults to `lora_rank`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`,
            and the Keras weight arguments: `kernel_initializer`,
            `kernel_regularizer`, `kernel_constraint` for the expert kernels
            `(E, d_in, d_out)` (an initializer left unset scales per expert,
            as if each were its own `Dense`; one given sees the whole
            stacked kernel), `bias_initializer`, `bias_regularizer`,
            `bias_constraint` for the expert biases, `router_initializer`,
            `router_regularizer`, `router_constraint` for the router kernel,
            and `activity_regularizer`.

    Call arguments:
        inputs: Tensor of shape `(batch, ..., d)`; every position is a token.
        training: Python boolean: enables jitter, dropout and the routing
            statistics.

    Example:

    >>> inputs = keras.Input(shape=(None, 16))
    >>> moe = MixtureOfExperts(4, 32, top_k=2)
    >>> outputs = moe(inputs)
    >>> keras.Model(inputs, outputs).output_shape
    (None, None, 16)
    """

    def __init__(
        self,
        num_experts,
        hidden_units,
        *,
        top_k=2,
        capacity_factor=1.25,
        output_units=None,
        activation="gelu",
        load_balance_weight=1e-2,
        router_z_weight=1e-3,
        router_jitter=0.0,
        dropout=0.0,
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        weight_options = WeightOptions.pop(kwargs, kinds=("kernel", "bias", "router"))
        super().__init__(**kwargs)
        self.weight_options = weight_options
        self.num_experts = _validation.check_positive_int("num_experts", num_experts)
        self.hidden_units = _validation.check_positive_int("hidden_units", hidden_units)
        self.top_k = _validation.check_positive_int("top_k", top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                "Argument `top_k` must be in [1, num_experts]. "
                f"Received: top_k={top_k!r} with num_experts={num_experts}"
            )
        if capacity_factor is not None:
            if not _validation.is_number(capacity_factor) or not capacity_factor > 0:
                raise ValueError(
                    "Argument `capacity_factor` must be a number > 0, or None "
                    f"for dropless routing. Received: capacity_factor={capacity_factor!r}"
                )
            capacity_factor = float(capacity_factor)
        self.capacity_factor = capacity_factor
        self.output_units = (
            None
            if output_units is None
            else _validation.check_positive_int("output_units", output_units)
        )
        self.activation = _validation.check_activation("activation", activation)
        self.load_balance_weight = _validation.check_non_negative(
            "load_balance_weight", load_balance_weight
        )
        self.router_z_weight = _validation.check_non_negative("router_z_weight", router_z_weight)
        self.router_jitter = _validation.check_rate("router_jitter", router_jitter)
        self.dropout = _validation.check_rate("dropout", dropout)
        check_lora_arguments(lora_rank, lora_alpha, 0.0)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.activation_fn = keras.activations.get(self.activation)
        self.jitter_seed = keras.random.SeedGenerator() if self.router_jitter > 0 else None

    @property
    def is_dropless(self):
        """True when `capacity_factor=None`: no token is ever dropped."""
        return self.capacity_factor is None

    def build(self, input_shape):
        _validation.check_min_rank("MixtureOfExperts", input_shape, 2)
        input_dim = _validation.check_feature_dim("MixtureOfExperts", input_shape)
        output_dim = self.output_units or input_dim
        experts, hidden = self.num_experts, self.hidden_units
        # Router logits in float32 even under mixed precision: the top-k
        # choice and the z-loss are sensitive to rounding.
        router = self.weight_options.weight("router", "glorot_uniform")
        # With adapters only they train (the LoRA protocol): the expert
        # weights are created frozen (`layer.trainable = True` flips only
        # variables created trainable), the router is a frozen sublayer.
        base_trains = self.lora_rank is None
        self.router = FloatRouter(
            experts,
            use_bias=False,
            dtype="float32",
            trainable=base_trains,
            name="router",
            kernel_initializer=router["initializer"],
            kernel_regularizer=router["regularizer"],
            kernel_constraint=router["constraint"],
        )
        self.router.build(tuple(input_shape[:-1]) + (input_dim,))
        self.expert_hidden_kernel = self.add_weight(
            name="expert_hidden_kernel",
            trainable=base_trains,
            shape=(experts, input_dim, hidden),
            **self.weight_options.weight(
                "kernel", _per_expert_initializer(self.activation, experts)
            ),
        )
        self.expert_hidden_bias = self.add_weight(
            name="expert_hidden_bias",
            trainable=base_trains,
            shape=(experts, hidden),
            **self.weight_options.weight("bias", "zeros"),
        )
        self.expert_output_kernel = self.add_weight(
            name="expert_output_kernel",
            trainable=base_trains,
            shape=(experts, hidden, output_dim),
            **self.weight_options.weight("kernel", _per_expert_initializer(None, experts)),
        )
        self.expert_output_bias = self.add_weight(
            name="expert_output_bias",
            trainable=base_trains,
            shape=(experts, output_dim),
            **self.weight_options.weight("bias", "zeros"),
        )
        self.hidden_dropout = (
            keras.layers.Dropout(self.dropout, dtype=self.dtype_policy) if self.dropout else None
        )
        self.hidden_adapter = self.output_adapter = None
        if self.lora_rank is not None:
            self.hidden_adapter = self._expert_adapter("expert_hidden", input_dim, hidden)
            self.output_adapter = self._expert_adapter("expert_output", hidden, output_dim)
        # Routing statistics are layer state that training calls update, as
        # BatchNormalization's moving statistics are: unlike a metric inside
        # a layer, state updates survive JAX's stateless `fit` too.
        self.routing_calls = self._routing_state("routing_calls", ())
        self.routing_dropped_total = self._routing_state("routing_dropped_total", ())
        self.routing_load_total = self._routing_state("routing_load_total", (experts,))

    def _expert_adapter(self, prefix, input_dim, output_dim):
        """`(A, B)`: `(E, input_dim, r)` and `(E, r, output_dim)` adapters."""
        if self.lora_rank > min(input_dim, output_dim):
            raise ValueError(
                f"MixtureOfExperts '{self.name}': argument `lora_rank` must be "
                f"<= min(d_in, d_out) = min({input_dim}, {output_dim}) of the "
                f"'{prefix}_kernel' experts. Received: lora_rank={self.lora_rank}"
            )
        regularizer = self.weight_options.weight("kernel", None)["regularizer"]
        # Kaiming-uniform with each expert's own fan-in, as `LoRADense`'s A
        # (Keras would count the `(E, d, r)` fan-in as E * d).
        limit = math.sqrt(6.0 / input_dim)
        a = self.add_weight(
            name=f"{prefix}_lora_a",
            shape=(self.num_experts, input_dim, self.lora_rank),
            initializer=keras.initializers.RandomUniform(-limit, limit),
            regularizer=regularizer,
        )
        b = self.add_weight(
            name=f"{prefix}_lora_b",
            shape=(self.num_experts, self.lora_rank, output_dim),
            initializer="zeros",
            regularizer=regularizer,
        )
        return a, b

    @property
    def adapter_weights(self):
        """The expert adapters `[A_hidden, B_hidden, A_output, B_output]`
        (empty without `lora_rank`)."""
        adapters = (self.hidden_adapter, self.output_adapter)
        return [w for adapter in adapters if adapter is not None for w in adapter]

    @property
    def adapter_scale(self):
        """`lora_alpha / lora_rank`, the adapters' output scale."""
        return lora_scale(self.lora_rank, self.lora_alpha)

    def merged_kernels(self):
        """NumPy `(hidden, output)` expert kernels with the adapters folded
        in, `W_e + scale * A_e @ B_e` per expert (summed in float64)."""
        merged = []
        for kernel, (a, b) in (
            (self.expert_hidden_kernel, self.hidden_adapter),
            (self.expert_output_kernel, self.output_adapter),
        ):
            kernel_value, a, b = (
                np.asarray(ops.convert_to_numpy(w), "float64") for w in (kernel, a, b)
            )
            merged.append((kernel_value + self.adapter_scale * (a @ b)).astype(kernel.dtype))
        return merged

    def _routing_state(self, name, shape):
        return self.add_weight(
            name=name,
            shape=shape,
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
        )

    def call(self, inputs, training=None):
        input_shape = ops.shape(inputs)
        tokens = ops.reshape(inputs, (-1, input_shape[-1]))
        num_tokens = _num_tokens(inputs)
        if isinstance(num_tokens, int) and num_tokens == 0:
            # An empty batch (a known size of 0: eager, or traced with a
            # static batch) routes nothing; the routing below would divide by
            # its size and reduce over empty axes.
            return ops.zeros(self.compute_output_shape(inputs.shape), self.compute_dtype)

        router_logits = self._router_logits(tokens, training)
        expert_index, gates, router_probs = route_top_k(router_logits, self.top_k)
        self._add_aux_losses(router_logits, router_probs, expert_index)

        group_size = _tokens_per_example(inputs)
        if self._runs_grouped_eager(tokens):
            return self._call_grouped_eager(
                inputs, tokens, expert_index, gates, group_size, training
            )
        layout = self._layout(expert_index, num_tokens, group_size)
        expert_inputs = dispatch_tokens(tokens, layout, self.top_k)
        if layout.block_expert is None:
            # Capacity mode: each expert's queues are contiguous blocks.
            expert_inputs = ops.reshape(expert_inputs, (self.num_experts, -1, input_shape[-1]))
        expert_outputs = self._expert_ffn(expert_inputs, training, block_expert=layout.block_expert)
        outputs = combine_expert_outputs(expert_outputs, layout, gates)
        if training:
            self._record_routing(expert_index, layout.assignment_kept)
        output_dim = ops.shape(outputs)[-1]
        return ops.reshape(outputs, tuple(input_shape[:-1]) + (output_dim,))

    def _expert_weights(self):
        """`(hidden_kernel, hidden_bias, output_kernel, output_bias,
        hidden_adapter, output_adapter)` of every expert (adapters may be None)."""
        return (
            self.expert_hidden_kernel,
            self.expert_hidden_bias,
            self.expert_output_kernel,
            self.expert_output_bias,
            self.hidden_adapter,
            self.output_adapter,
        )

    def _expert_ffn(self, expert_inputs, training, block_expert=None, row_loads=None):
        """`expert_ffn` with this layer's weights and settings."""
        hidden_kernel, hidden_bias, output_kernel, output_bias, hidden_adapter, output_adapter = (
            self._expert_weights()
        )
        return expert_ffn(
            expert_inputs,
            hidden_kernel,
            hidden_bias,
            output_kernel,
            output_bias,
            self.activation_fn,
            block_expert=block_expert,
            hidden_dropout=self.hidden_dropout,
            training=training,
            hidden_adapter=hidden_adapter,
            output_adapter=output_adapter,
            adapter_scale=self.adapter_scale if self.lora_rank else 1.0,
            row_loads=row_loads,
        )

    def _runs_grouped_eager(self, tokens):
        """Whether this call takes `grouped_experts_eager`: eager torch with
        concrete tensors (not torch.compile, not Keras' symbolic build on
        the meta device) whose shapes torch's grouped GEMM takes
        (`grouped_mm_fits`).

        It then beats the generic layouts in both modes. Measured, tokens
        4096 (16 sequences), d 256, hidden 512, top_k 2, time / FLOP-matched
        dense FFN, grouped vs padded capacity buffer: float32 E=8 1.18 vs
        1.54, E=32 1.29 vs 1.66, E=64 1.74 vs 1.77; mixed_bfloat16 E=8 1.44
        vs 1.63, E=32 1.76 vs 1.85, E=64 2.56 vs 2.53 (the dropless blocks
        are slower still)."""
        if keras.backend.backend() != "torch":
            return False
        import torch

        if tokens.device.type == "meta" or torch.compiler.is_compiling():
            return False
        input_dim = ops.shape(tokens)[-1]
        widths = [input_dim, self.hidden_units, self.output_units or input_dim]
        if self.lora_rank:
            widths.append(self.lora_rank)
        return grouped_mm_fits(tokens, self.compute_dtype, widths)

    def _call_grouped_eager(self, inputs, tokens, expert_index, gates, group_size, training):
        """`call`'s steps 2-6 through `grouped_experts_eager`."""
        capacity = None
        if not _is_dropless_call(self, group_size):
            capacity = expert_capacity_for(
                group_size, self.num_experts, self.top_k, self.capacity_factor
            )
        outputs, assignment_kept = grouped_experts_eager(
            tokens,
            expert_index,
            gates,
            self.num_experts,
            lambda rows, loads: self._expert_ffn(rows, training, row_loads=loads),
            group_size=None if capacity is None else group_size,
            capacity=capacity,
        )
        if training:
            self._record_routing(expert_index, assignment_kept)
        return ops.reshape(outputs, tuple(ops.shape(inputs)[:-1]) + (ops.shape(outputs)[-1],))

    def _router_logits(self, tokens, training):
        router_inputs = ops.cast(tokens, "float32")
        if training and self.router_jitter > 0:
            router_inputs = router_inputs * keras.random.uniform(
                ops.shape(router_inputs),
                minval=1.0 - self.router_jitter,
                maxval=1.0 + self.router_jitter,
                seed=self.jitter_seed,
            )
        return self.router(router_inputs)

    def _add_aux_losses(self, router_logits, router_probs, expert_index):
        if self.load_balance_weight:
            self.add_loss(
                self.load_balance_weight
                * load_balance_loss(router_probs, expert_index, self.num_experts)
            )
        if self.router_z_weight:
            self.add_loss(self.router_z_weight * router_z_loss(router_logits))

    def _layout(self, expert_index, num_tokens, group_size):
        """Capacity queues per (expert, example), or dropless blocks when
        `capacity_factor=None` or when the capacity cannot drop anything."""
        if not _is_dropless_call(self, group_size):
            capacity = expert_capacity_for(
                group_size, self.num_experts, self.top_k, self.capacity_factor
            )
            positions = expert_positions(expert_index, self.num_experts, group_size)
            return capacity_layout(*positions, num_tokens, capacity)
        positions = expert_positions(expert_index, self.num_experts)
        num_assignments = num_tokens * self.top_k
        block_size = dropless_block_size(num_assignments, self.num_experts)
        num_blocks = dropless_num_blocks(num_assignments, self.num_experts, block_size)
        return dropless_layout(*positions, num_tokens, block_size, num_blocks)

    def _record_routing(self, expert_index, assignment_kept):
        chosen = ops.one_hot(ops.reshape(expert_index, (-1,)), self.num_experts)
        self.routing_load_total.assign_add(ops.mean(chosen, axis=0))
        kept = ops.mean(ops.cast(assignment_kept, "float32"))
        self.routing_dropped_total.assign_add(1.0 - kept)
        self.routing_calls.assign_add(1.0)

    def routing_statistics(self):
        """Routing statistics summed over every training call so far.

        Returns:
            A dict of NumPy values: `calls` (training calls measured),
            `dropped_fraction` (mean fraction of assignments dropped),
            `expert_load` (`(E,)` mean share of the assignments per expert)
            and `max_expert_load` (the largest share times E: 1.0 is
            balanced, E means one expert gets everything). The means are
            NaN before the first training call.
        """
        return routing_summary(
            ops.convert_to_numpy(self.routing_calls),
            ops.convert_to_numpy(self.routing_dropped_total),
            ops.convert_to_numpy(self.routing_load_total),
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_units or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_units": self.hidden_units,
                "top_k": self.top_k,
                "capacity_factor": self.capacity_factor,
                "output_units": self.output_units,
                "activation": self.activation,
                "load_balance_weight": self.load_balance_weight,
                "router_z_weight": self.router_z_weight,
                "router_jitter": self.router_jitter,
                "dropout": self.dropout,
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                **self.weight_options.get_config(),
            }
        )
        return config


def routing_summary(calls, dropped_total, load_total):
    """Mean routing statistics from the totals a layer keeps (see
    `MixtureOfExperts.routing_statistics`); NaN means for zero calls."""
    calls = float(calls)
    if calls <= 0:
        nan = float("nan")
        expert_load = np.full(np.shape(load_total), nan)
        return {
            "calls": 0.0,
            "dropped_fraction": nan,
            "expert_load": expert_load,
            "max_expert_load": nan,
        }
    expert_load = np.asarray(load_total, "float64") / calls
    return {
        "calls": calls,
        "dropped_fraction": float(dropped_total) / calls,
        "expert_load": expert_load,
        "max_expert_load": float(expert_load.max() * len(expert_load)),
    }


def _is_dropless_call(layer, group_size):
    """`capacity_factor=None`, or a capacity that cannot drop anything: a
    token picks distinct experts, so a queue never holds more than
    `group_size` assignments, and the dropless layout computes the same for
    less."""
    if layer.capacity_factor is None:
        return True
    capacity = expert_capacity_for(
        group_size, layer.num_experts, layer.top_k, layer.capacity_factor
    )
    return isinstance(capacity, int) and capacity >= group_size


def _tokens_per_example(inputs):
    """Tokens in one example (the capacity group): 1 for `(batch, d)`."""
    static = inputs.shape[1:-1]
    if all(isinstance(dim, int) for dim in static):
        return math.prod(static)
    tokens = 1
    for dim in ops.shape(inputs)[1:-1]:
        tokens = tokens * dim
    return tokens


def _num_tokens(inputs):
    """Product of all but the last dimension: a Python int when static."""
    static = inputs.shape[:-1]
    if all(isinstance(dim, int) for dim in static):
        return math.prod(static)
    dynamic = ops.shape(inputs)[:-1]
    num_tokens = 1
    for dim in dynamic:
        num_tokens = num_tokens * dim
    return num_tokens


class FloatRouter(keras.layers.Dense):
    """The router of `MixtureOfExperts`: a `Dense` that `model.quantize`
    leaves in float32 (Keras warns and skips a layer whose `quantize` raises
    `NotImplementedError`). Rounding the router flips top-k choices: in
    `tests/layers/test_weight_options.py`'s int8 model it made the largest
    output error about 1.5x larger."""

    def quantize(self, mode=None, type_check=True, config=None):
        raise NotImplementedError(
            f"Layer '{self.name}' (a MixtureOfExperts router) stays float32: "
            "rounding its logits would change which experts a token goes to."
        )


def _per_expert_initializer(activation, num_experts):
    """He-normal or Glorot-uniform as if each expert were its own Dense.

    Keras computes the fans of an `(E, d, h)` kernel as `(E*d, E*h)`;
    scaling by E restores the per-expert `(d, h)` fans.
    """
    if _validation.kernel_initializer_for(activation) == "he_normal":
        return keras.initializers.VarianceScaling(
            scale=2.0 * num_experts, mode="fan_in", distribution="untruncated_normal"
        )
    return keras.initializers.VarianceScaling(
        scale=1.0 * num_experts, mode="fan_avg", distribution="uniform"
    )


# --- expert parallelism ----------------------------------------------------------


def expert_parallel_layout(device_mesh, expert_axis="model"):
    """A `LayoutMap` that shards every MoE expert weight over `expert_axis`.

    The stacked expert weights have the experts first (`(E, d, h)`,
    `(E, h)`, ...); this map splits that axis over the mesh axis, so each
    device holds `E / devices` experts, and replicates the router. Add your
    own entries for other layers, then pass it to
    `keras.distribution.ModelParallel` (functional on the JAX backend).

    Args:
        device_mesh: A `keras.distribution.DeviceMesh`.
        expert_axis: Name of the mesh axis to shard the experts over. E must
            be divisible by its size.

    Returns:
        A `keras.distribution.LayoutMap`.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ["data", "model"])
    layout_map = expert_parallel_layout(mesh, expert_axis="model")
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="data"))
    ```
    """
    if expert_axis not in device_mesh.axis_names:
        raise ValueError(
            f"Argument `expert_axis` must be one of the mesh axes "
            f"{list(device_mesh.axis_names)}. Received: expert_axis={expert_axis!r}"
        )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[r".*expert_(hidden|output)_kernel"] = (expert_axis, None, None)
    layout_map[r".*expert_(hidden|output)_bias"] = (expert_axis, None)
    layout_map[r".*expert_(hidden|output)_lora_[ab]"] = (expert_axis, None, None)
    return layout_map
