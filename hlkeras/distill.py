"""Knowledge distillation: a frozen teacher trains a smaller student through
`compile`/`fit` on every backend.

`Distiller` is a `keras.Model` in the spirit of `keras.distillation.Distiller`
(the student's supervised loss blended with the temperature-scaled KL to the
teacher, Hinton et al. 2015), and it checks its pair against that class's
formula in `tests/test_distill.py`. It is not a subclass, because Keras'
class stops where hlkeras models begin:
- it requires identical input shapes, so a teacher that sees another view
  of the batch (16x16 images for an 8x8 student) is refused; here
  `teacher_input` maps the batch for the teacher;
- it distils the models' *outputs* as logits, and hlkeras models (like most
  classifiers saved for inference) end in a softmax, so its
  `LogitsDistillation` would soften probabilities, `softmax(p / T)`,
  without an error; here both models are read before their final softmax;
- its feature distillation needs layers of equal width; here a learned
  linear projector maps the student's features to the teacher's width
  (pooling over tokens or space where their counts differ);
- it recomputes the teacher every step; `cache_teacher=True` computes it
  once per training example;
- the student's own auxiliary losses (a MoE student's load balance) are
  dropped by its loss; here they are kept, and the teacher's never enter.

Example:

>>> teacher = hlkeras.models.mlp((8, 8, 1), 10, depth=2, width=64)
>>> student = hlkeras.models.mlp((8, 8, 1), 10, depth=1, width=8)
>>> distiller = Distiller(teacher, student, temperature=4.0, alpha=0.5)
>>> distiller.compile(optimizer="adam", metrics=["accuracy"])
>>> x, y = np.zeros((4, 8, 8, 1), "float32"), np.arange(4)
>>> history = distiller.fit(x, y, epochs=1, verbose=0)
>>> distiller.student is student
True
"""

import keras
import numpy as np
from keras import ops

from hlkeras import _validation

PROBABILITIES = "softmax"


def check_temperature(temperature):
    if not _validation.is_number(temperature) or not temperature > 0:
        raise ValueError(
            f"Argument `temperature` must be a number > 0. Received: temperature={temperature!r}"
        )
    return float(temperature)


def check_alpha(alpha):
    if not _validation.is_number(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"Argument `alpha` must be a float in [0, 1]. Received: alpha={alpha!r}")
    return float(alpha)


def distillation_loss(y_true, student_logits, teacher_logits, *, temperature, alpha):
    """The distillation loss, averaged over the batch:
    `alpha * CE(y, softmax(s)) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))`.

    Args:
        y_true: Integer labels `(batch,)` or one-hot `(batch, classes)`.
        student_logits, teacher_logits: `(batch, classes)` logits.
        temperature: `T > 0`.
        alpha: The weight in [0, 1] of the supervised cross-entropy.

    Returns:
        A scalar.
    """
    temperature, alpha = check_temperature(temperature), check_alpha(alpha)
    student_logits = ops.cast(student_logits, "float32")
    teacher_logits = ops.cast(teacher_logits, "float32")
    # log_softmax rather than Keras' KLDivergence, which clips probabilities
    # to [1e-7, 1]: a confident teacher's T^2-scaled KL would change.
    log_student = ops.log_softmax(student_logits, axis=-1)
    if len(y_true.shape) == len(student_logits.shape):
        labels = ops.cast(y_true, "float32")
    else:
        labels = ops.one_hot(
            ops.cast(ops.reshape(y_true, (-1,)), "int32"), student_logits.shape[-1]
        )
    cross_entropy = -ops.sum(labels * log_student, axis=-1)
    log_teacher_soft = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_student_soft = ops.log_softmax(student_logits / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_teacher_soft) * (log_teacher_soft - log_student_soft), axis=-1)
    return ops.mean(alpha * cross_entropy + (1 - alpha) * temperature**2 * kl)


def logits_layer_output(model):
    """The symbolic logits of a functional `model`: the input of its final
    softmax `Activation` when it ends in one, else its output."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Activation) and _is_softmax(last.activation):
        return last.input
    return model.outputs[0]


def _is_softmax(activation):
    return getattr(activation, "__name__", "") == PROBABILITIES


AUTO_FEATURES = "auto"


def head_input_layer(model):
    """The name of the top-level layer whose output `model`'s classification
    head reads (its pooled features), past any `Dropout` before the head:
    the pair `features="auto"` distils."""
    head = logits_layer_output(model)._keras_history.operation
    (feature,) = head._inbound_nodes[0].input_tensors
    layer = feature._keras_history.operation
    while isinstance(layer, keras.layers.Dropout):
        (feature,) = layer._inbound_nodes[0].input_tensors
        layer = feature._keras_history.operation
    return layer.name


def _feature_pairs(teacher, student, features):
    if features == AUTO_FEATURES:
        return [(head_input_layer(teacher), head_input_layer(student))]
    if isinstance(features, str):
        raise ValueError(
            f"Argument `features` must be None, {AUTO_FEATURES!r} or a list of "
            f"(teacher_layer, student_layer) pairs. Received: features={features!r}"
        )
    return [tuple(pair) for pair in features or ()]


def _feature_output(model, path, argument):
    """The symbolic output of the top-level layer `path` of `model`."""
    names = [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if path not in names:
        raise ValueError(
            f"Argument `features`: {argument} layer {path!r} is not a layer of model "
            f"'{model.name}'. Its layers: {_validation.few(names)}"
        )
    return model.get_layer(path).output


def _as_list(outputs):
    # A functional model built with a one-element output list returns a tensor.
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _pooled(features, keep_tokens):
    """`features` as `(batch, tokens, width)` when `keep_tokens`, else the mean
    over every axis between the batch and the width."""
    if keep_tokens or len(features.shape) == 2:
        return features
    return ops.mean(features, axis=tuple(range(1, len(features.shape) - 1)))


class Distiller(keras.Model):
    """A frozen teacher trains `student` through `compile`/`fit`.

    The loss is `distillation_loss(y, student_logits, teacher_logits)` (the
    logits read before each model's final softmax) plus, for each pair of
    `features`, `feature_weight` times the mean squared error between the
    teacher's features and the student's projected to the teacher's width,
    plus the student's own auxiliary losses. The teacher runs with
    `training=False` and is frozen (`teacher.trainable = False`, as in
    Keras' Distiller), and its auxiliary losses are left out. Compile with
    an optimizer and metrics only (the loss is this one):
    `distiller.compile(optimizer="adam", metrics=["accuracy"])`.

    Args:
        teacher: A trained functional `keras.Model`.
        student: A functional `keras.Model` with the teacher's classes. It
            is trained in place, and `distiller.student` is the plain model
            to save and export.
        temperature: `T > 0`, the softening of both distributions.
        alpha: Weight in [0, 1] of the supervised cross-entropy.
        features: Pairs `(teacher_layer, student_layer)` of top-level layer
            names whose outputs are distilled too, or `"auto"`: the pair of
            layers the two heads read (`head_input_layer`). When the two differ in
            rank or token/spatial counts both are mean-pooled to
            `(batch, width)`; a `Dense` projector (part of the distiller, not
            the student) maps the student's width to the teacher's.
        feature_weight: The weight of each feature loss.
        teacher_input: Optional function of the batch's inputs giving the
            teacher's inputs (another resolution, another tokenizer's ids).
        cache_teacher: Compute the teacher's logits once for the training
            arrays `fit` gets and reuse them every epoch (arrays only, no
            augmentation; feature pairs still run the teacher).
        **kwargs: `keras.Model` arguments such as `name`.

    Call arguments:
        inputs: The student's inputs. `call` returns the student's logits
            (and features); predict with `distiller.student`.
    """

    def __init__(
        self,
        teacher,
        student,
        *,
        temperature=4.0,
        alpha=0.5,
        features=None,
        feature_weight=1.0,
        teacher_input=None,
        cache_teacher=False,
        **kwargs,
    ):
        super().__init__(**{"name": "distiller", **kwargs})
        for argument, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
                raise ValueError(
                    f"Argument `{argument}` must be a functional or Sequential keras.Model. "
                    f"Received: {argument}={model!r}"
                )
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.feature_weight = _validation.check_non_negative("feature_weight", feature_weight)
        if teacher_input is not None and not callable(teacher_input):
            raise ValueError(
                f"Argument `teacher_input` must be callable. Received: {teacher_input!r}"
            )
        self.teacher_input = teacher_input
        self.cache_teacher = bool(cache_teacher)
        self.teacher = teacher
        self.student = student
        teacher.trainable = False
        self.features = _feature_pairs(teacher, student, features)
        teacher_features = [_feature_output(teacher, t, "teacher") for t, _ in self.features]
        student_features = [_feature_output(student, s, "student") for _, s in self.features]
        self._teacher_outputs = keras.Model(
            teacher.inputs, [logits_layer_output(teacher), *teacher_features]
        )
        self._student_outputs = keras.Model(
            student.inputs, [logits_layer_output(student), *student_features]
        )
        self._check_classes()
        self._keep_tokens = [
            tuple(t.shape[1:-1]) == tuple(s.shape[1:-1])
            for t, s in zip(teacher_features, student_features)
        ]
        self.projectors = [
            keras.layers.Dense(t.shape[-1], name=f"projector_{i}")
            for i, t in enumerate(teacher_features)
        ]
        for projector, feature in zip(self.projectors, student_features):
            projector.build((None, feature.shape[-1]))
        self._teacher_logits_cache = None
        # Every part is built (the two functional models, the projectors), so
        # the distiller is too: `BackupAndRestore` refuses an unbuilt model.
        self.built = True

    def _check_classes(self):
        teacher_classes = self._teacher_outputs.outputs[0].shape[-1]
        student_classes = self._student_outputs.outputs[0].shape[-1]
        if teacher_classes != student_classes:
            raise ValueError(
                f"The teacher '{self.teacher.name}' has {teacher_classes} classes and the student "
                f"'{self.student.name}' {student_classes}: distillation needs the same classes"
            )

    def call(self, inputs, training=None):
        return self._student_outputs(inputs, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        labels = y["labels"] if isinstance(y, dict) else y
        return super().compute_metrics(x, labels, _as_list(y_pred)[0], sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        student_logits, *student_features = _as_list(y_pred)
        # Read before the teacher runs: the losses of `call`, the student's
        # alone (on JAX, what its stateless call collected).
        auxiliary_losses = list(self.losses)
        labels, cached = (y["labels"], y["teacher_logits"]) if isinstance(y, dict) else (y, None)
        teacher_outputs = []
        if cached is None or self.features:
            teacher_x = x if self.teacher_input is None else self.teacher_input(x)
            teacher_outputs = _as_list(self._teacher_outputs(teacher_x, training=False))
        teacher_logits = teacher_outputs[0] if cached is None else cached
        loss = distillation_loss(
            labels,
            student_logits,
            ops.stop_gradient(ops.convert_to_tensor(teacher_logits)),
            temperature=self.temperature,
            alpha=self.alpha,
        )
        for i, projector in enumerate(self.projectors):
            teacher = ops.stop_gradient(_pooled(teacher_outputs[1 + i], self._keep_tokens[i]))
            student = projector(_pooled(student_features[i], self._keep_tokens[i]))
            mse = ops.mean(ops.square(ops.cast(student, "float32") - ops.cast(teacher, "float32")))
            loss = loss + self.feature_weight * mse
        for auxiliary in auxiliary_losses:
            loss = loss + ops.cast(auxiliary, "float32")
        return loss

    def teacher_logits(self, x, batch_size=256):
        """The teacher's logits for the NumPy inputs `x` (its view of them)."""
        logits = keras.Model(self._teacher_outputs.inputs, self._teacher_outputs.outputs[0])
        view = x if self.teacher_input is None else self.teacher_input(x)
        return np.asarray(logits.predict(view, batch_size=batch_size, verbose=0))

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`; with `cache_teacher=True`, `x` and `y` must be
        arrays, and the teacher's logits are computed once for them here."""
        if not self.cache_teacher:
            return super().fit(x, y, *args, **kwargs)
        if not isinstance(x, np.ndarray) or y is None:
            raise ValueError(
                "With cache_teacher=True, fit takes NumPy arrays x and y (a dataset may "
                f"shuffle or augment, so its examples have no fixed identity). Received: "
                f"x of type {type(x).__name__}"
            )
        targets = {"labels": np.asarray(y), "teacher_logits": self.teacher_logits(x)}
        return super().fit(x, targets, *args, **kwargs)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """Saves the student's weights: the teacher is fixed and the
        projectors are training devices, so a checkpoint of the distiller
        (KerasTuner's, `BackupAndRestore`) loads into `student` alone."""
        return self.student.save_weights(filepath, overwrite=overwrite, **kwargs)

    def load_weights(self, filepath, **kwargs):
        """Loads the student's weights (see `save_weights`)."""
        return self.student.load_weights(filepath, **kwargs)

    def get_config(self):
        # The distiller is a training device: save `distiller.student`.
        raise NotImplementedError(
            "A Distiller is not saved; save `distiller.student`, the plain model it trains."
        )
