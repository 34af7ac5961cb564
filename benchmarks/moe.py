"""Benchmark: sparse MixtureOfExperts against its anchors, on the active backend.

Forward + backward (gradients of a mean-square loss plus the aux losses with
respect to every trainable weight) at tokens 4096 (16 sequences of 256: the
layer's capacity is per sequence), d 256, hidden 512, top_k 2, for E in
{8, 32, 64}; after warm-up, the dense anchor, both MoE modes and the
capacity mode's floor run interleaved, and every ratio is the median of the
per-round ratios. Every number is a ratio to an anchor measured in the same
process:

- ratio_vs_active_dense: MoE time / a dense FFN with hidden top_k*hidden
  (the same active FLOPs per token). Target <= 1.35 at every E (capacity
  factor 1.25 computes 1.25x the dense FLOPs: that is the floor), and
  dropless <= 1.5 at E=32 (issue 20).
- speedup_vs_all_experts: a KerasHub-style MoE that runs every expert on
  every token (einsum) and weights by the gates / MoE time. Target >= 6 at
  E=32.
- floor_ratio_vs_active_dense: the capacity mode's expert FFNs alone (one
  batched matmul pair on an `(E, groups * capacity, d)` buffer, no routing)
  / the dense FFN: 1.25 in FLOPs, more where the backend's batched matmul
  of E small matrices runs slower than one large one. ratio_vs_floor =
  MoE time / that floor: the routing and data movement on top of the
  experts (target <= 1.08, the issue's title). On eager torch the layer
  pads nothing (one grouped GEMM over exactly the kept rows), so it can
  run below this floor.
- scaling_64_vs_8: MoE time at E=64 / at E=8. Target <= 1.15. Each time is
  first divided by the dense anchor measured next to it, so load drift of a
  shared machine between the two cancels; the raw ratio is printed too.

Every measurement runs under each Keras dtype policy of --policies (default
float32, then mixed_bfloat16: bf16 compute, float32 weights), the anchors
under the same policy. Dropless mode (capacity_factor=None, block-sparse
grouped matmul) is measured too, and, with --dropless-methods, the padded
alternative (capacity = all tokens: every expert's buffer holds every token).

Usage:
    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/moe.py --json out.json
"""

import argparse
import json
import statistics

import keras
import numpy as np
from keras import ops

from hlkeras import _timing
from hlkeras.layers import MixtureOfExperts
from hlkeras.layers import moe_ops

BACKEND = keras.backend.backend()


class DenseFFN(keras.layers.Layer):
    """The FLOP-matched anchor: d -> hidden -> d."""

    def __init__(self, hidden_units, activation="gelu", **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(hidden_units, activation=activation)
        self.out = None

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.out = keras.layers.Dense(input_shape[-1])
        self.out.build(tuple(input_shape[:-1]) + (self.hidden.units,))

    def call(self, inputs, training=None):
        return self.out(self.hidden(inputs))


class ExpertMatmuls(keras.layers.Layer):
    """Only the expert FFNs on an `(E, rows, d)` buffer (`expert_ffn`): the
    floor of capacity mode, whose experts compute exactly this."""

    def __init__(self, num_experts, hidden_units, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_units = hidden_units

    def build(self, input_shape):
        e, d, h = self.num_experts, input_shape[-1], self.hidden_units
        self.w1 = self.add_weight(shape=(e, d, h), name="w1")
        self.b1 = self.add_weight(shape=(e, h), initializer="zeros", name="b1")
        self.w2 = self.add_weight(shape=(e, h, d), name="w2")
        self.b2 = self.add_weight(shape=(e, d), initializer="zeros", name="b2")

    def call(self, inputs, training=None):
        return moe_ops.expert_ffn(inputs, self.w1, self.b1, self.w2, self.b2, ops.gelu)


class AllExpertsMoE(ExpertMatmuls):
    """KerasHub-style (Mixtral / Qwen-MoE) MoE: every expert computes every
    token with one einsum; the top-k gates weight the results. The expert
    weights are `ExpertMatmuls`'."""

    def __init__(self, num_experts, hidden_units, top_k=2, **kwargs):
        super().__init__(num_experts, hidden_units, **kwargs)
        self.top_k = top_k

    def build(self, input_shape):
        super().build(input_shape)
        self.router = self.add_weight(shape=(input_shape[-1], self.num_experts), name="router")

    def call(self, inputs, training=None):
        inputs = ops.reshape(inputs, (-1, ops.shape(inputs)[-1]))
        logits = ops.matmul(inputs, self.router)
        top_logits, top_index = ops.top_k(logits, k=self.top_k)
        gates = ops.softmax(top_logits, axis=-1)
        dense_gates = ops.sum(
            ops.one_hot(top_index, self.num_experts, dtype=gates.dtype) * gates[..., None], axis=1
        )
        hidden = ops.gelu(ops.einsum("td,edh->teh", inputs, self.w1) + self.b1)
        outputs = ops.einsum("teh,ehd->ted", hidden, self.w2) + self.b2
        return ops.einsum("ted,te->td", outputs, dense_gates)


def make_step(layer, inputs, jit_compile):
    """A zero-argument function running one forward + backward, synchronised."""
    layer(inputs)  # build
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable, x):
            y, _, losses = layer.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            return jnp.mean(jnp.square(y.astype("float32"))) + sum(losses)

        grad_fn = jax.grad(loss_fn)
        if jit_compile:
            grad_fn = jax.jit(grad_fn)
        return lambda: jax.block_until_ready(grad_fn(trainable, inputs))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=jit_compile)
        def grad_fn(x):
            with tf.GradientTape() as tape:
                y = layer(x, training=True)
                loss = tf.reduce_mean(tf.square(tf.cast(y, "float32"))) + tf.add_n(
                    [tf.constant(0.0)] + list(layer.losses)
                )
            grads = tape.gradient(loss, layer.trainable_variables)
            # One scalar that depends on every gradient: fetching it waits
            # for the whole backward pass without copying the gradients out.
            # (Dropless mode gathers expert weights: some are IndexedSlices;
            # `benchmarks/moe_profile.py`'s cut layers leave some unused: None.)
            return tf.add_n(
                [tf.constant(0.0)]
                + [tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads if g is not None]
            )

        return lambda: grad_fn(inputs).numpy()

    def torch_step():
        for variable in layer.trainable_variables:
            variable.value.grad = None
        y = layer(inputs, training=True)
        loss = ops.mean(ops.square(ops.cast(y, "float32"))) + sum(layer.losses)
        loss.backward()

    return torch_step


def capacity_buffer(args, num_experts):
    """A random `(E, groups * capacity, d)` buffer: the shape of the capacity
    layout's expert buffer (capacity factor 1.25, one group per sequence)."""
    capacity = moe_ops.expert_capacity_for(args.sequence_length, num_experts, args.top_k, 1.25)
    rows = args.tokens // args.sequence_length * capacity
    buffer = np.random.default_rng(1).normal(size=(num_experts, rows, args.dim))
    return ops.convert_to_tensor(buffer.astype("float32"))


def run_policy(args, make, experts, all_experts_at):
    """Times every configuration under the current dtype policy; prints and
    returns the rows. `make(layer, inputs=None)` gives a layer's step
    function.

    At each E the dense anchor, the capacity-mode and the dropless layer,
    and the capacity mode's floor (its expert FFNs alone, on a buffer of its
    shape) run interleaved (`_timing.time_interleaved`): every ratio is the
    median of per-round ratios, whose calls saw the same load of the shared
    machine."""
    keras.utils.set_random_seed(0)
    results = {"experts": {}}
    for num_experts in experts:
        steps = [
            make(DenseFFN(args.top_k * args.hidden)),
            make(MixtureOfExperts(num_experts, args.hidden, top_k=args.top_k)),
            make(
                MixtureOfExperts(num_experts, args.hidden, top_k=args.top_k, capacity_factor=None)
            ),
            make(ExpertMatmuls(num_experts, args.hidden), capacity_buffer(args, num_experts)),
        ]
        dense, moe, dropless, floor = _timing.time_interleaved(steps, args.repeats, args.warmup)
        row = {
            "moe_ms": 1e3 * statistics.median(moe),
            "dense_ms": 1e3 * statistics.median(dense),
            "ratio_vs_active_dense": _timing.median_pair_ratio(moe, dense),
            "floor_ratio_vs_active_dense": _timing.median_pair_ratio(floor, dense),
            "ratio_vs_floor": _timing.median_pair_ratio(moe, floor),
            "dropless_ms": 1e3 * statistics.median(dropless),
            "dropless_ratio_vs_active_dense": _timing.median_pair_ratio(dropless, dense),
        }
        line = (
            f"E={num_experts} moe_ms={row['moe_ms']:.1f} "
            f"dense_ms={row['dense_ms']:.1f} "
            f"ratio_vs_active_dense={row['ratio_vs_active_dense']:.2f} "
            f"floor_ratio_vs_active_dense={row['floor_ratio_vs_active_dense']:.2f} "
            f"ratio_vs_floor={row['ratio_vs_floor']:.2f} "
            f"dropless_ms={row['dropless_ms']:.1f} "
            f"dropless_ratio_vs_active_dense={row['dropless_ratio_vs_active_dense']:.2f}"
        )
        slow_repeats = max(1, args.repeats // 2)
        if args.dropless_methods and num_experts in all_experts_at:
            padded = MixtureOfExperts(
                num_experts, args.hidden, top_k=args.top_k, capacity_factor=num_experts / args.top_k
            )
            padded_seconds = _timing.median_seconds(make(padded), slow_repeats, args.warmup)
            row["padded_dropless_ms"] = 1e3 * padded_seconds
            line += f" padded_dropless_ms={row['padded_dropless_ms']:.1f}"
        if num_experts in all_experts_at:
            all_experts = AllExpertsMoE(num_experts, args.hidden, top_k=args.top_k)
            all_seconds = _timing.median_seconds(make(all_experts), slow_repeats, args.warmup)
            row["all_experts_ms"] = 1e3 * all_seconds
            row["speedup_vs_all_experts"] = all_seconds / statistics.median(moe)
            line += (
                f" all_experts_ms={row['all_experts_ms']:.1f} "
                f"speedup_vs_all_experts={row['speedup_vs_all_experts']:.2f}"
            )
        print(line, flush=True)
        results["experts"][str(num_experts)] = row
    if 8 in experts and 64 in experts:
        e8, e64 = results["experts"]["8"], results["experts"]["64"]
        # The dense anchor is the same work at both sizes, so dividing by it
        # cancels the load drift of the shared machine between the two.
        scaling = e64["ratio_vs_active_dense"] / e8["ratio_vs_active_dense"]
        raw_scaling = e64["moe_ms"] / e8["moe_ms"]
        results["scaling_64_vs_8"] = scaling
        results["scaling_64_vs_8_raw"] = raw_scaling
        print(
            f"scaling_64_vs_8={scaling:.2f} (anchored to the dense FFN; "
            f"raw time ratio {raw_scaling:.2f})"
        )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=256,
        help="tokens per example (the MoE capacity group)",
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--experts", default="8,32,64")
    parser.add_argument(
        "--all-experts-at",
        default="32",
        help="E values at which to time the all-experts anchor (it is slow)",
    )
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-jit", action="store_true", help="eager TF / JAX")
    parser.add_argument(
        "--dropless-methods",
        action="store_true",
        help="also time the padded dropless alternative (at the "
        "--all-experts-at sizes: it is as slow as all experts)",
    )
    parser.add_argument(
        "--policies",
        default="float32,mixed_bfloat16",
        help="Keras dtype policies to run under, comma-separated",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    jit_compile = BACKEND in ("tensorflow", "jax") and not args.no_jit
    experts = [int(e) for e in args.experts.split(",")]
    all_experts_at = {int(e) for e in args.all_experts_at.split(",") if e}
    inputs = ops.convert_to_tensor(
        np.random.default_rng(0)
        .normal(size=(args.tokens // args.sequence_length, args.sequence_length, args.dim))
        .astype("float32")
    )

    def make(layer, layer_inputs=None):
        return make_step(layer, inputs if layer_inputs is None else layer_inputs, jit_compile)

    results = {
        "backend": BACKEND,
        "jit_compile": jit_compile,
        "tokens": args.tokens,
        "dim": args.dim,
        "hidden": args.hidden,
        "top_k": args.top_k,
        "policies": {},
    }
    for policy in args.policies.split(","):
        keras.config.set_dtype_policy(policy)
        print(
            f"moe benchmark backend={BACKEND} policy={policy} jit_compile={jit_compile} "
            f"tokens={args.tokens} d={args.dim} hidden={args.hidden} k={args.top_k}"
        )
        results["policies"][policy] = run_policy(args, make, experts, all_experts_at)
    keras.config.set_dtype_policy("float32")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
