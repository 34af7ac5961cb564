"""LoRA benchmark on the active Keras backend, ratios to anchors in the same run.

For d_in = d_out in {1024, 4096}, rank 8, batch 32 it prints:
- `train_step_ratio_vs_keras_lora`: one training step of a model holding
  hlkeras `LoRADense` / the same step with Keras `Dense(...).enable_lora(8)`
  (same weights, same optimizer, default `jit_compile`). Target <= 0.8 at
  d=4096.
- `dora_step_ratio_vs_lora`: one training step of the DoRA copy
  (`apply_lora(..., dora=True)`, same A, B) / the hlkeras LoRA step.
  Target <= 1.3 at d=4096 (peft's optimized DoRA reports ~1.3x LoRA).
- `merged_inference_ratio`: inference of `merge_lora(model)` / the plain
  `Dense` model it came from. Target <= 1.02.
- `adapter_bytes_fraction`: `save_adapters` file size / the adapted model's
  full `.weights.h5` size. Target <= 0.02 at d=1024.
- `adapter_switch_ms`: one `set_adapter` between two named adapters of a
  model of 24 `LoRADense(d, rank=8)` layers, in milliseconds (target <= 10
  at d=4096), with `switch_vs_predict_ratio` (that switch / one batch-1
  `predict_on_batch` of the model, the anchor) and
  `predict_after_switch_ratio` (a predict right after a switch / one with no
  switch before it: 1.0 means nothing was recompiled).

The two models of a ratio are called alternately, one call at a time, after
a warm-up; the ratio is median(call time) / median(call time), so machine
load that drifts during the run hits both sides alike.

Run: `KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/lora.py`
"""

import argparse
import os
import statistics
import tempfile

import keras
import numpy as np

from hlkeras import _timing
from hlkeras import lora
from hlkeras.layers import LoRADense

RANK = 8
BATCH = 32
TARGETS = {
    "train_step_ratio_vs_keras_lora": (4096, 0.8),
    "dora_step_ratio_vs_lora": (4096, 1.3),
    "merged_inference_ratio": (None, 1.02),
    "adapter_bytes_fraction": (1024, 0.02),
    "adapter_switch_ms": (4096, 10.0),
}
SWITCH_LAYERS = 24


def build_models(d, rank):
    """The pretrained `Dense` model, its hlkeras LoRA copy, the Keras
    `enable_lora` twin holding the same kernel, bias, A and B, and the
    hlkeras DoRA copy with the same A and B."""
    inputs = keras.Input(shape=(d,), name="features")
    pretrained = keras.Model(inputs, keras.layers.Dense(d, name="dense")(inputs))
    ours = lora.apply_lora(pretrained, rank=rank, targets=["dense"])
    layer = ours.get_layer("dense")
    rng = np.random.default_rng(0)
    layer.lora_kernel_b.assign(
        rng.normal(scale=0.01, size=layer.lora_kernel_b.shape).astype("float32")
    )

    keras_layer = keras.layers.Dense(d, name="dense")
    keras_layer.build((None, d))
    keras_layer.enable_lora(rank)
    for target, source in [
        (keras_layer._kernel, layer.kernel),
        (keras_layer.bias, layer.bias),
        (keras_layer.lora_kernel_a, layer.lora_kernel_a),
        (keras_layer.lora_kernel_b, layer.lora_kernel_b),
    ]:
        target.assign(np.array(keras.ops.convert_to_numpy(source)))
    keras_inputs = keras.Input(shape=(d,), name="features")
    keras_lora = keras.Model(keras_inputs, keras_layer(keras_inputs))
    dora = lora.apply_lora(pretrained, rank=rank, targets=["dense"], dora=True)
    dora_layer = dora.get_layer("dense")
    dora_layer.lora_kernel_a.assign(np.array(keras.ops.convert_to_numpy(layer.lora_kernel_a)))
    dora_layer.lora_kernel_b.assign(np.array(keras.ops.convert_to_numpy(layer.lora_kernel_b)))
    return pretrained, ours, keras_lora, dora


def median_ratio(numerator, denominator, calls):
    """median(time of one numerator call) / median(one denominator call),
    the calls interleaved (`hlkeras._timing.time_interleaved`); also returns
    the numerator's median seconds."""
    numerator_times, denominator_times = _timing.time_interleaved(
        [numerator, denominator], repeats=calls, warmup=0
    )
    numerator_median = statistics.median(numerator_times)
    return numerator_median / statistics.median(denominator_times), numerator_median


def train_step_ratio(ours, keras_lora, x, y, calls, warmup):
    steps = []
    for model in (ours, keras_lora):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        for _ in range(warmup):
            model.train_on_batch(x, y)  # returns the loss: a sync point
        steps.append(lambda model=model: model.train_on_batch(x, y))
    return median_ratio(steps[0], steps[1], calls=calls)


def merged_inference_ratio(ours, pretrained, x, calls, warmup):
    merged = lora.merge_lora(ours)
    predictions = []
    for model in (merged, pretrained):
        for _ in range(warmup):
            model.predict_on_batch(x)
        predictions.append(lambda model=model: model.predict_on_batch(x))
    # Inference calls are short: more of them for a stable median.
    return median_ratio(predictions[0], predictions[1], calls=5 * calls)


def adapter_bytes_fraction(ours):
    with tempfile.TemporaryDirectory() as tmp:
        adapter_path = os.path.join(tmp, "adapter.lora.npz")
        full_path = os.path.join(tmp, "full.weights.h5")
        lora.save_adapters(ours, adapter_path)
        ours.save_weights(full_path)
        return os.path.getsize(adapter_path) / os.path.getsize(full_path)


def adapter_switch(d, calls, warmup):
    """Times `set_adapter` on a deep stack of adapted layers against the
    model's batch-1 predict, and a predict right after a switch against
    one after another predict."""
    inputs = keras.Input(shape=(d,), name="features")
    x = inputs
    for index in range(SWITCH_LAYERS):
        x = LoRADense(d, rank=RANK, name=f"dense_{index}")(x)
    model = keras.Model(inputs, x)
    lora.add_adapter(model, "other")
    sample = np.ones((1, d), "float32")
    names = ["other", "default"]

    def switch():
        lora.set_adapter(model, names[0])
        names.reverse()

    def predict():
        model.predict_on_batch(sample)

    switch_times, after_switch_times = _timing.time_interleaved(
        [switch, predict], repeats=calls, warmup=warmup
    )
    steady_times = _timing.time_calls(predict, repeats=calls, warmup=0)
    switch_seconds = statistics.median(switch_times)
    predict_seconds = statistics.median(steady_times)
    results = {
        "adapter_switch_ms": switch_seconds * 1e3,
        "switch_vs_predict_ratio": switch_seconds / predict_seconds,
        "predict_after_switch_ratio": statistics.median(after_switch_times) / predict_seconds,
    }
    print(
        f"backend={keras.backend.backend()} d={d} rank={RANK} layers={SWITCH_LAYERS} "
        + " ".join(f"{name}={value:.4f}" for name, value in results.items())
        + f" (batch-1 predict {predict_seconds * 1e3:.2f} ms)",
        flush=True,
    )
    return results


def run(d, calls, warmup):
    pretrained, ours, keras_lora, dora = build_models(d, RANK)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, d)).astype("float32")
    y = rng.normal(size=(BATCH, d)).astype("float32")
    train_ratio, train_seconds = train_step_ratio(ours, keras_lora, x, y, calls, warmup)
    dora_ratio, dora_seconds = train_step_ratio(dora, ours, x, y, calls, warmup)
    inference_ratio, inference_seconds = merged_inference_ratio(ours, pretrained, x, calls, warmup)
    results = {
        "train_step_ratio_vs_keras_lora": train_ratio,
        "dora_step_ratio_vs_lora": dora_ratio,
        "merged_inference_ratio": inference_ratio,
        "adapter_bytes_fraction": adapter_bytes_fraction(ours),
    }
    print(
        f"backend={keras.backend.backend()} d={d} rank={RANK} batch={BATCH} "
        f"jit_compile={ours.jit_compile} "
        + " ".join(f"{name}={value:.4f}" for name, value in results.items())
        + f" (hlkeras train step {train_seconds * 1e3:.2f} ms, "
        f"DoRA train step {dora_seconds * 1e3:.2f} ms, "
        f"merged inference {inference_seconds * 1e3:.3f} ms)",
        flush=True,
    )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument(
        "--calls",
        type=int,
        default=30,
        help="timed training steps per model (inference: 5x as many calls)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    results = {d: run(d, args.calls, args.warmup) for d in args.dims}
    results[max(args.dims)].update(adapter_switch(max(args.dims), args.calls, args.warmup))
    for name, (target_d, limit) in TARGETS.items():
        for d, values in results.items():
            if target_d in (None, d):
                verdict = "met" if values[name] <= limit else "NOT met"
                print(f"target {name} <= {limit} at d={d}: {values[name]:.4f} {verdict}")


if __name__ == "__main__":
    main()
