import keras
import numpy as np
import pytest
from layer_testing import heavy
from layer_testing import run_layer_test

from hlkeras.layers import ConvResidualBlock
from hlkeras.layers import DropPath
from hlkeras.layers import ResidualBlock

RNG = np.random.default_rng(0)
VECTORS = RNG.normal(size=(4, 6)).astype("float32")
SEQUENCES = RNG.normal(size=(4, 5, 6)).astype("float32")
IMAGES = RNG.normal(size=(4, 8, 8, 3)).astype("float32")


@pytest.mark.parametrize(
    "init_kwargs, inputs, expected_shape",
    [
        ({"units": 6}, VECTORS, (4, 6)),
        (
            {
                "units": 8,
                "hidden_units": 12,
                "norm": "batch",
                "dropout": 0.1,
                "drop_path": 0.2,
                "activation": "gelu",
            },
            VECTORS,
            (4, 8),
        ),
        ({"units": 3, "norm": None, "activation": "tanh"}, SEQUENCES, (4, 5, 3)),
        ({"units": 8, "norm": "batch", "lora_rank": 2, "lora_dropout": 0.1}, VECTORS, (4, 8)),
    ],
    ids=["identity-shortcut", "projection-batchnorm", "sequence-no-norm", "lora"],
)
@heavy
def test_residual_block_contract(init_kwargs, inputs, expected_shape):
    run_layer_test(ResidualBlock, init_kwargs, inputs, expected_output_shape=expected_shape)


@pytest.mark.parametrize(
    "init_kwargs, expected_shape",
    [
        ({"filters": 3}, (4, 8, 8, 3)),
        ({"filters": 8, "strides": 2, "drop_path": 0.1}, (4, 4, 4, 8)),
        ({"filters": 8, "bottleneck": True, "activation": "silu"}, (4, 8, 8, 8)),
    ],
    ids=["identity-shortcut", "strided-projection", "bottleneck"],
)
@heavy
def test_conv_residual_block_contract(init_kwargs, expected_shape):
    run_layer_test(ConvResidualBlock, init_kwargs, IMAGES, expected_output_shape=expected_shape)


def test_drop_path_contract():
    # DropPath has no weights, so there is nothing for the fit check to move.
    run_layer_test(DropPath, {"rate": 0.3, "seed": 3}, SEQUENCES, run_training_check=False)


def test_residual_block_equals_hand_written_dense_stack():
    block = ResidualBlock(6, hidden_units=10, norm=None, activation="relu")
    output = keras.ops.convert_to_numpy(block(VECTORS))
    w1, b1 = (keras.ops.convert_to_numpy(w) for w in block.hidden_dense.weights)
    w2, b2 = (keras.ops.convert_to_numpy(w) for w in block.output_dense.weights)
    # Random biases so the oracle also checks they are added.
    b1 = RNG.normal(size=b1.shape).astype("float32")
    b2 = RNG.normal(size=b2.shape).astype("float32")
    block.hidden_dense.bias.assign(b1)
    block.output_dense.bias.assign(b2)
    output = keras.ops.convert_to_numpy(block(VECTORS))
    reference = VECTORS + np.maximum(VECTORS @ w1 + b1, 0.0) @ w2 + b2
    np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-5)


def test_residual_block_projects_shortcut_when_width_changes():
    block = ResidualBlock(4, norm=None)
    output = keras.ops.convert_to_numpy(block(VECTORS))
    w1, b1 = (keras.ops.convert_to_numpy(w) for w in block.hidden_dense.weights)
    w2, b2 = (keras.ops.convert_to_numpy(w) for w in block.output_dense.weights)
    projection = keras.ops.convert_to_numpy(block.shortcut.kernel)
    reference = VECTORS @ projection + np.maximum(VECTORS @ w1 + b1, 0.0) @ w2 + b2
    np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-5)


def test_relu_family_uses_he_normal_init():
    relu_block = ResidualBlock(4, activation="relu")
    tanh_block = ResidualBlock(4, activation="tanh")
    relu_block.build((None, 6))
    tanh_block.build((None, 6))
    assert relu_block.hidden_dense.kernel_initializer.__class__.__name__ == "HeNormal"
    assert tanh_block.hidden_dense.kernel_initializer.__class__.__name__ == "GlorotUniform"


def test_conv_block_matches_manual_basic_block_in_inference():
    block = ConvResidualBlock(3, drop_path=0.5)
    output = keras.ops.convert_to_numpy(block(IMAGES, training=False))
    conv_1, conv_2 = block.branch_convs
    bn_1, bn_2 = block.branch_norms
    # Same sublayers composed by hand: relu(x + bn2(conv2(relu(bn1(conv1 x))))).
    branch = keras.ops.relu(bn_1(conv_1(IMAGES), training=False))
    branch = bn_2(conv_2(branch), training=False)
    reference = keras.ops.convert_to_numpy(keras.ops.relu(keras.ops.add(IMAGES, branch)))
    np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-5)


def test_drop_path_is_identity_at_inference():
    drop = DropPath(0.7, seed=1)
    output = keras.ops.convert_to_numpy(drop(SEQUENCES, training=False))
    np.testing.assert_array_equal(output, SEQUENCES)


def test_drop_path_preserves_mean_and_drops_whole_samples():
    rate = 0.25
    inputs = np.ones((20000, 3, 2), dtype="float32")
    output = keras.ops.convert_to_numpy(DropPath(rate, seed=7)(inputs, training=True))
    per_sample = output.reshape(len(output), -1)
    # Each sample is either dropped whole or kept whole and scaled by 1/(1-rate).
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    kept = per_sample[:, 0] != 0
    np.testing.assert_allclose(per_sample[kept], 1 / (1 - rate), rtol=1e-6)
    # Bernoulli keep fraction: the standard error of the mean is
    # sqrt(rate / (1 - rate) / n) ~= 0.004 here; allow 5 standard errors.
    assert abs(output.mean() - 1.0) < 0.02
    assert abs((per_sample[:, 0] == 0).mean() - rate) < 0.02


@pytest.mark.neutral
@pytest.mark.parametrize(
    "make_layer, argument, value",
    [
        (lambda: ResidualBlock(-3), "units", "-3"),
        (lambda: ResidualBlock(0), "units", "0"),
        (lambda: ResidualBlock(4, hidden_units=-1), "hidden_units", "-1"),
        (lambda: ResidualBlock(4, dropout=1.0), "dropout", "1.0"),
        (lambda: ResidualBlock(4, drop_path=-0.1), "drop_path", "-0.1"),
        (lambda: ResidualBlock(4, norm="group"), "norm", "'group'"),
        (lambda: ResidualBlock(4, activation="relux"), "activation", "'relux'"),
        (lambda: ConvResidualBlock(-8), "filters", "-8"),
        (lambda: ConvResidualBlock(8, strides=0), "strides", "0"),
        (lambda: ConvResidualBlock(6, bottleneck=True), "filters", "6"),
        (lambda: ConvResidualBlock(8, activation="nope"), "activation", "'nope'"),
        (lambda: ConvResidualBlock(8, drop_path=1.5), "drop_path", "1.5"),
        (lambda: DropPath(1.0), "rate", "1.0"),
        (lambda: DropPath(-0.5), "rate", "-0.5"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(make_layer, argument, value):
    with pytest.raises(ValueError, match=rf"`{argument}`.*{value}"):
        make_layer()


def test_residual_block_rejects_rank_one_input_at_build():
    with pytest.raises(ValueError, match=r"rank >= 2.*\(6,\)"):
        ResidualBlock(4).build((6,))


def test_conv_block_rejects_non_4d_input_at_build():
    with pytest.raises(ValueError, match=r"4D NHWC.*\(None, 8, 3\)"):
        ConvResidualBlock(4).build((None, 8, 3))
