"""Benchmark: the step-time overhead of `hlkeras train --distribute` (JAX).

One training step (`model.train_on_batch`, forward + backward + AdamW) of
the same model on the same global batch under each configuration, the
configurations interleaved after warm-up (each ratio is the median of
per-round ratios):

- single: no distribution (one device), the anchor;
- data: `keras.distribution.DataParallel` over every device;
- model BxM: `ModelParallel` on a BxM mesh (MoE experts, attention heads and
  FFN units sharded over the model axis, `hlkeras.training.distribute`).

Every number is printed as a ratio to the anchor measured in the same run.
The devices are XLA's virtual CPU devices
(`--xla_force_host_platform_device_count`), which share this machine's
cores: the ratios measure what the distribution costs (sharded dispatch,
collectives, resharding), not a speed-up, which needs real devices.

Usage:
    PYTHONPATH=. python benchmarks/distribute.py --devices 4 --json out.json
"""

import argparse
import contextlib
import json
import os
import statistics
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="virtual CPU devices")
    parser.add_argument("--arch", default="vit", help="hlkeras.models arch (vit has MoE FFNs)")
    parser.add_argument("--experts", type=int, default=4, help="MoE experts per FFN (vit)")
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--meshes", default="2x2,1x4", help="ModelParallel meshes BxM")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # XLA reads the device count once, when JAX starts: before importing keras.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    import keras
    import numpy as np

    from hlkeras import _timing
    from hlkeras import models
    from hlkeras import training
    from hlkeras.training import distribute

    spec = {"arch": args.arch, "input_shape": [8, 8, 1], "num_classes": 10}
    if args.arch == "vit":
        spec["num_experts"] = args.experts
    spec = models.resolve_spec(spec)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch_size, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=args.batch_size)
    keras.utils.set_random_seed(0)
    probe = models.build(spec)
    weights = probe.get_weights()

    def make_step(distribution):
        """One training step of a model built (and run) under `distribution`."""
        scope = distribution.scope if distribution else contextlib.nullcontext
        with scope():
            model = models.build(spec)
            model.set_weights(weights)
            training.compile_model(model)

        def step():
            with scope():
                model.train_on_batch(x, y)

        return step

    configurations = [("single", None, None), ("data", "data", None)]
    configurations += [(f"model_{mesh}", "model", mesh) for mesh in args.meshes.split(",") if mesh]
    print(
        f"distribute benchmark: {args.arch} (experts {args.experts}), global batch "
        f"{args.batch_size}, {len(keras.distribution.list_devices())} virtual CPU devices "
        "sharing the same cores: ratios are framework overhead, not speed-up"
    )
    names, steps, descriptions = [], [], []
    for name, strategy, mesh in configurations:
        distribution, description = None, "one device"
        if strategy:
            distribution, _, description = distribute.make_distribution(
                strategy, probe, args.batch_size, mesh
            )
        names.append(name)
        steps.append(make_step(distribution))
        descriptions.append(description)
    # Interleaved rounds: each ratio is the median of per-round ratios, whose
    # calls saw the same load of the shared machine.
    seconds = _timing.time_interleaved(steps, args.repeats, args.warmup)
    results = {"arch": args.arch, "batch_size": args.batch_size, "configurations": {}}
    for name, times, description in zip(names, seconds, descriptions):
        step_ms = 1e3 * statistics.median(times)
        ratio = _timing.median_pair_ratio(times, seconds[0])
        results["configurations"][name] = {
            "step_ms": step_ms,
            "ratio_vs_single": ratio,
            "description": description,
        }
        print(f"{name} step_ms={step_ms:.1f} ratio_vs_single={ratio:.2f} ({description})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
