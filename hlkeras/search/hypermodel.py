"""`SpecHyperModel`: KerasTuner's `hp` -> a `hlkeras.models.build` spec plus
the training hyperparameters (`lr`, `weight_decay`, `batch_size`)."""

import math

import keras_tuner as kt

from hlkeras import models
from hlkeras import training
from hlkeras.search.space import declare
from hlkeras.search.space import load_space
from hlkeras.search.space import resolve_space
from hlkeras.search.space import space_arch
from hlkeras.search.space import split_arch_values


class SpecHyperModel(kt.HyperModel):
    """A KerasTuner `HyperModel` for one hlkeras architecture.

    `build(hp)` samples the space, builds `hlkeras.models.build(spec)` and
    compiles it with AdamW at the sampled `lr` and `weight_decay` (warmup +
    cosine over `epochs` when `num_train` and `epochs` are given, so trials
    train like `hlkeras train`). `fit` trains with the sampled `batch_size`,
    so `x`/`y` are arrays (e.g. from `hlkeras.data.to_numpy`).

    Args:
        arch: A key of `SEARCH_SPACES` (`"mlp"`, `"resnet"`, `"vit"`), or
            several joined by commas (`"mlp,resnet,vit"`): then `arch` is a
            hyperparameter too (see `hlkeras.search.space.resolve_space`).
        input_shape: The images' shape without the batch axis.
        num_classes: Positive int.
        space: Overrides in user notation (dict), or None for the defaults.
        num_train: Number of training examples (for the schedule length).
        epochs: Epochs of a full trial (for the schedule length).
        fixed_spec: Spec entries every trial gets and the search never
            varies, e.g. a table's `feature_mean` / `feature_variance`.
        teacher: Optional trained `keras.Model`: every trial's model is then a
            student it distils (`hlkeras.distill.Distiller`), and what the
            tuner checkpoints and reloads is the student.
        temperature, alpha: The distillation's, with a `teacher`.

    Example:

    >>> hypermodel = SpecHyperModel("mlp", (8, 8, 1), 10, space={"depth": 1, "width": 32})
    >>> model = hypermodel.build(keras_tuner.HyperParameters())
    >>> model.name
    'mlp'
    """

    def __init__(
        self,
        arch,
        input_shape,
        num_classes,
        space=None,
        *,
        num_train=None,
        epochs=None,
        fixed_spec=None,
        teacher=None,
        temperature=4.0,
        alpha=0.5,
    ):
        super().__init__(name=f"hlkeras_{arch.replace(',', '_')}")
        space_arch({"arch": arch})
        self.arch = arch
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.space = resolve_space(arch, load_space(space))
        self.num_train = num_train
        self.epochs = epochs
        self.fixed_spec = dict(fixed_spec or {})
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def declare_hyperparameters(self, hp):
        self.values(hp)

    def values(self, hp):
        """`{key: value}` of this hypermodel's space, declared on `hp`. Over
        several archs, `arch` comes first and each arch's own keys
        (`"vit.depth"`) are conditional on it, so only the chosen arch's
        keys are active (and returned)."""
        values = {}
        if "arch" in self.space:
            values["arch"] = declare(hp, "arch", self.space["arch"])
        for key, entry in self.space.items():
            name, _, _ = key.rpartition(".")
            if key == "arch":
                continue
            if not name:
                values[key] = declare(hp, key, entry)
                continue
            with hp.conditional_scope("arch", [name]):
                value = declare(hp, key, entry)
            if hp.is_active(key):
                values[key] = value
        return values

    def spec(self, values):
        """The resolved `hlkeras.models` spec for a dict of sampled values."""
        arch, model_values = split_arch_values(values)
        spec = {
            "arch": arch or self.arch,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }
        spec.update(self.fixed_spec)
        spec.update(model_values)
        return models.resolve_spec(spec)

    def build(self, hp):
        values = self.values(hp)
        model = models.build(self.spec(values))
        schedule = {}
        if self.num_train and self.epochs:
            steps_per_epoch = math.ceil(self.num_train / values["batch_size"])
            schedule = {
                "total_steps": steps_per_epoch * self.epochs,
                "warmup_steps": steps_per_epoch,
            }
        return training.compile_model(
            model,
            learning_rate=values["lr"],
            weight_decay=values["weight_decay"],
            **schedule,
        )

    def fit(self, hp, model, *args, **kwargs):
        batch_size = hp.get("batch_size")
        steps_per_epoch = math.ceil((self.num_train or len(args[0])) / batch_size)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += trial_pruning(hp.values, steps_per_epoch)
        trained = self.trained_model(model)
        if trained is not model:
            # The student's optimizer, with the trial's learning-rate schedule.
            trained.compile(optimizer=model.optimizer, metrics=["accuracy"])
        return trained.fit(*args, batch_size=batch_size, callbacks=callbacks, **kwargs)

    def trained_model(self, model):
        """What `fit` trains for `model`: the model, or with a `teacher` the
        `Distiller` of which it is the student."""
        if self.teacher is None:
            return model
        from hlkeras import distill

        return distill.Distiller(
            self.teacher, model, temperature=self.temperature, alpha=self.alpha
        )


def trial_pruning(values, steps_per_epoch):
    """The callbacks a trial's `sparsity` value adds: `hlkeras.prune.Pruning`
    rising to it over the first epoch (ten mask updates), so that every
    epoch's checkpoint (the one the tuner keeps, the device budget measures
    and the retraining copies) has the full sparsity."""
    sparsity = values.get("sparsity") or 0.0
    if not sparsity:
        return []
    from hlkeras import prune

    frequency = max(1, steps_per_epoch // 10)
    end_step = frequency * max(1, steps_per_epoch // frequency)
    return [prune.Pruning(sparsity, end_step=end_step, frequency=frequency)]
