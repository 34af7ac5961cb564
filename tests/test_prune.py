"""`hlkeras.prune` against NumPy oracles: per-layer and global top-k by |w|
and m:n masks (ties to the lower index), which weights are prunable, the
polynomial schedule, zeros kept exactly by `fit` with the `Pruning`
callback on every backend, `.keras` round trips and the one-line errors."""

import doctest
import math

import keras
import numpy as np
import pytest
from keras import ops
from layer_testing import heavy

import hlkeras
from hlkeras import models
from hlkeras import prune

RNG = np.random.default_rng(0)


def oracle_layer_keep(value, target):
    """Keep-mask zeroing the floor(target * size) smallest |w|, earlier
    index first on ties (a stable sort)."""
    order = np.argsort(np.abs(value).ravel(), kind="stable")
    keep = np.ones(value.size, bool)
    keep[order[: math.floor(target * value.size)]] = False
    return keep.reshape(value.shape)


def oracle_pattern_keep(value, m, n, axis):
    """Keep the m largest |w| of each n consecutive weights along `axis`,
    by explicit loops over the groups."""
    moved = np.moveaxis(value, axis, -1)
    keep = np.zeros(moved.shape, bool)
    for index in np.ndindex(moved.shape[:-1]):
        row = moved[index]
        for start in range(0, row.size, n):
            group = list(range(start, start + n))
            kept = sorted(group, key=lambda i: (-abs(row[i]), i))[:m]
            keep[index + (kept,)] = True
    return np.moveaxis(keep, -1, axis)


def tied(shape):
    """Integer-valued weights: many ties, so the tie rule matters."""
    return RNG.integers(-3, 4, size=shape).astype("float32")


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_layer_masks_are_the_numpy_top_k_with_ties_to_the_lower_index(target):
    values = [tied((6, 5)), tied((3, 3, 4, 2)), RNG.normal(size=(7,)).astype("float32")]
    for value, keep in zip(values, prune.magnitude_masks(values, target, "layer")):
        np.testing.assert_array_equal(keep, oracle_layer_keep(value, target))


def test_global_masks_rank_all_weights_together():
    values = [tied((6, 5)), 10 * tied((4, 4))]
    masks = prune.magnitude_masks(values, 0.5, "global")
    flat = np.concatenate([v.ravel() for v in values])
    expected = oracle_layer_keep(flat, 0.5)
    np.testing.assert_array_equal(np.concatenate([m.ravel() for m in masks]), expected)
    # The small-weight layer loses more than half, the large one less.
    assert (~masks[0]).mean() > 0.5 > (~masks[1]).mean()


@pytest.mark.parametrize(("m", "n", "shape", "axis"), [(2, 4, (8, 3), 0), (1, 2, (2, 2, 4, 3), 2)])
def test_pattern_masks_keep_m_of_every_n_inputs(m, n, shape, axis):
    value = tied(shape)
    keep = prune.pattern_mask(value, m, n, axis)
    np.testing.assert_array_equal(keep, oracle_pattern_keep(value, m, n, axis))
    assert keep.mean() == m / n


def mlp():
    keras.utils.set_random_seed(0)
    return models.mlp((6,), 3, depth=2, width=8)


def kernels(model):
    return {
        w.variable.path: ops.convert_to_numpy(w.variable) for w in prune.prunable_weights(model)
    }


def test_magnitude_prunes_a_copy_and_leaves_the_head_and_biases_alone():
    model = mlp()
    before = [ops.convert_to_numpy(w) for w in model.weights]
    pruned = prune.magnitude(model, 0.5)
    for value, weight in zip(before, model.weights):  # the model passed in
        np.testing.assert_array_equal(ops.convert_to_numpy(weight), value)
    original = kernels(model)
    for path, value in kernels(pruned).items():
        np.testing.assert_array_equal(
            value, np.where(oracle_layer_keep(original[path], 0.5), original[path], 0)
        )
    assert prune.sparsity(pruned) == pytest.approx(0.5, abs=0.02)
    head = pruned.get_layer("head")
    assert not any(w.variable.path.startswith(head.path) for w in prune.prunable_weights(pruned))
    for weight, value in zip(pruned.weights, before):
        if "kernel" not in weight.path or weight.path.startswith(head.path):
            np.testing.assert_array_equal(ops.convert_to_numpy(weight), value)


def test_prunable_weights_are_kernels_and_expert_kernels_not_routers_norms_or_embeddings():
    spec = models.resolve_spec(
        {"arch": "vit", "input_shape": [8, 8, 1], "num_classes": 10, "depth": 1,
         "num_experts": 2, "width": 16}
    )  # fmt: skip
    names = {w.variable.path.split("/")[-1] for w in prune.prunable_weights(models.build(spec))}
    assert {"kernel", "expert_hidden_kernel", "expert_output_kernel"} <= names
    assert not names - {"kernel", "expert_hidden_kernel", "expert_output_kernel"}
    paths = [w.variable.path for w in prune.prunable_weights(models.build(spec))]
    assert not any("router" in path for path in paths)


def test_pattern_2_4_on_a_model_and_targets_by_glob():
    model = mlp()
    pruned = prune.magnitude(model, pattern="2:4", targets="block_0")
    original, after = kernels(model), kernels(pruned)
    chosen = [w.variable.path for w in prune.prunable_weights(model, targets="block_0")]
    assert chosen == ["block_0/hidden_dense/kernel", "block_0/output_dense/kernel"]
    for path in after:
        if path in chosen:
            expected = np.where(oracle_pattern_keep(original[path], 2, 4, 0), original[path], 0)
            np.testing.assert_array_equal(after[path], expected)
        else:
            np.testing.assert_array_equal(after[path], original[path])


def test_a_pattern_leaves_the_weights_it_does_not_fit_dense_and_says_so():
    model = mlp()  # its stem's kernel has 6 inputs, not a multiple of 4
    with pytest.warns(hlkeras.HlkerasWarning, match=r"leaves 1 weight\(s\) dense.*\(6, 8\)"):
        pruned = prune.magnitude(model, pattern="2:4")
    original, after = kernels(model), kernels(pruned)
    np.testing.assert_array_equal(after["stem/kernel"], original["stem/kernel"])
    fitted = [path for path in original if path != "stem/kernel"]
    assert len(fitted) == 4  # the two residual blocks' two kernels each
    for path in fitted:
        expected = np.where(oracle_pattern_keep(original[path], 2, 4, 0), original[path], 0)
        np.testing.assert_array_equal(after[path], expected)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.1), (50, 0.8 + (0.1 - 0.8) * 0.5**3), (100, 0.8), (150, 0.8)]
)
def test_schedule_is_the_polynomial_formula(step, expected):
    value = prune.polynomial_sparsity(
        step, initial_sparsity=0.1, final_sparsity=0.8, begin_step=0, end_step=100
    )
    assert value == pytest.approx(expected)


class ZerosStayZero(keras.callbacks.Callback):
    """After every step, the weights `Pruning` masked are exactly zero."""

    def __init__(self, pruning):
        super().__init__()
        self.pruning, self.checked = pruning, 0

    def on_train_batch_end(self, batch, logs=None):
        self.model  # On JAX, syncs the training state.
        for weight, mask in zip(self.pruning.weights, self.pruning.masks):
            values = ops.convert_to_numpy(weight.variable)
            assert np.all(values[ops.convert_to_numpy(mask) == 0] == 0)
        self.checked += 1


@heavy
def test_fit_with_pruning_reaches_the_final_sparsity_and_keeps_zeros_exactly(tmp_path):
    model = mlp()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    x = RNG.normal(size=(64, 6)).astype("float32")
    y = RNG.integers(0, 3, size=64)
    pruning = prune.Pruning(0.75, frequency=2)
    probe = ZerosStayZero(pruning)
    # 8 steps per epoch, 2 epochs: the schedule ends at step 16, an update step.
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[pruning, probe], verbose=0)
    assert probe.checked == 16 and pruning.end_step == 16
    for path, value in kernels(model).items():
        assert np.sum(value == 0) == math.floor(0.75 * value.size), path
    # The zeros are the masks' saved form: a .keras round trip keeps them,
    # and a resumed Pruning rebuilds its masks from them.
    model.save(tmp_path / "pruned.keras")
    loaded = keras.saving.load_model(tmp_path / "pruned.keras")
    assert prune.sparsity(loaded) == prune.sparsity(model)
    zeros = {path: value == 0 for path, value in kernels(loaded).items()}
    loaded.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    loaded.fit(x, y, batch_size=8, epochs=1, callbacks=[prune.Pruning(0.75)], verbose=0)
    for path, value in kernels(loaded).items():
        assert np.all(value[zeros[path]] == 0), path


class ZerosOfEveryStep(keras.callbacks.Callback):
    """Each step's zero set of every pruned kernel, after the step."""

    def __init__(self):
        super().__init__()
        self.zeros = []

    def on_train_batch_end(self, batch, logs=None):
        self.zeros.append({path: value == 0 for path, value in kernels(self.model).items()})


@heavy
def test_masks_updated_inside_the_step_are_the_numpy_top_k_of_the_weights():
    # With a learning rate of 0 the weights never move, so pruning the
    # smallest kept |w| step by step must give, at every step, the zeros of
    # the NumPy oracle for the step's count, and that count is the
    # schedule's (float32 in the step: at most one weight off between the
    # ends, exact at the end).
    model = mlp()
    initial = kernels(model)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    x = RNG.normal(size=(40, 6)).astype("float32")
    y = RNG.integers(0, 3, size=40)
    pruning = prune.Pruning(0.8, frequency=1, end_step=10)
    probe = ZerosOfEveryStep()
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[pruning, probe], verbose=0)
    # Layer scope: updated in the step, or on torch in NumPy after it.
    assert pruning.updates_in_step == (keras.backend.backend() != "torch")
    assert len(probe.zeros) == 10
    for step, zeros in enumerate(probe.zeros, start=1):
        for path, value in initial.items():
            count = int(zeros[path].sum())
            scheduled = math.floor(pruning.sparsity_at(step) * value.size)
            assert abs(count - scheduled) <= (0 if step == 10 else 1), (step, path)
            np.testing.assert_array_equal(
                ~zeros[path], oracle_layer_keep(value, count / value.size)
            )


class SavesEveryEpoch(keras.callbacks.Callback):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        self.model.save(self.path)


@heavy
def test_masks_are_in_the_optimizer_only_during_fit_and_never_saved(tmp_path, recwarn):
    model = mlp()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    x = RNG.normal(size=(32, 6)).astype("float32")
    y = RNG.integers(0, 3, size=32)
    path = tmp_path / "during_fit.keras"
    pruning = prune.Pruning(0.5, frequency=1)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[pruning, SavesEveryEpoch(path)], verbose=0)
    # The oracle: the same model compiled and fit as usual, without pruning.
    plain = mlp()
    plain.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    plain.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert len(model.optimizer.variables) == len(plain.optimizer.variables)
    assert all(w.variable.constraint is None for w in pruning.weights)
    loaded = keras.saving.load_model(path)
    assert not [w for w in recwarn if "Skipping variable loading" in str(w.message)]
    for saved, trained in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(saved), ops.convert_to_numpy(trained))
    # A fit without the callback after it no longer masks: the zeros move.
    pruned = {path: value == 0 for path, value in kernels(model).items()}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    moved = [np.any(value[pruned[path]] != 0) for path, value in kernels(model).items()]
    assert all(moved)


@heavy
def test_a_backup_restores_into_a_fit_whose_masks_are_already_in_the_optimizer(tmp_path, recwarn):
    # Pruning before BackupAndRestore: on JAX the masks are optimizer
    # variables when the backup loads. The oracle: the optimizer state goes
    # on from the backup (its step count is the two epochs'), not from zero.
    x = RNG.normal(size=(32, 6)).astype("float32")
    y = RNG.integers(0, 3, size=32)

    def fit(epochs):
        model = mlp()
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        backup = keras.callbacks.BackupAndRestore(tmp_path / "backup", delete_checkpoint=False)
        pruning = prune.Pruning(0.5, frequency=1, end_step=8)
        model.fit(x, y, batch_size=8, epochs=epochs, callbacks=[pruning, backup], verbose=0)
        return model

    first = fit(1)
    backed_up = {path: value == 0 for path, value in kernels(first).items()}
    resumed = fit(2)
    assert not [w for w in recwarn if "Skipping variable loading" in str(w.message)]
    assert int(ops.convert_to_numpy(first.optimizer.iterations)) == 4
    assert int(ops.convert_to_numpy(resumed.optimizer.iterations)) == 8
    for path, value in kernels(resumed).items():
        assert np.sum(value == 0) == math.floor(0.5 * value.size), path
        assert np.all(value[backed_up[path]] == 0), path  # the masks came from the backup


def test_strip_is_a_plain_copy_with_the_zeros():
    pruned = prune.magnitude(mlp(), 0.5)
    stripped = prune.strip(pruned)
    assert stripped is not pruned
    for a, b in zip(pruned.weights, stripped.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


@pytest.mark.neutral
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a float in \[0, 1\). Received: sparsity=1.0"),
        ({"sparsity": -0.1}, r"Received: sparsity=-0.1"),
        ({"sparsity": "half"}, r"Received: sparsity='half'"),
        ({"pattern": "4:2"}, r"'m:n' with integers 0 < m < n.*Received: pattern='4:2'"),
        ({"pattern": "2-4"}, r"Received: pattern='2-4'"),
        ({"sparsity": 0.8, "pattern": "2:4"}, r"a sparsity of 0.5; it contradicts sparsity=0.8"),
        ({"sparsity": 0.5, "targets": "attention*"}, r"pattern 'attention\*' matches no layer"),
        ({"sparsity": 0.5, "scope": "model"}, r"`scope`"),
        ({"pattern": "2:4", "targets": "stem"}, r"fits no selected weight.*stem/kernel \(6, 8\)"),
    ],
)
def test_bad_arguments_name_the_argument_and_what_is_allowed(kwargs, message):
    model = mlp()
    before = [ops.convert_to_numpy(w) for w in model.weights]
    with pytest.raises(ValueError, match=message):
        prune.magnitude(model, **kwargs)
    for value, weight in zip(before, model.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(weight), value)


@pytest.mark.neutral
def test_pruning_callback_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`frequency` must be a positive integer"):
        prune.Pruning(0.5, frequency=0)
    with pytest.raises(ValueError, match=r"`end_step` must be None or an integer > begin_step=10"):
        prune.Pruning(0.5, begin_step=10, end_step=5)
    with pytest.raises(ValueError, match=r"`initial_sparsity` must be a float in \[0, 1\)"):
        prune.Pruning(0.5, initial_sparsity=1.5)


@pytest.mark.parametrize("module", [prune, prune.units], ids=["package", "units"])
def test_the_docstring_examples_run(module):
    globs = {"hlkeras": hlkeras, "keras": keras, **vars(module)}
    failures, tried = doctest.testmod(module, globs=globs)
    assert tried > 0 and failures == 0


# --------------------------------------------------------------------------
# Structured


def _blocks(model):
    return [layer for layer in model.layers if isinstance(layer, hlkeras.layers.ResidualBlock)]


def _zero_outgoing(block, units):
    """Zeroes the outgoing weights (output_dense rows) of `units` by hand."""
    kernel = ops.convert_to_numpy(block.output_dense.kernel).copy()
    kernel[units] = 0.0
    block.output_dense.kernel.assign(kernel)


def test_structured_removes_units_whose_outgoing_weights_are_zero_without_changing_outputs():
    model = models.mlp((6,), 4, depth=2, width=8, hidden_ratio=2, dropout=0.0)
    zeroed = {0: [1, 6, 9, 12], 1: [0, 3, 4, 15]}  # 4 of each block's 16 hidden units
    for index, units in zeroed.items():
        _zero_outgoing(_blocks(model)[index], units)
    x = RNG.normal(size=(5, 6)).astype("float32")
    before = ops.convert_to_numpy(model(x))
    smaller = prune.structured(model, 0.25)
    np.testing.assert_allclose(ops.convert_to_numpy(smaller(x)), before, atol=1e-5)
    # Each block lost 4 units: 4 columns (+ biases) of its 8x16 hidden kernel
    # and 4 rows of its 16x8 output kernel.
    assert smaller.count_params() == model.count_params() - 2 * 4 * (8 + 1 + 8)
    assert [b.hidden_units for b in _blocks(smaller)] == [12, 12]
    assert [b.hidden_units for b in _blocks(model)] == [16, 16]  # unchanged
    assert [layer.path for layer in smaller.layers] == [layer.path for layer in model.layers]


def test_structured_keeps_the_units_of_largest_saliency():
    model = models.mlp((6,), 4, depth=1, width=8, hidden_ratio=2, dropout=0.0)
    block = _blocks(model)[0]
    incoming = np.concatenate(
        [
            ops.convert_to_numpy(block.hidden_dense.kernel),
            ops.convert_to_numpy(block.hidden_dense.bias)[None],
        ]
    )
    outgoing = ops.convert_to_numpy(block.output_dense.kernel)
    for criterion, order in (("l2", 2), ("l1", 1)):
        saliency = np.linalg.norm(incoming, order, axis=0) * np.linalg.norm(outgoing, order, axis=1)
        expected = np.sort(np.argsort(saliency, kind="stable")[8:])
        smaller = prune.structured(model, 0.5, criterion=criterion)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(_blocks(smaller)[0].output_dense.kernel), outgoing[expected]
        )


def test_structured_narrows_a_feed_forward_by_target_and_round_trips(tmp_path):
    inputs = keras.Input((5, 8))
    hidden = hlkeras.layers.FeedForward(12, name="ffn")(inputs)
    hidden = hlkeras.layers.FeedForward(12, name="other")(hidden)
    model = keras.Model(
        inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(hidden))
    )
    ffn = model.get_layer("ffn")
    # gelu(0) = 0: a unit with zero incoming weights and bias outputs nothing.
    kernel, bias = (
        ops.convert_to_numpy(w).copy() for w in (ffn.hidden_dense.kernel, ffn.hidden_dense.bias)
    )
    kernel[:, [2, 5, 7]], bias[[2, 5, 7]] = 0.0, 0.0
    ffn.hidden_dense.kernel.assign(kernel)
    ffn.hidden_dense.bias.assign(bias + 0.0)
    x = RNG.normal(size=(2, 5, 8)).astype("float32")
    smaller = prune.structured(model, 0.25, targets="ffn")
    np.testing.assert_allclose(
        ops.convert_to_numpy(smaller(x)), ops.convert_to_numpy(model(x)), atol=1e-5
    )
    assert smaller.get_layer("ffn").ffn_units == 9 and smaller.get_layer("other").ffn_units == 12
    smaller.save(tmp_path / "smaller.keras")
    loaded = keras.saving.load_model(tmp_path / "smaller.keras")
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(smaller(x)), atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 1.0}, r"`ratio` must be a float in \[0, 1\)"),
        ({"ratio": 0.5, "criterion": "l3"}, "`criterion`.*'l3'"),
        ({"ratio": 0.5, "targets": "nothing*"}, "nothing\\*.*matches no layer"),
        ({"ratio": 0.5, "targets": "head"}, "selected no ResidualBlock or FeedForward.*block_0"),
    ],
)
def test_structured_bad_arguments(kwargs, message):
    model = models.mlp((6,), 4, depth=1, width=8)
    with pytest.raises(ValueError, match=message):
        prune.structured(model, **kwargs)


def test_structured_names_what_it_looked_at_when_nothing_is_prunable():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="only")(inputs))
    with pytest.raises(ValueError, match="nothing to prune.*ResidualBlock, FeedForward.*only"):
        prune.structured(model, 0.5)
