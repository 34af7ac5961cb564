"""Benchmark: the step-time overhead of `hlkeras train --distribute` (JAX).

One training step (`model.train_on_batch`, forward + backward + AdamW) of
the same model on the same global batch, timed as the median of repeats
after warm-up, under each configuration:

- single: no distribution (one device), the anchor;
- data: `keras.distribution.DataParallel` over every device;
- model BxM: `ModelParallel` on a BxM mesh (MoE experts, attention heads and
  FFN units sharded over the model axis, `hlkeras.distribute`).

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
    from hlkeras import distribute
    from hlkeras import models
    from hlkeras import training

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

    def step_seconds(distribution):
        with distribution.scope() if distribution else contextlib.nullcontext():
            model = models.build(spec)
            model.set_weights(weights)
            training.compile_model(model)
            step = lambda: model.train_on_batch(x, y)  # noqa: E731
            return _timing.median_seconds(step, args.repeats, args.warmup)

    configurations = [("single", None), ("data", None)]
    configurations += [("model", mesh) for mesh in args.meshes.split(",") if mesh]
    print(
        f"distribute benchmark: {args.arch} (experts {args.experts}), global batch "
        f"{args.batch_size}, {len(keras.distribution.list_devices())} virtual CPU devices "
        "sharing the same cores: ratios are framework overhead, not speed-up"
    )
    results = {"arch": args.arch, "batch_size": args.batch_size, "configurations": {}}
    single = None
    for strategy, mesh in configurations:
        if strategy == "single":
            distribution, description = None, "one device"
        else:
            distribution, _, description = distribute.make_distribution(
                strategy, probe, args.batch_size, mesh
            )
        seconds = step_seconds(distribution)
        single = single or seconds
        name = strategy if mesh is None else f"model_{mesh}"
        results["configurations"][name] = {
            "step_ms": 1e3 * seconds,
            "ratio_vs_single": seconds / single,
            "description": description,
        }
        print(
            f"{name} step_ms={1e3 * seconds:.1f} ratio_vs_single={seconds / single:.2f} "
            f"({description})",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
