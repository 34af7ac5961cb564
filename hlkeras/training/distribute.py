"""Training on several devices and hosts with `keras.distribution` (JAX).

`hlkeras train --distribute data|model [--mesh BATCHxMODEL]` runs the same
training recipe under a `keras.distribution.DataParallel` or `ModelParallel`
distribution; this module builds that distribution for a model and checks
the user's choices first:

- `data`: every visible device (of every host) holds a replica and computes
  `batch_size / devices` examples of each global batch.
- `model`: a `(batch, model)` device mesh. The `LayoutMap` shards MoE expert
  weights over the model axis (`expert_parallel_layout`), and attention and
  FFN kernels as Keras' own recipes for transformers do (the heads, or the
  hidden units, over the model axis); everything else is replicated. The
  batch is split over the batch axis.

Several hosts: every host runs the same command with the environment of
`keras.distribution.initialize` set (`KERAS_DISTRIBUTION_JOB_ADDRESSES`, the
coordinator's `host:port`; `KERAS_DISTRIBUTION_NUM_PROCESSES`;
`KERAS_DISTRIBUTION_PROCESS_ID`). Keras then shards each host's input
pipeline, and only process 0 (`process_index`) writes the run directory.

Keras 3.15 implements `keras.distribution` for training only on JAX: the
TensorFlow backend has a DTensor `list_devices` but its trainer ignores the
distribution, and the torch backend has none. `check_backend` says so.
"""

import os
import re

import keras

from hlkeras.layers.moe_ops import expert_parallel_layout

STRATEGIES = ("data", "model")
ENVIRONMENT = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
BATCH_AXIS, MODEL_AXIS = "batch", "model"

# Kernels sharded over the model axis under `--distribute model`, by the end
# of the variable path, with the axis that is split (Keras' recipes for
# transformers shard the attention heads and the FFN's hidden units).
MODEL_SHARDED_KERNELS = (
    (r"/(query|key|value)/kernel$", 1),  # (d, heads, head_dim)
    (r"/attention_output/kernel$", 0),  # (heads, head_dim, d)
    (r"/hidden_dense/kernel$", 1),  # (d, hidden): ResidualBlock, FeedForward
    (r"/output_dense/kernel$", 0),  # (hidden, d)
)


class DistributeError(ValueError):
    """A `--distribute` / `--mesh` choice this machine or model cannot take."""


def check_backend():
    """Raises `DistributeError` unless the backend trains under `keras.distribution`."""
    backend = keras.backend.backend()
    if backend != "jax":
        raise DistributeError(
            f"--distribute needs the JAX backend (KERAS_BACKEND=jax); got {backend}. "
            "Keras 3.15 trains under keras.distribution only on JAX: on tensorflow its "
            "trainer ignores it (use tf.distribute.MirroredStrategy in your own script), "
            "and torch has no keras.distribution"
        )


def initialize_from_environment():
    """Joins the hosts named by `ENVIRONMENT` (`keras.distribution.initialize`)
    once; a no-op on one host. Must run before JAX first uses a device."""
    if int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")) > 1:
        import jax

        if not jax.distributed.is_initialized():
            keras.distribution.initialize()


def process_index():
    """This process' index among the hosts (0 on one host, or off JAX)."""
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def num_processes():
    """The number of hosts (processes) of the run."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def parse_mesh(text, num_devices):
    """`"BATCHxMODEL"` -> `(batch, model)`, whose product is the device count."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise DistributeError(f"--mesh must be BATCHxMODEL, e.g. 2x2; got {text!r}")
    batch, model = int(match[1]), int(match[2])
    if batch * model != num_devices:
        raise DistributeError(
            f"--mesh {batch}x{model} has {batch * model} devices; "
            f"{num_devices} are visible (the product must equal it)"
        )
    return batch, model


def default_mesh(num_devices):
    """`(batch, model)` without `--mesh`: a model axis of 2 when the device
    count is even (else 1), the rest over the batch."""
    model = 2 if num_devices % 2 == 0 else 1
    return num_devices // model, model


def make_distribution(strategy, model, batch_size, mesh=None):
    """The `keras.distribution` distribution of `strategy` for `model`.

    Args:
        strategy: "data" or "model".
        model: The model built without a distribution; its variables give
            the layout of "model" (it is not changed).
        batch_size: The global batch size.
        mesh: `"BATCHxMODEL"` for "model" (default `default_mesh`).

    Returns:
        `(distribution, data_parallel_size, description)`.

    Raises:
        DistributeError: An unknown strategy, a backend without
            `keras.distribution`, a mesh that does not fit the devices, a
            batch the data-parallel size does not divide, or (for "model")
            a model with nothing to shard.
    """
    if strategy not in STRATEGIES:
        raise DistributeError(
            f"--distribute must be one of {', '.join(STRATEGIES)}; got {strategy!r}"
        )
    check_backend()
    devices = keras.distribution.list_devices()
    if strategy == "data":
        if mesh is not None:
            raise DistributeError("--mesh needs --distribute model; data uses every device")
        distribution = keras.distribution.DataParallel(devices=devices)
        data_parallel = len(devices)
        description = f"DataParallel over {len(devices)} devices"
    else:
        batch, model_size = parse_mesh(mesh, len(devices)) if mesh else default_mesh(len(devices))
        device_mesh = keras.distribution.DeviceMesh(
            (batch, model_size), [BATCH_AXIS, MODEL_AXIS], devices=devices
        )
        layout_map, sharded = model_parallel_layout(model, device_mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name=BATCH_AXIS
        )
        data_parallel = batch
        description = (
            f"ModelParallel on a {batch}x{model_size} (batch x model) mesh, "
            f"{len(sharded)} weights sharded"
        )
    if batch_size % data_parallel:
        raise DistributeError(
            f"--batch-size {batch_size} is not divisible by the {data_parallel} "
            "data-parallel replicas (the batch size is global)"
        )
    description += f"; global batch {batch_size}, {batch_size // data_parallel} per replica"
    return distribution, data_parallel, description


def model_parallel_layout(model, device_mesh):
    """The `LayoutMap` of `--distribute model` for `model`, and what it shards.

    MoE expert weights split their expert axis (`expert_parallel_layout`);
    the kernels of `MODEL_SHARDED_KERNELS` split one axis; each only where
    the model axis divides that dimension. Every other variable is
    replicated.

    Returns:
        `(layout_map, sharded_paths)`.

    Raises:
        DistributeError: Nothing in the model can be sharded.
    """
    model_size = device_mesh.shape[list(device_mesh.axis_names).index(MODEL_AXIS)]
    experts = expert_parallel_layout(device_mesh, expert_axis=MODEL_AXIS)
    layout_map = keras.distribution.LayoutMap(device_mesh)
    sharded = []
    for variable in model.variables:
        axis = _sharded_axis(variable.path, experts)
        if axis is None or variable.shape[axis] % model_size:
            continue
        layout = [None] * len(variable.shape)
        layout[axis] = MODEL_AXIS
        layout_map[f"^{re.escape(variable.path)}$"] = tuple(layout)
        sharded.append(variable.path)
    if not sharded or model_size == 1:
        raise DistributeError(
            f"--distribute model has nothing to shard in model {model.name!r}: no MoE "
            f"experts, attention or FFN kernel that a model axis of {model_size} splits; "
            "use --distribute data"
        )
    return layout_map, sharded


def _sharded_axis(path, expert_layout):
    """The axis of variable `path` to split over the model axis, or None."""
    if expert_layout[path] is not None:
        return 0
    for pattern, axis in MODEL_SHARDED_KERNELS:
        if re.search(pattern, path):
            return axis
    return None
