"""`hlkeras train --distribute` and `hlkeras.training.distribute` (keras.distribution).

The device count of XLA is fixed when JAX starts, so everything that needs
several devices runs in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, on JAX (the only
backend where Keras 3.15 trains under `keras.distribution`).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from hlkeras import cli
from hlkeras import data
from hlkeras import training
from hlkeras.training import distribute
from hlkeras.training import runs

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _env(devices, **extra):
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        # The suite's compile flags (conftest.py), and the devices.
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICES_FLAG}={devices}",
        PYTHONPATH=str(CHECKOUT),
        TF_CPP_MIN_LOG_LEVEL="2",
        **extra,
    )
    return env


# --- in process, every backend --------------------------------------------------


def test_parse_mesh_needs_batch_x_model_matching_the_devices():
    assert distribute.parse_mesh("2x2", 4) == (2, 2)
    assert distribute.parse_mesh("1X4", 4) == (1, 4)
    with pytest.raises(distribute.DistributeError, match=r"--mesh must be BATCHxMODEL.*'4'"):
        distribute.parse_mesh("4", 4)
    with pytest.raises(distribute.DistributeError, match=r"--mesh must be BATCHxMODEL"):
        distribute.parse_mesh("0x4", 4)
    with pytest.raises(distribute.DistributeError, match=r"--mesh 3x2 has 6 devices; 4 are"):
        distribute.parse_mesh("3x2", 4)
    assert distribute.default_mesh(4) == (2, 2)
    assert distribute.default_mesh(3) == (3, 1)


@pytest.mark.parametrize(
    "num_examples, batch_size, divisor", [(30, 8, 4), (180, 64, 4), (7, 64, 4), (17, 4, 1)]
)
def test_evenly_divisible_batches_drop_the_fewest_examples(num_examples, batch_size, divisor):
    ds = tf.data.Dataset.from_tensor_slices(
        (np.arange(num_examples, dtype="float32")[:, None], np.arange(num_examples))
    ).batch(batch_size)
    rebatched, dropped = data.evenly_divisible_batches(ds, num_examples, batch_size, divisor)
    sizes = [int(y.shape[0]) for _, y in rebatched]
    # Oracle: the fewest left over by any multiple of `divisor` up to the batch.
    fewest = min(num_examples % m for m in range(divisor, max(batch_size, divisor) + 1, divisor))
    assert dropped == fewest < divisor
    assert all(size % divisor == 0 and size <= max(batch_size, divisor) for size in sizes)
    assert sum(sizes) == num_examples - dropped
    assert int(rebatched.cardinality()) == len(sizes)
    labels = np.concatenate([y.numpy() for _, y in rebatched])
    np.testing.assert_array_equal(labels, np.arange(num_examples - dropped))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distribute", "pipeline"], "--distribute must be one of data, model, got 'pipeline'"),
        (["--distribute", "data", "--mesh", "2x2"], "--mesh needs --distribute model; got data"),
        (["--mesh", "2x2"], "--mesh needs --distribute model"),
    ],
)
def test_distribute_mistakes_get_one_line_and_exit_2(capsys, tmp_path, flags, message):
    out = tmp_path / "run"
    status = cli.main(["train", "--out", str(out), "--epochs", "1", *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == [f"hlkeras train: error: {message}"]
    assert not out.exists()


@pytest.mark.backends("tensorflow", "torch")
def test_distribute_says_what_the_backend_lacks(capsys, tmp_path):
    status = cli.main(["train", "--out", str(tmp_path / "run"), "--distribute", "data"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert f"--distribute needs the JAX backend (KERAS_BACKEND=jax); got {BACKEND}" in err
    with pytest.raises(distribute.DistributeError, match="keras.distribution only on JAX"):
        distribute.check_backend()


@pytest.mark.backends("jax")
def test_model_parallel_needs_something_to_shard():
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ["batch", "model"], devices=keras.distribution.list_devices()[:1]
    )
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs), name="tiny")
    with pytest.raises(distribute.DistributeError, match="nothing to shard in model 'tiny'"):
        distribute.model_parallel_layout(model, mesh)


# --- several devices: subprocesses on JAX -------------------------------------------

SHARDING_SCRIPT = textwrap.dedent(
    """
    import contextlib, json
    import keras
    import numpy as np
    import tensorflow as tf
    from hlkeras import models
    from hlkeras.training import distribute

    spec = models.resolve_spec({
        "arch": "vit", "input_shape": [8, 8, 1], "num_classes": 10,
        "num_experts": 4, "depth": 1, "dropout": 0.0,
    })
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    keras.utils.set_random_seed(0)
    probe = models.build(spec)
    weights = [np.array(w) for w in probe.get_weights()]

    def train(distribution):
        with distribution.scope() if distribution else contextlib.nullcontext():
            model = models.build(spec)
            model.set_weights(weights)
            model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
            loss = model.fit(ds, epochs=3, shuffle=False, verbose=0).history["loss"]
            outputs = model.predict(x, batch_size=16, verbose=0)
        return model, loss, outputs

    def layout(model, path):
        value = next(v for v in model.variables if v.path == path).value
        return {
            "spec": [str(axis) for axis in value.sharding.spec],
            "shard_shape": list(value.addressable_shards[0].data.shape),
        }

    result = {"devices": len(keras.distribution.list_devices())}
    _, result["single_loss"], single_outputs = train(None)
    for strategy, mesh in (("data", None), ("model", "2x2")):
        distribution, replicas, description = distribute.make_distribution(
            strategy, probe, 16, mesh)
        model, loss, outputs = train(distribution)
        result[strategy] = {
            "loss": loss, "replicas": replicas, "description": description,
            "max_output_diff": float(np.max(np.abs(outputs - single_outputs))),
            "expert_kernel": layout(model, "block_0/block_0_moe/expert_hidden_kernel"),
            "query_kernel": layout(model, "block_0/attention/query/kernel"),
            "router_kernel": layout(model, "block_0/block_0_moe/router/kernel"),
        }
    try:
        distribute.make_distribution("data", probe, 30)
    except distribute.DistributeError as error:
        result["batch_error"] = str(error)
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.slow
@pytest.mark.backends("jax")
def test_data_and_model_parallel_train_like_one_device(tmp_path):
    script = tmp_path / "sharding.py"
    script.write_text(SHARDING_SCRIPT)
    completed = subprocess.run(
        [sys.executable, str(script)], env=_env(4), capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(out for out in completed.stdout.splitlines() if out.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])

    assert result["devices"] == 4
    for strategy in ("data", "model"):
        run = result[strategy]
        # The same global batches give the same loss curve and model.
        np.testing.assert_allclose(run["loss"], result["single_loss"], rtol=1e-5, atol=1e-6)
        assert run["max_output_diff"] < 1e-5
    data_run, model_run = result["data"], result["model"]
    assert data_run["replicas"] == 4
    assert data_run["description"].startswith("DataParallel over 4 devices; global batch 16, 4")
    # DataParallel replicates every weight.
    assert data_run["expert_kernel"]["spec"] == ["None", "None", "None"]
    assert model_run["replicas"] == 2
    # ModelParallel on 2x2: the 4 experts split 2 per device over "model",
    # the 4 attention heads too; the router is replicated.
    assert model_run["expert_kernel"]["spec"][0] == "model"
    assert model_run["expert_kernel"]["shard_shape"][0] == 2
    assert model_run["query_kernel"]["spec"][1] == "model"
    assert model_run["query_kernel"]["shard_shape"][1] == 2
    assert model_run["router_kernel"]["spec"] == ["None", "None"]
    assert result["batch_error"] == (
        "--batch-size 30 is not divisible by the 4 data-parallel replicas "
        "(the batch size is global)"
    )


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.serial
# Run from the TensorFlow pass, as every serial test (tests/README.md); its
# processes are JAX's.
@pytest.mark.backends("tensorflow")
def test_two_processes_train_one_model_into_one_run_directory(tmp_path):
    data_dir = str(tmp_path / "tfds")
    data.load("digits", data_dir=data_dir)  # prepared once, before both read it
    out = tmp_path / "run"
    command = [sys.executable, "-m", "hlkeras.cli", "train", "--data-dir", data_dir]
    command += ["--out", str(out), "--arch", "mlp", "--depth", "1", "--width", "16"]
    # --no-augment and --dropout 0: the oracle below runs on one device, and
    # random draws (shifts, dropout masks) need not fall on the same samples
    # when the batch is split over processes and devices.
    command += ["--epochs", "1", "--no-augment", "--dropout", "0", "--distribute", "data"]
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            command,
            env=_env(
                2,
                KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                KERAS_DISTRIBUTION_PROCESS_ID=str(process),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process in (0, 1)
    ]
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    chief_out, worker_out = outputs[0][0], outputs[1][0]
    # Both hosts' 2 devices form one 4-replica DataParallel.
    assert "DataParallel over 4 devices; global batch 64, 16 per replica" in chief_out
    assert "process 1 done; process 0 wrote the run" in worker_out
    assert (out / runs.RunDir.TFLITE).exists()
    # The worker wrote only to its private directory, and removed it.
    assert not os.path.exists(runs.private_run_path(str(out), 1))

    # Oracle: the same command on one device, without --distribute, starts
    # from the same weights and sees the same global batches.
    reference = tmp_path / "reference"
    command[command.index(str(out))] = str(reference)
    command = command[: command.index("--distribute")]
    completed = subprocess.run(command, env=_env(1), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows, reference_rows = (
        training.read_history_rows(str(path / "history.csv")) for path in (out, reference)
    )
    assert len(rows) == 1
    for key in ("loss", "val_loss", "accuracy"):
        np.testing.assert_allclose(rows[0][key], reference_rows[0][key], rtol=1e-4)
    metrics, reference_metrics = (
        json.loads((path / runs.RunDir.METRICS).read_text()) for path in (out, reference)
    )
    assert metrics["test_accuracy"] == pytest.approx(reference_metrics["test_accuracy"])
