"""hlkeras.models: builders against hand-written Keras built-in networks,
`build(spec)` and its errors, and `.keras` round trips."""

import json
import os

import keras
import numpy as np
import pytest
from layer_testing import heavy

import hlkeras
from hlkeras import models


def _images(batch=4, shape=(8, 8, 1)):
    return np.random.default_rng(0).random((batch,) + shape).astype("float32")


def _hand_written_mlp(input_shape, num_classes, depth, width, hidden_ratio):
    """The same network as `models.mlp` (inference), from keras.layers built-ins."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(width)(x)
    for _ in range(depth):
        branch = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        branch = keras.layers.Dense(hidden_ratio * width, activation="gelu")(branch)
        branch = keras.layers.Dense(width)(branch)
        x = keras.layers.Add()([x, branch])
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _block_weights(block):
    return (
        block.branch_norm.get_weights()
        + block.hidden_dense.get_weights()
        + block.output_dense.get_weights()
    )


def test_mlp_matches_hand_written_network_with_copied_weights():
    model = models.mlp((8, 8, 1), 10, depth=2, width=16, hidden_ratio=2, dropout=0.1)
    reference = _hand_written_mlp((8, 8, 1), 10, depth=2, width=16, hidden_ratio=2)
    weights = model.get_layer("stem").get_weights()
    for i in range(2):
        weights += _block_weights(model.get_layer(f"block_{i}"))
    weights += model.get_layer("head_norm").get_weights() + model.get_layer("head").get_weights()
    reference.set_weights(weights)
    x = _images()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x, training=False)),
        keras.ops.convert_to_numpy(reference(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_mlp_is_functional_and_made_of_residual_blocks():
    model = models.mlp((8, 8, 1), 10, depth=3, width=16)
    assert type(model).__name__ == "Functional"
    blocks = [layer for layer in model.layers if isinstance(layer, hlkeras.layers.ResidualBlock)]
    assert len(blocks) == 3
    probabilities = keras.ops.convert_to_numpy(model(_images(), training=False))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


# The stage layout is backend-independent, and building conv blocks eagerly is
# slow on JAX; the .keras round trip below builds a resnet on every backend.
@pytest.mark.backends("tensorflow")
def test_resnet_stages_downsample_and_double_width():
    model = models.resnet((8, 8, 3), 5, depth=2, width=4, stages=2)
    blocks = [
        layer for layer in model.layers if isinstance(layer, hlkeras.layers.ConvResidualBlock)
    ]
    assert [b.filters for b in blocks] == [4, 4, 8, 8]
    assert [b.strides for b in blocks] == [1, 1, 2, 1]
    assert model.get_layer("pool").input.shape[1:] == (4, 4, 8)
    assert model.output_shape == (None, 5)


def test_build_equals_calling_the_builder():
    spec = {"arch": "mlp", "input_shape": [8, 8, 1], "num_classes": 10, "depth": 1, "width": 32}
    from_spec = models.build(spec)
    direct = models.mlp((8, 8, 1), 10, depth=1, width=32)
    assert from_spec.to_json() == direct.to_json()


def test_resolve_spec_fills_defaults_and_survives_json():
    spec = {"arch": "resnet", "input_shape": (8, 8, 1), "num_classes": 10, "width": 4}
    resolved = models.resolve_spec(spec)
    assert resolved["depth"] == 2 and resolved["stages"] == 2 and resolved["bottleneck"] is False
    assert resolved["width"] == 4 and resolved["input_shape"] == [8, 8, 1]
    assert json.loads(json.dumps(resolved)) == resolved
    # Building from the recorded (JSON) spec gives the same model (an mlp:
    # building conv models eagerly is slow on JAX).
    spec = {"arch": "mlp", "input_shape": (8, 8, 1), "num_classes": 10, "width": 8}
    recorded = json.loads(json.dumps(models.resolve_spec(spec)))
    assert models.build(recorded).to_json() == models.build(spec).to_json()


@pytest.mark.parametrize(
    "spec, pattern",
    [
        (
            {"arch": "transformerish", "input_shape": [8], "num_classes": 2},
            r"arch.*\['mlp', 'resnet', 'text', 'vit'\].*transformerish",
        ),
        (
            {"arch": "mlp", "input_shape": [8], "num_classes": 2, "layers": 3},
            r"Unknown key 'layers'.*Allowed keys.*depth",
        ),
        ({"arch": "mlp", "num_classes": 2}, r"missing key.*input_shape"),
        ({"arch": "mlp", "input_shape": [8], "num_classes": 2, "depth": -1}, r"`depth`.*depth=-1"),
        ({"arch": "mlp", "input_shape": [8, 0], "num_classes": 2}, r"`input_shape`"),
        (
            {"arch": "resnet", "input_shape": [8], "num_classes": 2},
            r"`input_shape`.*height, width, channels",
        ),
        ({"arch": "mlp", "input_shape": [8], "num_classes": 2, "dropout": 1.5}, r"`dropout`"),
        (
            {
                "arch": "vit",
                "input_shape": [8, 8, 1],
                "num_classes": 2,
                "width": 30,
                "num_heads": 4,
            },
            r"`num_heads`.*num_heads=4, width=30",
        ),
        (
            {"arch": "vit", "input_shape": [8, 8, 1], "num_classes": 2, "patch_size": 3},
            r"`patch_size`.*patch_size=3",
        ),
        (
            {
                "arch": "vit",
                "input_shape": [8, 8, 1],
                "num_classes": 2,
                "num_experts": 2,
                "top_k": 3,
            },
            r"`top_k`.*3",
        ),
    ],
)
def test_bad_specs_raise_value_error_naming_the_key(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.build(spec)


@pytest.mark.parametrize("arch", ["mlp", "resnet", "vit"])
def test_keras_file_round_trip_with_safe_mode(arch, tmp_path):
    model = models.build(
        {"arch": arch, "input_shape": [8, 8, 1], "num_classes": 10, "depth": 1, "width": 4}
    )
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    x = _images()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=0,
        atol=1e-6,
    )


def test_vit_is_patch_tokens_through_transformer_blocks():
    model = models.vit((8, 8, 1), 10, depth=2, width=16, num_heads=2, patch_size=2)
    assert isinstance(model, keras.Model) and model.__class__.__name__ == "Functional"
    blocks = [layer for layer in model.layers if isinstance(layer, hlkeras.layers.TransformerBlock)]
    assert len(blocks) == 2
    # (8 / 2) ** 2 = 16 patch tokens of width 16.
    assert model.get_layer("position_embedding").output.shape == (None, 16, 16)
    probabilities = keras.ops.convert_to_numpy(model(_images()))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


def test_vit_tokens_equal_a_hand_computed_patch_embedding():
    model = models.vit((8, 8, 1), 10, depth=1, width=8, num_heads=2, patch_size=4)
    x = _images(batch=2)
    tokens_model = keras.Model(model.input, model.get_layer("position_embedding").output)
    kernel, bias = model.get_layer("patch_embedding").get_weights()
    positions = model.get_layer("position_embedding").get_weights()[0]
    # Each non-overlapping 4x4 patch, flattened in (row, col, channel) order,
    # times the conv kernel, plus the bias and its position's embedding.
    patches = x.reshape(2, 2, 4, 2, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 16)
    expected = patches @ kernel.reshape(16, 8) + bias + positions[None]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(tokens_model(x)), expected, rtol=1e-5, atol=1e-5
    )


@heavy
def test_vit_with_experts_has_moe_ffns_and_their_losses():
    model = models.vit((8, 8, 1), 10, depth=2, width=16, num_heads=2, num_experts=4, top_k=2)
    moe_layers = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, hlkeras.layers.MixtureOfExperts)
    ]
    assert [layer.num_experts for layer in moe_layers] == [4, 4]
    model(_images(), training=True)
    assert len(model.losses) == 4  # load-balance + z-loss per MoE layer


TOKENS = np.array([[5, 3, 9, 2, 0, 0], [7, 1, 0, 0, 0, 0]], "int32")


@pytest.mark.parametrize(
    "options",
    [
        {"encoder": "transformer"},
        {"encoder": "transformer", "num_experts": 4, "pooling": "mean", "depth": 1},
        {"encoder": "gru"},
        {"encoder": "lstm", "bidirectional": False, "pooling": "mean"},
    ],
    ids=["transformer", "transformer-moe-mean", "gru", "lstm-mean"],
)
@heavy
def test_text_model_output_is_unchanged_by_extra_padding(options):
    spec = {"arch": "text", "num_classes": 3, "vocabulary_size": 12, "depth": 2, "width": 8}
    spec.update(options)
    short = models.build({**spec, "input_shape": [6], "num_heads": 2})
    long = models.build({**spec, "input_shape": [11], "num_heads": 2})
    long.set_weights(short.get_weights())
    padded = np.pad(TOKENS, ((0, 0), (0, 5)))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(long(padded)),
        keras.ops.convert_to_numpy(short(TOKENS)),
        atol=1e-5,
    )


def test_text_transformer_equals_its_layers_applied_by_hand():
    model = models.text((6,), 3, vocabulary_size=12, depth=1, width=8, num_heads=2, dropout=0)
    embedding = model.get_layer("token_embedding")
    x = embedding(TOKENS)
    mask = embedding.compute_mask(TOKENS)
    x = model.get_layer("block_0")(x, mask=mask)
    x = model.get_layer("pool")(model.get_layer("head_norm")(x), mask=mask)
    expected = keras.ops.softmax(model.get_layer("head")(x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(TOKENS)), keras.ops.convert_to_numpy(expected), atol=1e-6
    )
    assert model.get_layer("block_0").rope  # positions come from RoPE, not an embedding


@pytest.mark.parametrize("encoder", ["transformer", "gru"])
def test_text_model_keras_file_round_trip(encoder, tmp_path):
    model = models.text((6,), 3, vocabulary_size=12, encoder=encoder, depth=1, width=8, num_heads=2)
    model.save(tmp_path / "text.keras")
    reloaded = keras.saving.load_model(tmp_path / "text.keras", safe_mode=True)
    expected = keras.ops.convert_to_numpy(model(TOKENS))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(TOKENS)), expected, atol=1e-6)


def test_lora_adapts_the_text_transformer():
    from hlkeras import lora

    model = models.text((6,), 3, vocabulary_size=12, depth=1, width=8, num_heads=2)
    expected = keras.ops.convert_to_numpy(model(TOKENS))
    # A fresh adapter changes nothing; only adapters (and the head) train.
    adapted = lora.apply_lora(model, rank=2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(adapted(TOKENS)), expected, atol=1e-5)
    trainable = {w.path.split("/")[0] for w in adapted.trainable_weights}
    assert trainable == {"block_0", "head"}
    assert all("lora" in w.path for w in adapted.trainable_weights if w.path.startswith("block"))


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"input_shape": [8, 8, 1]}, r"\(max_length,\)"),
        ({"encoder": "rnn"}, "encoder"),
        ({"pooling": "max"}, "pooling"),
        ({"vocabulary_size": 0}, "vocabulary_size"),
        ({"encoder": "gru", "width": 7}, "width"),
    ],
)
def test_bad_text_specs_name_the_key(options, pattern):
    spec = {"arch": "text", "input_shape": [6], "num_classes": 3, **options}
    with pytest.raises(ValueError, match=pattern):
        models.build(spec)
