"""Where a MixtureOfExperts training step spends its time, stage by stage.

Times forward + backward (as `benchmarks/moe.py` does, same shapes) of the
layer cut after each stage of its pipeline, each cut a prefix of the next:

1. router: router logits, top-k, gates, auxiliary losses
2. positions: + `expert_positions` (queue positions, the sort)
3. layout: + `capacity_layout` / `dropless_layout`
4. dispatch: + `dispatch_tokens` (the gather into the expert buffer)
5. experts: + `expert_ffn` (the expert matmuls)
6. combine: + `combine_expert_outputs` (the whole layer)

The prefixes and the FLOP-matched dense FFN of `benchmarks/moe.py` (the
anchor) run interleaved; a stage's cost is the median over rounds of its
prefix's time minus the previous prefix's, also printed as a share of the
anchor. Last, the experts' batched matmuls alone are timed against one
dense FFN of the same FLOPs: the floor of the experts stage on that
backend. Integer results feed the output through a zero-weight float sum
so the compiler cannot drop them. (A prefix's step still returns a gradient
for every weight: the early prefixes also write zeros for the expert
weights they do not use, which inflates the router stage, 34 ms against
4-5 ms for the router alone at E=64 on JAX.)

Usage:
    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/moe_profile.py --experts 8,64
"""

import argparse
import os
import sys

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe import BACKEND  # noqa: E402
from moe import DenseFFN  # noqa: E402
from moe import ExpertMatmuls  # noqa: E402
from moe import make_step  # noqa: E402

from hlkeras import _timing  # noqa: E402
from hlkeras.layers import MixtureOfExperts  # noqa: E402
from hlkeras.layers import moe_ops  # noqa: E402

STAGES = ("router", "positions", "layout", "dispatch", "experts", "combine")


def _keep(total, value):
    """`total` plus a zero-weight sum of `value`: it must be computed."""
    return total + 0.0 * ops.sum(ops.cast(value, "float32"))


class MixtureOfExpertsUpTo(MixtureOfExperts):
    """`MixtureOfExperts.call` cut after `stage` (see the module docstring)."""

    def __init__(self, *args, stage="combine", **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage

    def call(self, inputs, training=None):
        last = STAGES.index(self.stage)
        input_shape = ops.shape(inputs)
        tokens = ops.reshape(inputs, (-1, input_shape[-1]))
        num_tokens = moe_ops.count_tokens(inputs)
        router_logits = self._router_logits(tokens, training)
        expert_index, gates, router_probs = moe_ops.route_top_k(router_logits, self.top_k)
        self._add_aux_losses(router_logits, router_probs, expert_index)
        total = ops.mean(gates) + ops.mean(router_probs)
        if last == 0:
            return total
        group_size = moe_ops.tokens_per_example(inputs)
        positions = moe_ops.expert_positions(expert_index, self.num_experts, group_size)
        for value in positions:
            total = _keep(total, value)
        if last == 1:
            return total
        layout = self._layout(expert_index, num_tokens, group_size)
        total = _keep(_keep(total, layout.assignment_row), layout.row_assignment)
        if last == 2:
            return total
        expert_inputs = moe_ops.dispatch_tokens(tokens, layout, self.top_k)
        total = total + ops.mean(expert_inputs)
        if last == 3:
            return total
        if layout.block_expert is None:
            expert_inputs = ops.reshape(expert_inputs, (self.num_experts, -1, input_shape[-1]))
        expert_outputs = moe_ops.expert_ffn(
            expert_inputs,
            self.expert_hidden_kernel,
            self.expert_hidden_bias,
            self.expert_output_kernel,
            self.expert_output_bias,
            self.activation_fn,
            block_expert=layout.block_expert,
        )
        total = total + ops.mean(expert_outputs)
        if last == 4:
            return total
        outputs = moe_ops.combine_expert_outputs(expert_outputs, layout, gates)
        return total + ops.mean(outputs)


def batched_matmul_efficiency(num_experts, rows, dim, hidden, repeats, warmup, jit_compile):
    """Seconds of the experts' batched matmuls on `(E, rows, d)` and of one
    dense FFN over the same `E * rows` tokens (the same FLOPs)."""
    rng = np.random.default_rng(0)
    buffer = ops.convert_to_tensor(rng.normal(size=(num_experts, rows, dim)).astype("float32"))
    flat = ops.reshape(buffer, (num_experts * rows, dim))
    batched = make_step(ExpertMatmuls(num_experts, hidden), buffer, jit_compile)
    dense = make_step(DenseFFN(hidden), flat, jit_compile)
    return (
        _timing.median_seconds(batched, repeats, warmup),
        _timing.median_seconds(dense, repeats, warmup),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--experts", default="8,64")
    parser.add_argument("--dropless", action="store_true", help="capacity_factor=None")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    jit_compile = BACKEND in ("tensorflow", "jax")
    inputs = ops.convert_to_tensor(
        np.random.default_rng(0)
        .normal(size=(args.tokens // args.sequence_length, args.sequence_length, args.dim))
        .astype("float32")
    )

    def step(layer):
        return make_step(layer, inputs, jit_compile)

    capacity_factor = None if args.dropless else 1.25
    mode = "dropless" if args.dropless else "capacity 1.25"
    for num_experts in [int(e) for e in args.experts.split(",")]:
        keras.utils.set_random_seed(0)
        prefixes = [
            MixtureOfExpertsUpTo(
                num_experts,
                args.hidden,
                top_k=args.top_k,
                capacity_factor=capacity_factor,
                stage=stage,
            )
            for stage in STAGES
        ]
        # Interleaved: a stage's cost is the median over rounds of the
        # difference of two prefixes timed next to each other.
        dense, *prefix_times = _timing.time_interleaved(
            [step(DenseFFN(args.top_k * args.hidden))] + [step(layer) for layer in prefixes],
            args.repeats,
            args.warmup,
        )
        dense = np.median(dense)
        rounds = np.array(prefix_times)
        stage_times = np.median(np.diff(rounds, axis=0, prepend=0.0), axis=1)
        whole_layer = np.median(rounds[-1])
        print(
            f"backend={BACKEND} E={num_experts} {mode} tokens={args.tokens} d={args.dim} "
            f"hidden={args.hidden} k={args.top_k}: whole layer "
            f"{whole_layer * 1e3:.1f} ms = {whole_layer / dense:.2f}x dense FFN "
            f"({dense * 1e3:.1f} ms); forward+backward per stage, ms (x dense):"
        )
        print(
            "  "
            + "  ".join(
                f"{stage} {t * 1e3:.1f} ({t / dense:.2f})" for stage, t in zip(STAGES, stage_times)
            ),
            flush=True,
        )
        # The floor of the experts stage: the same FLOPs as one dense FFN.
        rows = int(1.25 * args.tokens * args.top_k / num_experts)
        batched, flat = batched_matmul_efficiency(
            num_experts, rows, args.dim, args.hidden, args.repeats, args.warmup, jit_compile
        )
        print(
            f"  expert matmuls alone on ({num_experts}, {rows}, {args.dim}): "
            f"{batched * 1e3:.1f} ms = {batched / flat:.2f}x one dense FFN "
            f"(hidden {args.hidden}) over the same {num_experts * rows} tokens",
            flush=True,
        )


if __name__ == "__main__":
    main()
