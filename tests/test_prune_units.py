"""`hlkeras.prune.structured` on heads, experts and convolution channels.

The oracle, as for hidden units in `test_prune.py`: units made inert by hand
(their outgoing weights zero, or an expert the router never chooses) are
the ones removed, and the smaller model gives the original's outputs.
"""

import keras
import numpy as np
import pytest
from keras import ops

import hlkeras
from hlkeras import prune

RNG = np.random.default_rng(1)


def _numpy(variable):
    return ops.convert_to_numpy(variable).copy()


def _zero_rows(variable, index, axis=0):
    value = _numpy(variable)
    np.moveaxis(value, axis, 0)[index] = 0.0
    variable.assign(value)


def _assert_same_outputs(smaller, model, x):
    # Through `predict`, compiled: an eager MoE call on JAX compiles each of
    # its ops apart, 5x slower than one jit (KERAS-NOTES).
    np.testing.assert_allclose(
        smaller.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def _sequence_model(layer, length=5, features=16):
    inputs = keras.Input((length, features))
    hidden = layer(inputs, inputs) if isinstance(layer, keras.layers.MultiHeadAttention) else None
    hidden = layer(inputs) if hidden is None else hidden
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(pooled))


def test_heads_with_zero_output_projections_are_removed_without_changing_outputs():
    attention = hlkeras.layers.MultiHeadAttention(4, 8, name="attention")
    model = _sequence_model(attention)
    _zero_rows(attention._output_dense.kernel, [1, 3])
    x = RNG.normal(size=(2, 5, 16)).astype("float32")
    smaller = prune.structured(model, 0.5)
    _assert_same_outputs(smaller, model, x)
    narrow = smaller.get_layer("attention")
    assert (narrow.num_heads, narrow.num_kv_heads, narrow.key_dim) == (2, 2, 8)
    np.testing.assert_array_equal(
        _numpy(narrow._query_dense.kernel), _numpy(attention._query_dense.kernel)[:, [0, 2]]
    )
    assert attention.num_heads == 4  # the model passed in is unchanged


def test_grouped_query_heads_go_a_group_at_a_time_inside_a_transformer_block():
    block = hlkeras.layers.TransformerBlock(4, 24, num_kv_heads=2, name="block")
    model = _sequence_model(block)
    # Group 0 is key/value head 0 and the query heads 0 and 1 it serves.
    _zero_rows(block.attention._output_dense.kernel, [0, 1])
    x = RNG.normal(size=(2, 5, 16)).astype("float32")
    smaller = prune.structured(model, 0.5, kinds="heads")
    _assert_same_outputs(smaller, model, x)
    narrow = smaller.get_layer("block")
    # key_dim stays 16 // 4 = 4: the block would derive 16 // 2 = 8 from num_heads.
    assert (narrow.num_heads, narrow.num_kv_heads, narrow.key_dim, narrow.ffn_units) == (
        2,
        1,
        4,
        24,
    )
    assert (
        smaller.count_params()
        == model.count_params() - (2 * 16 * 4 + 2 * 4) - (16 * 4 + 4) * 2 - 2 * 4 * 16
    )


def test_a_transformer_blocks_heads_and_ffn_units_are_cut_together():
    block = hlkeras.layers.TransformerBlock(4, 24, name="block")
    model = _sequence_model(block)
    _zero_rows(block.attention._output_dense.kernel, [2])
    _zero_rows(block.ffn.output_dense.kernel, [0, 5, 7, 8, 11, 20])
    x = RNG.normal(size=(2, 5, 16)).astype("float32")
    smaller = prune.structured(model, 0.25)
    _assert_same_outputs(smaller, model, x)
    narrow = smaller.get_layer("block")
    assert (narrow.num_heads, narrow.ffn_units) == (3, 18)


def _never_chosen(moe, expert):
    """Makes the router never choose `expert` for inputs whose feature 0 is
    10 (a logit 200 below every other), and zeroes its weights, so it ranks
    first by norm."""
    router = _numpy(moe.router.kernel)
    router[0, :] = 10.0
    router[0, expert] = -10.0
    moe.router.kernel.assign(router)
    for variable in (moe.expert_hidden_kernel, moe.expert_hidden_bias):
        _zero_rows(variable, [expert])
    for variable in (moe.expert_output_kernel, moe.expert_output_bias):
        _zero_rows(variable, [expert])


def test_an_expert_the_router_never_chooses_is_removed_without_changing_outputs():
    moe = hlkeras.layers.MixtureOfExperts(4, 8, top_k=2, capacity_factor=None, name="moe")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(moe(inputs)))
    _never_chosen(moe, 2)
    x = RNG.normal(size=(16, 6)).astype("float32")
    x[:, 0] = 10.0
    smaller = prune.structured(model, 0.25)
    _assert_same_outputs(smaller, model, x)
    narrow = smaller.get_layer("moe")
    assert (narrow.num_experts, narrow.top_k) == (3, 2)
    np.testing.assert_array_equal(
        _numpy(narrow.router.kernel), _numpy(moe.router.kernel)[:, [0, 1, 3]]
    )


def test_experts_keep_top_k_and_rank_by_recorded_load():
    block = hlkeras.layers.TransformerBlock(2, 8, num_experts=6, top_k=2, name="block")
    model = _sequence_model(block)
    moe = block.ffn
    load = np.array([0.3, 0.05, 0.2, 0.0, 0.25, 0.19], "float32")
    moe.routing_load_total.assign(load * 3)
    moe.routing_calls.assign(3.0)
    smaller = prune.structured(model, 0.5, kinds="experts", criterion="load")
    narrow = smaller.get_layer("block").ffn
    assert narrow.num_experts == 3
    np.testing.assert_array_equal(
        _numpy(narrow.expert_output_kernel), _numpy(moe.expert_output_kernel)[[0, 2, 4]]
    )
    # 0.9 would remove 5 of 6 experts; 2 stay, the top-k.
    assert prune.structured(model, 0.9, kinds="experts").get_layer("block").num_experts == 2


def test_load_needs_a_recorded_load():
    model = _sequence_model(hlkeras.layers.TransformerBlock(2, 8, num_experts=4, name="block"))
    with pytest.raises(ValueError, match="criterion='load'.*has recorded none.*criterion='l2'"):
        prune.structured(model, 0.5, criterion="load")


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
def test_inner_channels_with_zero_outgoing_weights_are_removed_without_changing_outputs(
    bottleneck,
):
    block = hlkeras.layers.ConvResidualBlock(8, strides=2, bottleneck=bottleneck, name="block")
    inputs = keras.Input((6, 6, 3))
    hidden = keras.layers.GlobalAveragePooling2D()(block(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    inner = 2 if bottleneck else 8
    zeroed = [[1], [0]] if bottleneck else [[1, 4, 6, 7]]
    for following, channels in zip(block.branch_convs[1:], zeroed):
        _zero_rows(following.kernel, channels, axis=2)
    for norm in block.branch_norms:  # statistics other than a fresh layer's
        norm.moving_mean.assign(RNG.normal(size=norm.moving_mean.shape).astype("float32"))
        norm.moving_variance.assign(RNG.uniform(0.5, 2, norm.moving_variance.shape).astype("f4"))
    x = RNG.normal(size=(2, 6, 6, 3)).astype("float32")
    smaller = prune.structured(model, 0.5)
    _assert_same_outputs(smaller, model, x)
    narrow = smaller.get_layer("block")
    assert narrow.inner_filters == inner // 2 and narrow.filters == 8
    assert [tuple(c.kernel.shape) for c in narrow.branch_convs][-1][2] == inner // 2


def test_inner_filters_round_trips_and_defaults_to_the_blocks_width(tmp_path):
    inputs = keras.Input((6, 6, 3))
    outputs = hlkeras.layers.ConvResidualBlock(8, inner_filters=3, name="block")(inputs)
    model = keras.Model(inputs, outputs)
    assert [c.kernel.shape[-1] for c in model.get_layer("block").branch_convs] == [3, 8]
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = RNG.normal(size=(1, 6, 6, 3)).astype("float32")
    _assert_same_outputs(loaded, model, x)
    default = hlkeras.layers.ConvResidualBlock(8, bottleneck=True)
    default.build((None, 6, 6, 8))
    assert [c.kernel.shape[-1] for c in default.branch_convs] == [2, 2, 8]


def test_kinds_choose_what_is_cut():
    block = hlkeras.layers.TransformerBlock(4, 24, name="block")
    model = _sequence_model(block)
    narrow = prune.structured(model, 0.5, kinds=["hidden"]).get_layer("block")
    assert (narrow.num_heads, narrow.ffn_units) == (4, 12)
    with pytest.raises(ValueError, match="`kinds`.*'units'"):
        prune.structured(model, 0.5, kinds="units")
    with pytest.raises(ValueError, match="no unit of kinds \\['experts'\\].*block"):
        prune.structured(model, 0.5, kinds="experts")


def test_layers_with_adapters_are_refused():
    model = _sequence_model(hlkeras.layers.TransformerBlock(2, 8, name="block"))
    adapted = hlkeras.lora.apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="'block' has LoRA adapters.*merge_lora"):
        prune.structured(adapted, 0.5)
