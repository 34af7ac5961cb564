"""Looking inside the hidden layers: activation, gradient and dead-unit
statistics on every backend, and a callback that warns about what it sees.

Keras' `TensorBoard(histogram_freq=...)` logs weight histograms only; these
are the statistics of what each hidden layer *outputs* on a probe batch, of
the gradients reaching its weights, and of how far an epoch moved them.

- `layer_statistics(model, x)`: per hidden layer (by path, as in
  `hlkeras.lora`: `"block_0/ffn_norm"`, `"backbone/dense"`), the output's
  mean, std, percentiles, a 32-bin histogram, the dead and saturated
  fractions, the MoE expert load and router entropy, the attention entropy
  per head.
- `gradient_statistics(model, x, y)`: per layer with weights, the gradient
  norm and its ratio to the weight norm.
- `HiddenLayerMonitor(probe_data)`: both at epoch end on a fixed probe batch
  (the training step is untouched), the update-to-weight ratio between
  epochs, `monitor.history`, TensorBoard summaries, and one-line warnings.
"""

import contextlib
import functools
import math
import warnings

import keras
import numpy as np
from keras import ops

from hlkeras import _compat
from hlkeras._validation import HlkerasWarning
from hlkeras.layers import DropPath
from hlkeras.layers import MixtureOfExperts

HISTOGRAM_BINS = 32
SATURATION_MARGIN = 1e-3
# Activations whose outputs cannot go below 0: a unit that is <= 0 on every
# sample is dead. Elsewhere a unit is dead when it is exactly 0 everywhere.
ZERO_FLOOR_ACTIVATIONS = frozenset({"relu", "relu6"})
SATURATING_BOUNDS = {"sigmoid": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}

# The warnings' thresholds.
DEAD_WARNING = 0.5  # fraction of a layer's units
SATURATED_WARNING = 0.5  # fraction of a layer's outputs
VANISHING_WARNING = 1e-3  # first layer's gradient norm / the last layer's
EXPLODING_WARNING = 10.0  # a layer's gradient norm / its weight norm
COLLAPSED_ROUTER_WARNING = 0.9  # one expert's share of the assignments
GROWTH_WARNING = 100.0  # last hidden layer's output std / the first one's


@functools.cache
def _hidden_classes():
    names = (
        "Dense EinsumDense Conv1D Conv2D Conv3D Conv1DTranspose Conv2DTranspose "
        "Conv3DTranspose DepthwiseConv1D DepthwiseConv2D SeparableConv1D SeparableConv2D "
        "Activation ReLU LeakyReLU ELU PReLU Softmax BatchNormalization "
        "LayerNormalization GroupNormalization UnitNormalization RMSNormalization"
    ).split()
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


def _is_hidden(layer):
    if isinstance(layer, DropPath):  # the identity outside training
        return False
    return isinstance(layer, _hidden_classes()) or type(layer).__module__.startswith("hlkeras.")


def _all_layers(layer, prefix=""):
    """`(path, layer)` of every layer below `layer`, depth-first: nested
    models and the sublayers of composite layers alike."""
    for sublayer in _compat.sublayers(layer, recursive=False):
        path = prefix + sublayer.name
        yield path, sublayer
        yield from _all_layers(sublayer, path + "/")


def hidden_layers(model):
    """`(path, layer)` of `model`'s hidden layers in model order: hlkeras
    layers, Keras `Dense`/`EinsumDense`/`Conv*`/activation/normalization
    layers, at any depth (nested models and composite layers are entered)."""
    return [(path, layer) for path, layer in _all_layers(model) if _is_hidden(layer)]


def _activation_name(layer):
    """The activation applied to a Keras built-in layer's output, or None
    (an hlkeras block's `activation` is inside it, not on its output)."""
    if isinstance(layer, keras.layers.ReLU):
        return "relu"
    if type(layer).__module__.startswith("hlkeras."):
        return None
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", activation)
    return name if isinstance(name, str) and name != "linear" else None


def _first_tensor(output):
    while isinstance(output, (list, tuple)):
        output = output[0]
    return output


def _recorder(layer, call, records):
    """`call`, recording each output (and attention scores) into `records`."""
    attention = isinstance(layer, keras.layers.MultiHeadAttention)

    @functools.wraps(call)
    def recording_call(*args, **kwargs):
        if not attention:
            output = call(*args, **kwargs)
            records.append((ops.convert_to_numpy(_first_tensor(output)), None))
            return output
        wanted = kwargs.pop("return_attention_scores", False)
        output, scores = call(*args, return_attention_scores=True, **kwargs)
        records.append((ops.convert_to_numpy(output), ops.convert_to_numpy(scores)))
        return (output, scores) if wanted else output

    return recording_call


@contextlib.contextmanager
def _recording(layers):
    """`{id(layer): [(output, scores), ...]}` filled by every call inside.

    Keras 3 has no forward hooks, so each layer's `call` is shadowed, on the
    instance only, by a recording one for the duration of an eager forward
    pass, and removed after. Traced training steps are not affected.
    """
    unique = list({id(layer): layer for _, layer in layers}.values())
    records = {id(layer): [] for layer in unique}
    for layer in unique:
        # object.__setattr__: past Keras' and torch's attribute tracking.
        object.__setattr__(layer, "call", _recorder(layer, layer.call, records[id(layer)]))
    try:
        yield records
    finally:
        for layer in unique:
            object.__delattr__(layer, "call")


def _units_matrix(values):
    """`values` as `(positions, units)`: units on the last axis."""
    return values.reshape(-1, values.shape[-1]) if values.ndim >= 2 else values.reshape(-1, 1)


def output_statistics(values, activation=None):
    """The statistics of one layer's output `values` (NumPy), the output of
    `activation` (a name, or None).

    Returns:
        A dict: `mean`, `std`, `p01`, `p50`, `p99`, `abs_max` and
        `histogram` (`counts`, `edges`: 32 bins) over the finite values;
        `non_finite_fraction`; `dead_fraction`, the fraction of units (last
        axis) that are <= 0 (relu, relu6) or exactly 0 on every sample and
        position; `saturated_fraction`, the fraction of sigmoid/tanh outputs
        within 1e-3 of their bounds (None for other activations).
    """
    values = np.asarray(values, "float64")
    flat = values.ravel()
    finite = flat[np.isfinite(flat)]
    if finite.size:
        p01, p50, p99 = np.percentile(finite, [1, 50, 99])
        counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
        summary = dict(
            mean=float(finite.mean()),
            std=float(finite.std()),
            p01=float(p01),
            p50=float(p50),
            p99=float(p99),
            abs_max=float(np.abs(finite).max()),
            histogram={"counts": counts.tolist(), "edges": edges.tolist()},
        )
    else:
        summary = dict.fromkeys(("mean", "std", "p01", "p50", "p99", "abs_max", "histogram"))
    units = _units_matrix(values)
    off = units <= 0 if activation in ZERO_FLOOR_ACTIVATIONS else units == 0
    summary["non_finite_fraction"] = float(1.0 - finite.size / max(flat.size, 1))
    summary["dead_fraction"] = float(np.mean(np.all(off, axis=0)))
    summary["saturated_fraction"] = None
    if activation in SATURATING_BOUNDS:
        low, high = SATURATING_BOUNDS[activation]
        near = (values <= low + SATURATION_MARGIN) | (values >= high - SATURATION_MARGIN)
        summary["saturated_fraction"] = float(np.mean(near))
    return summary


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _entropy(probs):
    """Entropy (nats) over the last axis; 0 log 0 is 0."""
    return -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), -1)


def routing_statistics(router_logits, num_experts, top_k):
    """`expert_load` (each expert's share of the top-k assignments, summing
    to 1), `max_expert_load` and `router_entropy` (the mean entropy of the
    router's softmax, in nats) from router logits `(tokens, experts)`."""
    logits = np.asarray(router_logits, "float64").reshape(-1, num_experts)
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    load = np.bincount(chosen.ravel(), minlength=num_experts) / max(chosen.size, 1)
    return dict(
        expert_load=load.tolist(),
        max_expert_load=float(load.max()),
        router_entropy=float(_entropy(_softmax(logits)).mean()),
    )


def attention_entropy(scores):
    """The mean entropy (nats) of each head's attention distribution, from
    scores `(batch, heads, queries, keys)`: one value per head."""
    scores = np.asarray(scores, "float64")
    return _entropy(scores).mean(axis=(0, 2)).tolist()


def _concatenated(arrays):
    """One layer's outputs over all its calls, as `(positions, units)`."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate([_units_matrix(np.asarray(a)) for a in arrays])


def _is_float_output(values):
    # By name: ml_dtypes' bfloat16 (a mixed_bfloat16 model's outputs) is not
    # an np.floating subtype.
    return "float" in str(np.asarray(values).dtype)


def layer_statistics(model, x):
    """The statistics of every hidden layer's output on the batch `x`.

    One eager forward pass (`training=False`) records every hidden layer's
    output at any depth; nothing in the model changes.

    Args:
        model: A built `keras.Model`.
        x: A batch of the model's inputs (NumPy or tensors).

    Returns:
        `{path: statistics}` in model order, for every hidden layer that was
        called with a floating-point output (see `hidden_layers` and
        `output_statistics`). A `MixtureOfExperts` also has `expert_load`,
        `max_expert_load` and `router_entropy` (`routing_statistics` of its
        router's logits); a `MultiHeadAttention` has `attention_entropy`, one
        value per head.
    """
    layers = hidden_layers(model)
    batch_size = int(keras.tree.flatten(x)[0].shape[0])
    with _recording(layers) as records:
        model(x, training=False)
    statistics = {}
    for path, layer in layers:
        calls = records[id(layer)]
        if not calls or not _is_float_output(calls[0][0]):
            continue
        activation = _activation_name(layer)
        stats = output_statistics(_concatenated([o for o, _ in calls]), activation)
        stats.update(
            {
                "class": type(layer).__name__,
                "activation": activation,
                "shape": list(calls[0][0].shape[1:]),
                "flops": _own_flops(layer, calls, records, batch_size),
            }
        )
        if isinstance(layer, MixtureOfExperts):
            logits = _concatenated([o for o, _ in records.get(id(layer.router), [])])
            stats.update(routing_statistics(logits, layer.num_experts, layer.top_k))
        if calls[0][1] is not None:
            entropies = np.mean([attention_entropy(scores) for _, scores in calls], axis=0)
            stats["attention_entropy"] = entropies.tolist()
        statistics[path] = stats
    return statistics


def _contraction(layer):
    """How many inputs each output of a kernel layer sums over, or None."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None or not hasattr(kernel, "shape"):
        return None
    shape = tuple(kernel.shape)
    if isinstance(layer, keras.layers.EinsumDense):
        inputs, output = layer.equation.split("->")
        kernel_axes = inputs.split(",")[1]
        return math.prod(d for axis, d in zip(kernel_axes, shape) if axis not in output)
    if type(layer).__name__.startswith("Depthwise"):
        return math.prod(shape[:-2])
    if isinstance(
        layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    ):
        return math.prod(shape[:-1])
    return None


def _attention_flops(layer, scores, records):
    """An attention core's scores and weighted values, and the query, key
    and value projections it computed itself (a fused self-attention
    matmul, not their own `call`s): each is its tokens times its kernel."""
    config = layer.get_config()
    value_dim = config.get("value_dim") or config["key_dim"]
    _, _, queries, keys = scores.shape
    flops = 2 * math.prod(scores.shape[1:]) * (config["key_dim"] + value_dim)
    tokens = {"query": queries, "key": keys, "value": keys}
    for sublayer in _compat.sublayers(layer, recursive=False):
        if sublayer.name in tokens and not records.get(id(sublayer)):
            flops += 2 * tokens[sublayer.name] * math.prod(sublayer.kernel.shape)
    return flops


def _own_flops(layer, calls, records, batch_size):
    """Multiply-adds x 2 per sample of the layer's own matmuls and
    convolutions (its sublayers' are theirs; norms and activations are not
    counted): a kernel layer's outputs times their contraction, an
    attention core's scores and weighted sums, an MoE's chosen experts."""
    output, scores = calls[0]
    # Per example of the batch, not per row: an MoE router sees the tokens.
    per_sample = output.size // batch_size
    contraction = _contraction(layer)
    if contraction:
        return 2 * contraction * per_sample
    if scores is not None:  # (batch, heads, queries, keys)
        return _attention_flops(layer, scores, records)
    if isinstance(layer, MixtureOfExperts):
        hidden, out = (
            tuple(layer.expert_hidden_kernel.shape),
            tuple(layer.expert_output_kernel.shape),
        )
        tokens = per_sample // out[-1]
        return 2 * tokens * layer.top_k * (hidden[1] * hidden[2] + out[1] * out[2])
    return 0


def own_parameters(model):
    """`{path: count}` of the weights each layer holds itself (its
    sublayers' are theirs), for the layers that hold any."""
    sizes = [math.prod(variable.shape) for variable in model.weights]
    return {path: sum(counts) for path, counts in _by_layer(model, model.weights, sizes).items()}


def layer_table(model, statistics, gradients):
    """One row per hidden layer of `statistics` (`layer_statistics`):
    `path`, `class`, `shape` (per sample), `params` and `flops` (per sample,
    with its sublayers'), `mean`, `std`, `dead_fraction`,
    `saturated_fraction`, and `gradient_norm` (of its own and its
    sublayers' weights, from `gradient_statistics`): what `hlkeras inspect`
    prints."""
    params = own_parameters(model)

    def below(path, values):  # the layer and its sublayers
        return [v for p, v in values.items() if p == path or p.startswith(path + "/")]

    rows = []
    for path, stats in statistics.items():
        grad_squares = [g["gradient_norm"] ** 2 for g in below(path, gradients)]
        rows.append(
            dict(
                path=path,
                **{k: stats[k] for k in ("class", "shape", "mean", "std", "dead_fraction")},
                saturated_fraction=stats["saturated_fraction"],
                params=sum(below(path, params)),
                flops=sum(s["flops"] for s in below(path, statistics)),
                gradient_norm=math.sqrt(sum(grad_squares)) if grad_squares else None,
            )
        )
    return rows


def _loss_function(model, loss):
    loss = loss or getattr(model, "loss", None) or "sparse_categorical_crossentropy"
    if not (isinstance(loss, str) or callable(loss)):
        raise ValueError(
            "Argument `loss` must be a Keras loss name, a loss object or a function "
            f"(one model output). Received: loss={loss!r}"
        )
    return keras.losses.get(loss)


def _gradients(model, x, y, loss_fn):
    """The gradient of the batch mean of `loss_fn(y, model(x))` for each
    trainable variable, as NumPy. Keras 3 has no backend-neutral gradient function: each
    backend's own autodiff is called, as Keras' trainers do."""
    variables = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.mean(loss_fn(y, model(x, training=False)))
        grads = tape.gradient(loss, variables)
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return ops.mean(loss_fn(y, outputs))

        grads = jax.grad(loss_of)([v.value for v in variables])
    elif backend == "torch":
        import torch

        outputs = model(ops.convert_to_tensor(x), training=False)
        loss = ops.mean(loss_fn(ops.convert_to_tensor(y), outputs))
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    else:
        raise ValueError(
            f"gradient_statistics needs the TensorFlow, JAX or torch backend, not {backend}"
        )
    return [
        np.zeros(v.shape) if g is None else np.asarray(ops.convert_to_numpy(g), "float64")
        for v, g in zip(variables, grads)
    ]


def _by_layer(model, variables, values):
    """`{path: [value, ...]}`: `values` (one per variable of `variables`)
    grouped by the deepest layer holding each variable, in model order."""
    owners = {}
    for path, layer in _all_layers(model):
        for variable in layer.weights:
            owners[id(variable)] = path
    grouped = {}
    for variable, value in zip(variables, values):
        grouped.setdefault(owners.get(id(variable), variable.path), []).append(value)
    return grouped


def _norm(arrays):
    return math.sqrt(sum(float(np.sum(np.square(a))) for a in arrays))


def gradient_statistics(model, x, y, *, loss=None):
    """The gradient norm of each layer's weights on the batch `(x, y)`.

    The loss is `loss`, else the compiled model's loss, else sparse
    categorical cross-entropy on the model's output (auxiliary losses such
    as an MoE's load balance are left out), computed with `training=False`
    so the probe is deterministic.

    Returns:
        `{path: {"gradient_norm", "weight_norm", "ratio"}}` for every layer
        holding trainable weights, in model order; `ratio` is the gradient
        norm over the weight norm (inf for all-zero weights).
    """
    variables = model.trainable_variables
    grads = _by_layer(model, variables, _gradients(model, x, y, _loss_function(model, loss)))
    weights = _weights_by_path(model)
    statistics = {}
    for path, grad_list in grads.items():
        grad_norm, weight_norm = _norm(grad_list), _norm(weights[path])
        ratio = grad_norm / weight_norm if weight_norm else math.inf
        statistics[path] = dict(gradient_norm=grad_norm, weight_norm=weight_norm, ratio=ratio)
    return statistics


def _weights_by_path(model):
    """`{path: [array, ...]}` of each layer's own trainable weights (float64)."""
    variables = model.trainable_variables
    values = [np.array(ops.convert_to_numpy(v), "float64") for v in variables]
    return _by_layer(model, variables, values)


def update_ratios(before, after):
    """`{path: ||after - before|| / ||before||}` over each layer's weights."""
    ratios = {}
    for path, old in before.items():
        new = after.get(path)
        if new is None:
            continue
        old_norm = _norm(old)
        change = _norm([n - o for n, o in zip(new, old)])
        ratios[path] = change / old_norm if old_norm else math.inf
    return ratios


def _percent(fraction):
    return f"{100 * fraction:.0f}%"


def _since(epoch):
    return "on the probe" if epoch is None else f"since epoch {epoch}"


def _at(epoch):
    return "on the probe" if epoch is None else f"at epoch {epoch}"


def _unit_warnings(layers, epoch):
    for path, stats in layers.items():
        activation = stats.get("activation") or stats["class"]
        if stats["dead_fraction"] >= DEAD_WARNING:
            yield (
                (path, "dead"),
                (
                    f"{path}: {_percent(stats['dead_fraction'])} dead units ({activation}) "
                    f"{_since(epoch)}: try gelu/leaky_relu or a lower --lr"
                ),
            )
        if (stats["saturated_fraction"] or 0.0) >= SATURATED_WARNING:
            yield (
                (path, "saturated"),
                (
                    f"{path}: {_percent(stats['saturated_fraction'])} saturated outputs "
                    f"({activation}) {_since(epoch)}: "
                    "try relu/gelu, normalization or a lower --lr"
                ),
            )
        if stats.get("max_expert_load", 0.0) > COLLAPSED_ROUTER_WARNING:
            expert = int(np.argmax(stats["expert_load"]))
            yield (
                (path, "router"),
                (
                    f"{path}: expert {expert} takes {_percent(stats['max_expert_load'])} of the "
                    f"tokens {_since(epoch)}: the router collapsed: try a higher "
                    "load_balance_weight or router_jitter"
                ),
            )


def _growth_warning(layers, epoch):
    """Top-level hidden layers' output std, first against last (the head
    excluded): a network whose activations grow with depth."""
    top = [(p, s) for p, s in layers.items() if "/" not in p and s["std"] is not None][:-1]
    if len(top) < 2 or not top[0][1]["std"]:
        return
    (first, first_stats), (last, last_stats) = top[0], top[-1]
    if last_stats["std"] > GROWTH_WARNING * first_stats["std"]:
        yield (
            ("depth", "growth"),
            (
                f"activations grow with depth: std {first_stats['std']:.3g} at {first} to "
                f"{last_stats['std']:.3g} at {last} {_at(epoch)}: try normalization "
                "(LayerNormalization/BatchNormalization) or a smaller initializer"
            ),
        )


def _gradient_warnings(gradients, epoch):
    for path, stats in gradients.items():
        if not math.isfinite(stats["gradient_norm"]) or stats["ratio"] > EXPLODING_WARNING:
            yield (
                (path, "exploding"),
                (
                    f"gradient norm of {path} is {stats['gradient_norm']:.3g}, "
                    f"{stats['ratio']:.3g}x its weights' {_at(epoch)}: exploding gradients: "
                    "try --clipnorm, a lower --lr or normalization"
                ),
            )
    if len(gradients) < 2:
        return
    (first, first_stats), *_, (last, last_stats) = gradients.items()
    if last_stats["gradient_norm"] and (
        first_stats["gradient_norm"] < VANISHING_WARNING * last_stats["gradient_norm"]
    ):
        ratio = first_stats["gradient_norm"] / last_stats["gradient_norm"]
        yield (
            (first, "vanishing"),
            (
                f"gradient norm of {first} is {ratio:.0e} of {last}'s {_at(epoch)}: "
                "vanishing gradients: try residual connections or normalization"
            ),
        )


def findings(layers, gradients, epoch):
    """`[(key, line)]`: one warning line per layer and condition for the
    statistics of one probe (`layer_statistics`, `gradient_statistics`);
    `epoch` is the 1-based number the progress bar shows, or None for a
    probe outside training ("on the probe")."""
    found = list(_unit_warnings(layers, epoch))
    found += _growth_warning(layers, epoch)
    dead = {path for (path, condition), _ in found if condition == "dead"}
    # Dead units pass no gradient: a zero gradient at or below a dead layer
    # is its consequence, said once, by the dead layer's line.
    found += [
        ((path, condition), line)
        for (path, condition), line in _gradient_warnings(gradients, epoch)
        if not (
            condition == "vanishing"
            and (path in dead or (dead and gradients[path]["gradient_norm"] == 0))
        )
    ]
    return found


def _probe_batch(probe_data):
    if isinstance(probe_data, (tuple, list)) and len(probe_data) == 2:
        return probe_data
    raise ValueError(
        "Argument `probe_data` must be a tuple `(x, y)` of one batch of inputs and "
        f"labels. Received: probe_data={type(probe_data).__name__}"
    )


class HiddenLayerMonitor(keras.callbacks.Callback):
    """Statistics of the hidden layers at epoch end, with warnings.

    Every `every_n_epochs` epochs it computes `layer_statistics` and
    `gradient_statistics` on the fixed probe batch, and each layer's
    update-to-weight ratio since the last probe. The training step itself
    is untouched: the probe is one extra eager forward and backward pass,
    and training curves are the same with and without the monitor.

    Args:
        probe_data: `(x, y)`, one batch of inputs and labels (a few hundred
            examples is plenty).
        every_n_epochs: Probe after every n-th epoch.
        log_dir: If set, TensorBoard scalars (mean, std, dead fraction,
            gradient norm, update ratio) and output histograms per layer
            are written there.
        loss: The loss for the gradients (default: the model's).

    Attributes:
        history: One dict per probe: `epoch` (0-based, as Keras' logs),
            `layers`, `gradients` and `updates` (`{path: ratio}`).
        warnings: One line per layer and condition, the first time it is
            seen (dead or saturated units, a collapsed MoE router,
            activations growing with depth, vanishing or exploding
            gradients), naming the layer, the number, the epoch and what to
            try. Each is also raised as an `hlkeras.HlkerasWarning`.
    """

    def __init__(self, probe_data, *, every_n_epochs=1, log_dir=None, loss=None):
        super().__init__()
        self.x, self.y = _probe_batch(probe_data)
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(
                "Argument `every_n_epochs` must be a positive integer. "
                f"Received: every_n_epochs={every_n_epochs!r}"
            )
        self.every_n_epochs = every_n_epochs
        self.log_dir = log_dir
        self.loss = loss
        self.history = []
        self.warnings = []
        self._warned = set()
        self._weights = None
        self._writer = None

    def on_train_begin(self, logs=None):
        self._weights = _weights_by_path(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        model = self.model  # on JAX, reading it syncs the trained state
        layers = layer_statistics(model, self.x)
        gradients = gradient_statistics(model, self.x, self.y, loss=self.loss)
        weights = _weights_by_path(model)
        updates = update_ratios(self._weights, weights)
        self._weights = weights
        entry = dict(epoch=epoch, layers=layers, gradients=gradients, updates=updates)
        self.history.append(entry)
        for key, line in findings(layers, gradients, epoch + 1):
            if key not in self._warned:
                self._warned.add(key)
                self.warnings.append(line)
                warnings.warn(line, HlkerasWarning, stacklevel=2)
        if self.log_dir:
            self._write_summaries(entry)

    def _write_summaries(self, entry):
        import tensorflow as tf  # TensorBoard's writer, as keras.callbacks.TensorBoard

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        step = entry["epoch"]
        with self._writer.as_default():
            for path, stats in entry["layers"].items():
                for name in ("mean", "std", "dead_fraction"):
                    if stats[name] is not None:
                        tf.summary.scalar(f"activations/{path}/{name}", stats[name], step=step)
                if stats["histogram"] is not None:
                    tf.summary.histogram(
                        f"activations/{path}", _histogram_sample(stats["histogram"]), step=step
                    )
            for path, stats in entry["gradients"].items():
                tf.summary.scalar(f"gradients/{path}/norm", stats["gradient_norm"], step=step)
            for path, ratio in entry["updates"].items():
                tf.summary.scalar(f"updates/{path}/ratio", ratio, step=step)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def report(self):
        """The history by layer, as `diagnostics.json` holds it: `epochs`
        (0-based), `warnings`, and `layers`: `{path: {"class", "epochs":
        [one dict per probe: the output statistics, gradient_norm,
        gradient_ratio, update_ratio]}}`."""
        return diagnostics_report(self.history, self.warnings)


def diagnostics_report(history, warning_lines=()):
    """`HiddenLayerMonitor.report` of probes `history` (a list of
    `{"epoch", "layers", "gradients", "updates"}`)."""
    layers = {}
    for entry in history:
        for path, stats in entry["layers"].items():
            gradient = entry["gradients"].get(path, {})
            layer = layers.setdefault(path, {"class": stats["class"], "epochs": []})
            layer["epochs"].append(
                {
                    "epoch": entry["epoch"],
                    **{k: v for k, v in stats.items() if k != "class"},
                    "gradient_norm": gradient.get("gradient_norm"),
                    "gradient_ratio": gradient.get("ratio"),
                    "update_ratio": entry["updates"].get(path),
                }
            )
    return {
        "epochs": [entry["epoch"] for entry in history],
        "warnings": list(warning_lines),
        "layers": layers,
    }


def plot_hidden_layers(report, path):
    """Writes `report`'s (`diagnostics_report`) picture as a PNG: per layer
    (rows, model order) and per probe (colour, first to last), the output's
    1st-99th percentile range and median, the gradient norm (log scale) and
    the dead-unit fraction."""
    # The object-oriented Agg API leaves pyplot's global backend alone.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hlkeras import _files

    paths = list(report["layers"])
    figure = Figure(figsize=(15, 1.5 + 0.32 * len(paths)), layout="constrained")
    FigureCanvasAgg(figure)
    spread, gradients, dead = figure.subplots(1, 3, sharey=True)
    colours = colormaps["viridis"]
    num_probes = max(len(report["epochs"]), 1)
    for row, layer_path in enumerate(paths):
        for probe in report["layers"][layer_path]["epochs"]:
            colour = colours(report["epochs"].index(probe["epoch"]) / max(num_probes - 1, 1))
            y = row + 0.25 * (report["epochs"].index(probe["epoch"]) / num_probes - 0.5)
            if probe["p01"] is not None:
                spread.plot([probe["p01"], probe["p99"]], [y, y], color=colour, linewidth=2)
                spread.plot([probe["p50"]], [y], "o", color=colour, markersize=3)
            if probe["gradient_norm"]:
                gradients.plot([probe["gradient_norm"]], [y], "o", color=colour, markersize=4)
            dead.plot([probe["dead_fraction"]], [y], "o", color=colour, markersize=4)
    spread.set_yticks(range(len(paths)), [f"{p} ({report['layers'][p]['class']})" for p in paths])
    spread.invert_yaxis()
    spread.set_xscale("symlog", linthresh=1e-2)
    spread.set_title("outputs: 1st-99th percentile, median")
    gradients.set_xscale("log")
    gradients.set_title("gradient norm of the layer's weights")
    dead.set_xlim(-0.05, 1.05)
    dead.set_title("dead-unit fraction")
    epochs = ", ".join(str(e + 1) for e in report["epochs"])
    figure.suptitle(f"hidden layers after epochs {epochs} (dark: first, yellow: last)")
    for axes in (spread, gradients, dead):
        axes.grid(alpha=0.3)
    _files.save_figure_atomic(figure, path)


def _histogram_sample(histogram):
    """Values distributed as `histogram` (each bin's centre, count times):
    TensorBoard's histogram summary takes values, and the monitor keeps
    only the 32 bins of each layer's output, not the output itself."""
    edges = np.asarray(histogram["edges"])
    return np.repeat((edges[:-1] + edges[1:]) / 2, histogram["counts"])
