"""The Keras weight arguments (initializers, regularizers, constraints) on
every hlkeras layer that owns weights, and `model.quantize("int8")` on a
model that holds them all.

Oracles: a regularizer's loss is the formula over the layer's own kernels
or biases; a zero initializer gives the output the layer's formula gives
for zero weights; a constraint holds after an optimizer step; the
quantized model stays close to the float one."""

import keras
import numpy as np
import pytest
from layer_testing import heavy

from hlkeras import layers

RNG = np.random.default_rng(0)
SEQUENCE = RNG.normal(size=(3, 5, 16)).astype("float32")
VECTORS = RNG.normal(size=(3, 16)).astype("float32")
IMAGES = RNG.normal(size=(3, 6, 6, 16)).astype("float32")

# (name, make(**weight_arguments), inputs, output for all-zero kernels)
LAYERS = [
    ("residual", lambda **kw: layers.ResidualBlock(16, **kw), VECTORS, lambda x: x),
    (
        "conv_residual",
        # Zero kernels: BN(0) = 0, so the block is act(identity shortcut).
        lambda **kw: layers.ConvResidualBlock(16, **kw),
        IMAGES,
        lambda x: np.maximum(x, 0.0),
    ),
    ("feed_forward", lambda **kw: layers.FeedForward(24, **kw), SEQUENCE, np.zeros_like),
    ("transformer", lambda **kw: layers.TransformerBlock(4, 24, **kw), SEQUENCE, lambda x: x),
    (
        "transformer_moe",
        lambda **kw: layers.TransformerBlock(4, 24, num_experts=4, **kw),
        SEQUENCE,
        lambda x: x,
    ),
    ("moe", lambda **kw: layers.MixtureOfExperts(4, 24, **kw), SEQUENCE, np.zeros_like),
    ("lora_dense", lambda **kw: layers.LoRADense(8, rank=2, **kw), VECTORS, None),
    (
        "attention",
        lambda **kw: layers.MultiHeadAttention(4, 4, num_kv_heads=2, **kw),
        SEQUENCE,
        np.zeros_like,
    ),
    (
        "attention_pooling",
        lambda **kw: layers.AttentionPooling(8, **kw),
        SEQUENCE,
        # Zero scores: uniform weights, the mean over positions.
        lambda x: x.mean(axis=1),
    ),
]
LAYER_IDS = [name for name, *_ in LAYERS]


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def call(layer, inputs):
    if isinstance(layer, layers.MultiHeadAttention):
        return layer(inputs, inputs)
    return layer(inputs)


def build(layer, inputs):
    if isinstance(layer, layers.MultiHeadAttention):
        layer.build(inputs.shape, inputs.shape)
    else:
        layer.build(inputs.shape)


def weights_named(layer, kind):
    """The layer's own kernels (LoRA adapters and AttentionPooling's learned
    query vector included) or biases; the MoE router has its own arguments
    (`router_*`)."""
    names = {"kernel": ("kernel", "kernel_a", "kernel_b", "query"), "bias": ("bias",)}[kind]
    return [w for w in layer.weights if w.name.endswith(names) and "router" not in w.path]


@pytest.mark.parametrize("name, make, inputs, _", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("kind", ["kernel", "bias"])
def test_l2_regularizer_adds_its_formula_to_losses(name, make, inputs, _, kind):
    if name == "conv_residual" and kind == "bias":
        pytest.skip("its convolutions have no bias (BatchNormalization follows each)")
    layer = make(**{f"{kind}_regularizer": keras.regularizers.L2(0.1)})
    build(layer, inputs)  # built, not called: `losses` holds the regularizers alone
    assert weights_named(layer, kind), f"{name} has no {kind}"
    for w in weights_named(layer, kind):  # non-zero biases too, so the term cannot vanish
        w.assign(RNG.normal(size=w.shape).astype("float32"))
    # Keras regularizes trainable weights only (LoRADense's base is frozen).
    regularized = [w for w in weights_named(layer, kind) if w.trainable]
    expected = 0.1 * sum(float(np.sum(to_numpy(w).astype("float64") ** 2)) for w in regularized)
    regularization = sum(float(to_numpy(loss)) for loss in layer.losses)
    np.testing.assert_allclose(regularization, expected, rtol=1e-5)


@pytest.mark.parametrize("name, make, inputs, zero_output", LAYERS, ids=LAYER_IDS)
def test_zero_kernel_initializer_gives_the_zero_weight_output(name, make, inputs, zero_output):
    if zero_output is None:
        pytest.skip("LoRADense's base is copied in; its zero output is covered by the test above")
    layer = make(kernel_initializer="zeros")
    build(layer, inputs)
    assert all(not np.any(to_numpy(w)) for w in weights_named(layer, "kernel"))
    np.testing.assert_allclose(
        to_numpy(call(layer, inputs)), zero_output(inputs), rtol=1e-5, atol=1e-5
    )


@heavy  # compiling the step of every layer at once: 9-10.6 CPU seconds on JAX
def test_kernel_constraint_holds_after_an_optimizer_step():
    # One model with every layer on its own branch: one compiled step (CI
    # time). LoRADense is left out: its kernel is frozen, never updated.
    inputs = {"sequence": SEQUENCE, "vectors": VECTORS, "images": IMAGES}
    model_inputs = {key: keras.Input(value.shape[1:], name=key) for key, value in inputs.items()}
    branches, constrained = [], {}
    for name, make, data, _ in LAYERS:
        if name == "lora_dense":
            continue
        layer = make(kernel_constraint="non_neg")
        key = next(k for k, v in inputs.items() if v is data)
        branches.append(keras.layers.Flatten()(call(layer, model_inputs[key])))
        constrained[name] = weights_named(layer, "kernel")
    model = keras.Model(model_inputs, keras.layers.Concatenate()(branches))
    # Keras applies a constraint after each update, not at initialization.
    assert all(any(np.any(to_numpy(w) < 0) for w in ws) for ws in constrained.values())
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    target = RNG.normal(size=(len(SEQUENCE),) + model.output_shape[1:]).astype("float32")
    model.train_on_batch(inputs, target)
    for name, weights in constrained.items():
        for w in weights:
            assert np.all(to_numpy(w) >= 0), f"{name}: {w.path}"


def test_router_has_its_own_arguments():
    moe = layers.MixtureOfExperts(
        4, 24, kernel_regularizer="l2", router_initializer="zeros", router_regularizer="l1"
    )
    moe(SEQUENCE)
    assert not np.any(to_numpy(moe.router.kernel))
    assert isinstance(moe.router.kernel_regularizer, keras.regularizers.L1)
    config = moe.get_config()
    assert config["router_regularizer"]["class_name"] == "L1"
    assert config["kernel_regularizer"]["class_name"] == "L2"


def test_position_embedding_takes_embeddings_arguments():
    embedding = layers.PositionEmbedding(
        8, embeddings_initializer="ones", embeddings_regularizer=keras.regularizers.L2(0.5)
    )
    np.testing.assert_allclose(to_numpy(embedding(SEQUENCE)), SEQUENCE + 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sum(embedding.losses)), 0.5 * 8 * 16, rtol=1e-6)


@pytest.mark.parametrize("name, make, inputs, _", LAYERS, ids=LAYER_IDS)
def test_weight_arguments_round_trip_through_the_config(name, make, inputs, _):
    layer = make(
        kernel_initializer=keras.initializers.Orthogonal(seed=1),
        bias_regularizer="l2",
        kernel_constraint=keras.constraints.MaxNorm(2.0),
    )
    config = layer.get_config()
    restored = type(layer).from_config(config)
    assert restored.get_config() == config
    assert config["kernel_initializer"]["class_name"] == "Orthogonal"
    assert config["kernel_constraint"]["config"]["max_value"] == 2.0


@pytest.mark.parametrize("name, make, inputs, _", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize(
    "argument, value",
    [
        ("kernel_initializer", "glorot_nope"),
        ("bias_regularizer", "l3"),
        ("kernel_constraint", 7),
        ("activity_regularizer", "nope"),
    ],
)
def test_unknown_weight_argument_fails_at_construction(name, make, inputs, _, argument, value):
    with pytest.raises(ValueError, match=rf"`{argument}`.*Received: {argument}={value!r}"):
        make(**{argument: value})


def test_defaults_are_unchanged():
    # No weight argument: every option None in the config, the layers' own
    # initializers (He after relu, per-expert scaling) still in place.
    block = layers.ResidualBlock(16)
    assert all(
        block.get_config()[f"{kind}_{part}"] is None
        for kind in ("kernel", "bias")
        for part in ("initializer", "regularizer", "constraint")
    )
    block(VECTORS)
    assert isinstance(block.hidden_dense.kernel_initializer, keras.initializers.HeNormal)
    assert isinstance(block.output_dense.kernel_initializer, keras.initializers.GlorotUniform)


# --- model.quantize("int8") ---------------------------------------------------------------


def every_layer_model():
    """Every hlkeras layer, each on its own branch from the inputs (stacked,
    untrained layers would compound the rounding of each into the next)."""
    tokens, images = keras.Input((5, 16)), keras.Input((6, 6, 16))
    sequence_layers = [
        layers.TransformerBlock(4, 32, num_kv_heads=2),
        layers.TransformerBlock(4, 32, num_experts=4),
        layers.PositionEmbedding(8),
        layers.ResidualBlock(16),
        layers.FeedForward(24),
        layers.MixtureOfExperts(4, 16),
        layers.LoRADense(16, rank=2),
    ]
    pool = keras.layers.GlobalAveragePooling1D
    branches = [pool()(layer(tokens)) for layer in sequence_layers]
    branches.append(pool()(layers.MultiHeadAttention(2, 8)(tokens, tokens)))
    branches.append(layers.AttentionPooling()(tokens))
    branches.append(keras.layers.GlobalAveragePooling2D()(layers.ConvResidualBlock(16)(images)))
    return keras.Model([tokens, images], keras.layers.Concatenate()(branches))


@heavy
@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_int8_quantize_of_every_layer_stays_close_to_float():
    keras.utils.set_random_seed(0)
    model = every_layer_model()
    data = [SEQUENCE, IMAGES]
    expected = to_numpy(model(data))
    model.quantize("int8")
    projections = [
        layer
        for layer in model._flatten_layers()
        if type(layer) in (keras.layers.Dense, keras.layers.EinsumDense)
    ]
    # Every Dense / EinsumDense projection of every hlkeras layer is int8;
    # Conv2D, LoRADense and the MoE expert kernels (raw weights) stay float,
    # as does the MoE router (FloatRouter, on purpose).
    assert len(projections) == 18
    assert all(layer.quantization_mode == "int8" for layer in projections)
    quantized = to_numpy(model(data))
    # Stated tolerance: 3% of the output's scale. Keras' int8 rounds weights
    # per channel and activations per token; the largest error measured
    # 0.45-1.0% over seeds 0-3 on the three backends.
    assert np.abs(quantized - expected).max() <= 0.03 * np.abs(expected).max()
