"""Expert parallelism: `expert_parallel_layout` on 4 virtual CPU devices.

The device count of XLA is fixed when JAX starts, so the check runs in a
subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4`. It is
backend-independent work (the subprocess always uses JAX, the only backend
where `keras.distribution` is functional), so it runs once, on JAX.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json
    import keras
    import numpy as np
    from hlkeras.layers import MixtureOfExperts
    from hlkeras.layers.moe_ops import expert_parallel_layout

    NUM_EXPERTS = 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5, 8)).astype("float32")
    y = rng.normal(size=(16, 5, 8)).astype("float32")

    def build():
        inputs = keras.Input(shape=(5, 8))
        moe = MixtureOfExperts(NUM_EXPERTS, 16, capacity_factor=1.0, name="moe")
        return keras.Model(inputs, moe(inputs))

    def train(model, weights):
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        return history.history["loss"]

    keras.utils.set_random_seed(0)
    reference = build()
    weights = [np.array(w) for w in reference.get_weights()]
    unsharded_loss = train(reference, weights)

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ["data", "model"], devices=devices)
    layout_map = expert_parallel_layout(mesh, expert_axis="model")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="data"
    )
    with distribution.scope():
        sharded = build()
        sharded_loss = train(sharded, weights)
    moe = sharded.get_layer("moe")
    kernels = {}
    for variable in (moe.expert_hidden_kernel, moe.expert_output_kernel,
                     moe.expert_hidden_bias, moe.router.kernel):
        value = variable.value
        kernels[variable.path] = {
            "spec": [str(axis) for axis in value.sharding.spec],
            "shard_shapes": sorted({tuple(s.data.shape) for s in value.addressable_shards}),
            "shape": list(value.shape),
        }
    print("RESULT" + json.dumps({
        "devices": len(devices),
        "unsharded_loss": unsharded_loss,
        "sharded_loss": sharded_loss,
        "variables": kernels,
    }))
    """
)


@pytest.mark.slow
@pytest.mark.backends("jax")
def test_expert_parallel_layout_shards_experts_and_trains_like_unsharded(tmp_path):
    script = tmp_path / "expert_parallel.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
        PYTHONPATH=str(CHECKOUT),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    completed = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(out for out in completed.stdout.splitlines() if out.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])

    assert result["devices"] == 4
    np.testing.assert_allclose(
        result["sharded_loss"], result["unsharded_loss"], rtol=1e-5, atol=1e-6
    )
    variables = result["variables"]
    hidden_kernel = variables["moe/expert_hidden_kernel"]
    output_kernel = variables["moe/expert_output_kernel"]
    # The expert axis is split over the 2-device "model" axis: 2 experts per shard.
    assert hidden_kernel["spec"][0] == "model"
    assert hidden_kernel["shard_shapes"] == [[2, 8, 16]]
    assert output_kernel["shard_shapes"] == [[2, 16, 8]]
    assert variables["moe/expert_hidden_bias"]["shard_shapes"] == [[2, 16]]
    # The router is replicated: every shard holds the whole kernel.
    assert variables["moe/router/kernel"]["shard_shapes"] == [[8, 4]]
