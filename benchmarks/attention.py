"""Forward+backward time of hlkeras.layers.MultiHeadAttention against
keras.layers.MultiHeadAttention, measured in one run on the active backend.

Self-attention, batch 8, d_model 256, 8 heads of 32, float32, at sequence
lengths 128 and 512; plus hlkeras with 2 kv heads (grouped-query attention)
against the same Keras layer. In the plain cases both layers hold the same
weights (hlkeras' layout is Keras'), checked by comparing their outputs.
Each step computes the gradients of the summed output with respect to the
input and every weight, compiled where the backend has it (TF
`jit_compile=True`, `jax.jit`; torch runs eagerly: its `torch.compile` takes
minutes on this CPU). After warm-up, hlkeras and Keras steps alternate, so
background load hits both alike, and each ratio is the median over repeats
of (hlkeras time / Keras time).

It also times hlkeras with each attention core (einsum+softmax against
`ops.dot_product_attention`) and reports the faster one: that is how
`hlkeras.layers.attention.DEFAULT_ATTENTION_CORE` was chosen per backend (the issue
asks for this measurement on TensorFlow).

Usage:
    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/attention.py --json out.json

Prints one line per case, `case ratio=<hlkeras/keras>`, and writes the same
figures as JSON.
"""

import argparse
import json
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from hlkeras import _timing  # noqa: E402
from hlkeras.layers import attention  # noqa: E402

BACKEND = keras.backend.backend()
BATCH, MODEL_DIM, NUM_HEADS, KEY_DIM = 8, 256, 8, 32
CASES = [
    # (case name, sequence length, hlkeras kv heads)
    ("mha_seq128", 128, NUM_HEADS),
    ("mha_seq512", 512, NUM_HEADS),
    ("gqa2_seq128", 128, 2),
    ("gqa2_seq512", 512, 2),
]


def make_step(layer, inputs):
    """Returns a no-argument function running one compiled forward+backward
    step of `layer(inputs, inputs)` and blocking until it is done."""
    layer(inputs, inputs)  # build
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            output, _ = layer.stateless_call(trainable, non_trainable, x, x)
            return output.sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        x = jax.numpy.asarray(inputs)
        return lambda: jax.block_until_ready(grad(trainable, x))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(inputs)

        @tf.function(jit_compile=True)
        def grad(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, x))
            return tape.gradient(loss, [x] + layer.trainable_variables)

        return lambda: [g.numpy() for g in grad(x)][0]
    import torch

    x = torch.tensor(inputs, requires_grad=True)

    def step():
        for v in layer.trainable_variables:
            v.value.grad = None
        x.grad = None
        layer(x, x).sum().backward()

    return step


def hlkeras_layer(num_kv_heads, core):
    return attention.MultiHeadAttention(
        NUM_HEADS, KEY_DIM, num_kv_heads=num_kv_heads, attention_core=core
    )


def keras_layer():
    return keras.layers.MultiHeadAttention(NUM_HEADS, KEY_DIM)


def run_case(length, num_kv_heads, repeats, warmup):
    """Times hlkeras with each attention core and Keras, alternating."""
    inputs = np.random.default_rng(0).normal(size=(BATCH, length, MODEL_DIM)).astype("float32")
    reference = keras_layer()
    expected = keras.ops.convert_to_numpy(reference(inputs, inputs))
    layers = [hlkeras_layer(num_kv_heads, core) for core in attention.ATTENTION_CORES]
    for layer in layers:
        output = layer(inputs, inputs)
        if num_kv_heads == NUM_HEADS:
            layer.set_weights(reference.get_weights())
            output = keras.ops.convert_to_numpy(layer(inputs, inputs))
            np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)
    steps = [make_step(layer, inputs) for layer in layers + [reference]]
    *cores, theirs = _timing.time_interleaved(steps, repeats, warmup)
    # On a JAX GPU/TPU the layer always takes the fused kernel, so both
    # "cores" time the same thing there; this comparison is for CPU.
    used = attention.default_attention_core()
    ours = cores[attention.ATTENTION_CORES.index(used)]
    result = {
        "ratio": _timing.median_pair_ratio(ours, theirs),
        "hlkeras_ms": 1e3 * statistics.median(ours),
        "keras_ms": 1e3 * statistics.median(theirs),
        "core": used,
    }
    for core, seconds in zip(attention.ATTENTION_CORES, cores):
        result[f"ratio_{core}"] = _timing.median_pair_ratio(seconds, theirs)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this path")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for name, length, num_kv_heads in CASES:
        result = run_case(length, num_kv_heads, args.repeats, args.warmup)
        results[name] = result
        print(
            f"{name} ratio={result['ratio']:.3f} (hlkeras "
            f"{result['hlkeras_ms']:.1f} ms, keras {result['keras_ms']:.1f} ms; "
            f"core {result['core']}; einsum core ratio="
            f"{result['ratio_einsum']:.3f}, dot_product_attention core ratio="
            f"{result['ratio_dot_product_attention']:.3f})",
            flush=True,
        )
    summed = {
        core: round(sum(r[f"ratio_{core}"] for r in results.values()), 3)
        for core in attention.ATTENTION_CORES
    }
    print(
        f"{BACKEND} faster_core={min(summed, key=summed.get)} "
        f"(summed ratios {summed}); the layer uses "
        f"{attention.default_attention_core()}"
    )
    if args.json:
        payload = {
            "backend": BACKEND,
            "batch": BATCH,
            "d_model": MODEL_DIM,
            "num_heads": NUM_HEADS,
            "key_dim": KEY_DIM,
            "repeats": args.repeats,
            "cases": results,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
