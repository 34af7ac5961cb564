"""`hlkeras.distill` against oracles: the loss against NumPy and against
`keras.distillation.LogitsDistillation`, a teacher that stays bit-identical
while its student and projectors train, feature losses by formula, the
teacher's view of the batch, cached teacher logits equal to fresh ones."""

import keras
import numpy as np
import pytest
from keras import ops

import hlkeras
from hlkeras import distill
from hlkeras import models

RNG = np.random.default_rng(3)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def oracle_loss(labels, student, teacher, temperature, alpha):
    """The issue's formula in NumPy (float64)."""
    one_hot = np.eye(student.shape[-1])[labels] if labels.ndim == 1 else labels
    cross_entropy = -(one_hot * _log_softmax(student)).sum(-1)
    p_teacher = np.exp(_log_softmax(teacher / temperature))
    kl = p_teacher * (_log_softmax(teacher / temperature) - _log_softmax(student / temperature))
    loss = alpha * cross_entropy + (1 - alpha) * temperature**2 * kl.sum(-1)
    return loss.mean()


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.1), (2.5, 0.0), (8.0, 1.0)])
@pytest.mark.parametrize("one_hot", [False, True], ids=["integer", "one_hot"])
def test_the_loss_is_the_formula(temperature, alpha, one_hot):
    student, teacher = (RNG.normal(scale=3, size=(6, 5)).astype("float32") for _ in range(2))
    labels = RNG.integers(0, 5, size=6)
    given = np.eye(5, dtype="float32")[labels] if one_hot else labels
    loss = distill.distillation_loss(given, student, teacher, temperature=temperature, alpha=alpha)
    expected = oracle_loss(labels, student.astype("f8"), teacher.astype("f8"), temperature, alpha)
    np.testing.assert_allclose(float(ops.convert_to_numpy(loss)), expected, rtol=1e-5)


def test_alpha_one_is_cross_entropy_and_zero_is_keras_logits_distillation():
    student, teacher = (RNG.normal(size=(8, 4)).astype("float32") for _ in range(2))
    labels = RNG.integers(0, 4, size=8)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, student)
    loss = distill.distillation_loss(labels, student, teacher, temperature=3.0, alpha=1.0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loss), ops.convert_to_numpy(cross_entropy), 1e-5
    )
    # With a KLDivergence instance: the default, loss="kl_divergence", resolves
    # to the function, which Keras 3.15 applies to the scaled logits as if
    # they were probabilities (KERAS-NOTES).
    keras_kl = keras.distillation.LogitsDistillation(
        temperature=3.0, loss=keras.losses.KLDivergence()
    ).compute_loss(teacher, student)
    loss = distill.distillation_loss(labels, student, teacher, temperature=3.0, alpha=0.0)
    np.testing.assert_allclose(ops.convert_to_numpy(loss), ops.convert_to_numpy(keras_kl), 1e-5)


def _pair(teacher_width=32, student_width=8, teacher_shape=(8, 8, 1)):
    teacher = models.mlp(teacher_shape, 10, depth=1, width=teacher_width, dropout=0.0)
    student = models.mlp((8, 8, 1), 10, depth=1, width=student_width, dropout=0.0)
    return teacher, student


def _digits_like(count=32):
    return RNG.normal(size=(count, 8, 8, 1)).astype("float32"), RNG.integers(0, 10, size=count)


def _numpy_weights(model):
    return [ops.convert_to_numpy(w).copy() for w in model.weights]


def test_the_teacher_stays_bit_identical_while_the_student_and_projector_train():
    teacher, student = _pair()
    distiller = distill.Distiller(teacher, student, features=[("block_0", "block_0")])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    teacher_before, student_before = _numpy_weights(teacher), _numpy_weights(student)
    projector_before = _numpy_weights(distiller.projectors[0])
    x, y = _digits_like()
    distiller.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for before, after in zip(teacher_before, _numpy_weights(teacher)):
        np.testing.assert_array_equal(before, after)
    changed = [not np.array_equal(b, a) for b, a in zip(student_before, _numpy_weights(student))]
    trainable = [w.trainable for w in student.weights]
    assert changed == trainable  # every trainable student weight moved
    assert all(
        not np.array_equal(b, a)
        for b, a in zip(projector_before, _numpy_weights(distiller.projectors[0]))
    )
    assert distiller.projectors[0].kernel.shape == (8, 32)
    assert not any(w.trainable for w in teacher.weights)
    # The projector is the distiller's: the student stays a plain model.
    assert len(student.weights) == len(student_before)


def _logits(model, x):
    logits = keras.Model(model.inputs, distill.logits_layer_output(model))
    return logits.predict(x, verbose=0).astype("float64")


def _features(model, name, x):
    return keras.Model(model.inputs, model.get_layer(name).output).predict(x, verbose=0)


def test_the_feature_loss_is_the_projected_mean_squared_error():
    teacher, student = _pair()
    distiller = distill.Distiller(
        teacher, student, features=[("block_0", "block_0")], feature_weight=0.5, alpha=0.3
    )
    distiller.compile(optimizer="adam")
    x, y = _digits_like(16)
    loss = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"]
    projector = distiller.projectors[0]
    projected = _features(student, "block_0", x) @ ops.convert_to_numpy(projector.kernel)
    projected = projected + ops.convert_to_numpy(projector.bias)
    mse = np.mean((projected - _features(teacher, "block_0", x)) ** 2)
    expected = oracle_loss(y, _logits(student, x), _logits(teacher, x), 4.0, 0.3) + 0.5 * mse
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_features_of_other_token_counts_are_pooled_to_the_width():
    teacher = models.resnet((8, 8, 1), 10, depth=1, width=8)
    student = models.mlp((8, 8, 1), 10, depth=1, width=8, dropout=0.0)
    distiller = distill.Distiller(teacher, student, features=[("stage_0_block_0", "block_0")])
    distiller.compile(optimizer="adam")
    x, y = _digits_like(16)
    loss = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"]
    projector = distiller.projectors[0]
    teacher_pooled = _features(teacher, "stage_0_block_0", x).mean(axis=(1, 2))  # (16, 8)
    projected = _features(student, "block_0", x) @ ops.convert_to_numpy(projector.kernel)
    mse = np.mean((projected + ops.convert_to_numpy(projector.bias) - teacher_pooled) ** 2)
    expected = oracle_loss(y, _logits(student, x), _logits(teacher, x), 4.0, 0.5) + mse
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_auto_features_pair_what_the_heads_read_past_dropout():
    teacher = models.vit((8, 8, 1), 10, depth=1, width=16, dropout=0.1)
    student = models.resnet((8, 8, 1), 10, depth=1, width=8)
    # The layers each head's Dense reads, found from the graph by hand.
    assert teacher.get_layer("head").input is teacher.get_layer("head_dropout").output
    assert teacher.get_layer("head_dropout").input is teacher.get_layer("pool").output
    assert student.get_layer("head").input is student.get_layer("pool").output
    distiller = distill.Distiller(teacher, student, features="auto")
    assert distiller.features == [("pool", "pool")]
    widths = (
        student.get_layer("pool").output.shape[-1],
        teacher.get_layer("pool").output.shape[-1],
    )
    assert tuple(distiller.projectors[0].kernel.shape) == widths
    with pytest.raises(ValueError, match=r"`features` must be None, 'auto' or a list"):
        distill.Distiller(teacher, student, features="pool")


def _tiled(x):
    return ops.tile(x, (1, 2, 2, 1))


def test_the_run_checkpoint_of_a_distiller_is_its_trained_student(tmp_path):
    """`best.keras` holds the student as trained, on every backend (on JAX
    the trained state lives in the distiller until its callbacks sync it)."""
    teacher, student = _pair()
    initial = _numpy_weights(student)
    distiller = distill.Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    path = str(tmp_path / "best.keras")
    checkpoint = hlkeras.training.AtomicModelCheckpoint(
        path, checkpoint_of=lambda trained: trained.student, monitor="loss"
    )
    x, y = _digits_like()
    distiller.fit(x, y, epochs=1, batch_size=8, callbacks=[checkpoint], verbose=0)
    saved = keras.saving.load_model(path)
    assert [w.path for w in saved.weights] == [w.path for w in student.weights]
    for value, trained, before in zip(_numpy_weights(saved), _numpy_weights(student), initial):
        np.testing.assert_array_equal(value, trained)
    assert any(not np.array_equal(a, b) for a, b in zip(_numpy_weights(saved), initial))


def test_a_distillers_weights_file_is_its_students(tmp_path):
    """What KerasTuner's checkpoint writes during fit (`save_weights` of the
    model being fit) loads into a fresh copy of the student, on every backend."""
    teacher, student = _pair()
    distiller = distill.Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    path = str(tmp_path / "trial.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
    x, y = _digits_like()
    distiller.fit(x, y, epochs=1, batch_size=8, callbacks=[checkpoint], verbose=0)
    fresh = models.mlp((8, 8, 1), 10, depth=1, width=8, dropout=0.0)
    fresh.load_weights(path)
    for value, trained in zip(_numpy_weights(fresh), _numpy_weights(student)):
        np.testing.assert_array_equal(value, trained)
    before = _numpy_weights(teacher)
    distiller.load_weights(path)  # into the student; the teacher is left as it is
    for value, kept in zip(_numpy_weights(teacher), before):
        np.testing.assert_array_equal(value, kept)


def test_teacher_input_is_the_teachers_view_only():
    teacher, student = _pair(teacher_shape=(16, 16, 1))
    distiller = distill.Distiller(teacher, student, teacher_input=_tiled, alpha=0.2)
    distiller.compile(optimizer="adam")
    x, y = _digits_like(16)
    loss = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"]
    teacher_logits = _logits(teacher, np.tile(x, (1, 2, 2, 1)))
    expected = oracle_loss(y, _logits(student, x), teacher_logits, 4.0, 0.2)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="incompatible|shapes|expected"):
        keras.distillation.Distiller(
            teacher, student, keras.distillation.LogitsDistillation(4.0)
        )  # what Keras' own class says to such a pair


def test_cached_teacher_logits_train_as_fresh_ones():
    teacher, student = _pair()
    x, y = _digits_like(48)
    histories = []
    for cache in (False, True):
        copy = keras.models.clone_model(student)
        copy.set_weights(student.get_weights())
        distiller = distill.Distiller(teacher, copy, cache_teacher=cache)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1))
        histories.append(
            distiller.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0).history["loss"]
        )
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    cached = distill.Distiller(teacher, student, cache_teacher=True).teacher_logits(x)
    np.testing.assert_allclose(cached, _logits(teacher, x), rtol=1e-5, atol=1e-6)


def test_train_on_batch_takes_cached_teacher_logits_as_arrays():
    teacher, student = _pair()
    x, y = _digits_like(16)
    distiller = distill.Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))  # the loss before any update
    cached = {"labels": y, "teacher_logits": distiller.teacher_logits(x)}
    loss = distiller.train_on_batch(x, cached)
    expected = oracle_loss(y, _logits(student, x), _logits(teacher, x), 4.0, 0.5)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_a_moe_teachers_auxiliary_losses_stay_out_and_the_students_stay_in():
    inputs = keras.Input((6,))
    moe = hlkeras.layers.MixtureOfExperts(4, 8, load_balance_weight=1.0, name="moe")
    logits = keras.layers.Dense(3, name="head")(moe(inputs))
    outputs = keras.layers.Activation("softmax", name="probabilities")(logits)
    with_moe = keras.Model(inputs, outputs)
    plain_inputs = keras.Input((6,))
    plain_logits = keras.layers.Dense(3, name="head")(plain_inputs)
    plain = keras.Model(plain_inputs, keras.layers.Activation("softmax")(plain_logits))
    x, y = RNG.normal(size=(16, 6)).astype("float32"), RNG.integers(0, 3, size=16)
    expected = oracle_loss(y, _logits(plain, x), _logits(with_moe, x), 4.0, 0.5)
    distiller = distill.Distiller(with_moe, plain)
    distiller.compile(optimizer="adam")
    loss = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    # As the student, the MoE's load-balance loss is part of the loss.
    reverse = distill.Distiller(plain, with_moe)
    reverse.compile(optimizer="adam")
    loss = reverse.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"]
    assert loss > oracle_loss(y, _logits(with_moe, x), _logits(plain, x), 4.0, 0.5) + 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0}, r"`temperature` must be a number > 0.*temperature=0"),
        ({"alpha": 1.5}, r"`alpha` must be a float in \[0, 1\].*alpha=1.5"),
        ({"features": [("block_9", "block_0")]}, "teacher layer 'block_9'.*block_0.*head"),
        ({"features": [("block_0", "nothing")]}, "student layer 'nothing'.*stem"),
        ({"teacher_input": 3}, "`teacher_input` must be callable"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    teacher, student = _pair()
    with pytest.raises(ValueError, match=message):
        distill.Distiller(teacher, student, **kwargs)


def test_a_teacher_of_other_classes_and_a_dataset_to_cache_are_refused():
    teacher = models.mlp((8, 8, 1), 5, depth=1, width=8)
    _, student = _pair()
    with pytest.raises(ValueError, match="has 5 classes and the student 'mlp' 10"):
        distill.Distiller(teacher, student)
    distiller = distill.Distiller(*_pair(), cache_teacher=True)
    distiller.compile(optimizer="adam")
    with pytest.raises(ValueError, match="cache_teacher=True, fit takes NumPy arrays"):
        distiller.fit([[0.0]], [0])


def test_the_module_docstring_example_runs():
    import doctest

    globs = {"hlkeras": hlkeras, "keras": keras, "np": np, **vars(distill)}
    failures, tried = doctest.testmod(distill, globs=globs)
    assert tried > 0 and failures == 0
