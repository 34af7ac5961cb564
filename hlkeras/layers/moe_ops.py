"""The pure functions of the sparse Mixture-of-Experts (keras.ops only), in
the order the data moves; `hlkeras.layers.moe.MixtureOfExperts` is built
from them:

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
import contextlib
import contextvars
import fractions
import math

import keras
import numpy as np
from keras import ops

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


# Set while a graph is traced for export (`per_expert_matmuls`).
_PER_EXPERT_MATMULS = contextvars.ContextVar("per_expert_matmuls", default=False)


@contextlib.contextmanager
def per_expert_matmuls():
    """While active, capacity-mode expert FFNs are traced as one 2-D matmul
    per expert instead of one batched matmul over every expert: the same
    products, which the TFLite converter turns into FULLY_CONNECTED ops with
    constant weights. LiteRT's int8 BATCH_MATMUL is 5-7x slower than float,
    its int8 FULLY_CONNECTED 3-4x faster (ARCHITECTURE.md, export)."""
    token = _PER_EXPERT_MATMULS.set(True)
    try:
        yield
    finally:
        _PER_EXPERT_MATMULS.reset(token)


def _batched_ops(block_expert):
    """`(matmul, add_bias)` of the `(blocks, rows, d)` buffer: block e is
    expert e (capacity), or each block gathers its expert's weights."""

    def per_block(weight):
        return weight if block_expert is None else ops.take(weight, block_expert, axis=0)

    def matmul(x, kernel):
        if block_expert is None and _PER_EXPERT_MATMULS.get():
            return _per_expert_matmul(x, kernel)
        return ops.matmul(x, per_block(kernel))

    def add_bias(x, bias):
        return x + per_block(bias)[:, None, :]

    return matmul, add_bias


def _per_expert_matmul(x, kernel):
    """`ops.matmul(x, kernel)` of `(E, rows, d)` by `(E, d, o)`, as E 2-D
    matmuls."""
    kernels = ops.unstack(ops.convert_to_tensor(kernel), axis=0)
    per_expert = zip(ops.unstack(x, axis=0), kernels)
    return ops.stack([ops.matmul(rows, weight) for rows, weight in per_expert])


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


def tokens_per_example(inputs):
    """Tokens in one example (the capacity group): 1 for `(batch, d)`."""
    static = inputs.shape[1:-1]
    if all(isinstance(dim, int) for dim in static):
        return math.prod(static)
    tokens = 1
    for dim in ops.shape(inputs)[1:-1]:
        tokens = tokens * dim
    return tokens


def count_tokens(inputs):
    """Product of all but the last dimension: a Python int when static."""
    static = inputs.shape[:-1]
    if all(isinstance(dim, int) for dim in static):
        return math.prod(static)
    dynamic = ops.shape(inputs)[:-1]
    num_tokens = 1
    for dim in dynamic:
        num_tokens = num_tokens * dim
    return num_tokens


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
