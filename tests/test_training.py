"""hlkeras.training: the schedule against its formula, compilation, the
run-directory callbacks (history, best checkpoint, NaN stop, resume)."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_testing import heavy

from hlkeras import models
from hlkeras import training


def _reference_rate(step, peak, total, warmup, final):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 7])
def test_warmup_cosine_matches_formula(warmup):
    schedule = training.WarmupCosine(
        2e-3, total_steps=50, warmup_steps=warmup, final_learning_rate=1e-5
    )
    for step in [0, 1, 6, 7, 8, 25, 49, 50, 80]:
        expected = _reference_rate(step, 2e-3, 50, warmup, 1e-5)
        actual = float(keras.ops.convert_to_numpy(schedule(step)))
        assert actual == pytest.approx(expected, rel=1e-5), step


def test_warmup_cosine_serializes():
    schedule = training.WarmupCosine(1e-3, total_steps=10, warmup_steps=2)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(revived, training.WarmupCosine)
    assert revived.get_config() == schedule.get_config()


@pytest.mark.neutral
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"peak_learning_rate": 0.0, "total_steps": 10}, "peak_learning_rate"),
        ({"peak_learning_rate": 1e-3, "total_steps": 0}, "total_steps"),
        ({"peak_learning_rate": 1e-3, "total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
    ],
)
def test_warmup_cosine_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        training.WarmupCosine(**kwargs)


def test_compile_model_uses_adamw_and_the_schedule():
    model = models.mlp((4,), 3, depth=1, width=8)
    training.compile_model(
        model, learning_rate=3e-3, weight_decay=0.01, clipnorm=1.0, total_steps=20, warmup_steps=2
    )
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.weight_decay == pytest.approx(0.01) and optimizer.clipnorm == 1.0
    assert isinstance(optimizer._learning_rate, training.WarmupCosine)
    assert optimizer._learning_rate.peak_learning_rate == pytest.approx(3e-3)
    with pytest.raises(ValueError, match="`learning_rate`"):
        training.compile_model(model, learning_rate=-1.0)


def _toy_datasets(num=64, batch=16, poison=False):
    rng = np.random.default_rng(0)
    x = rng.random((num, 4)).astype("float32")
    y = (x[:, 0] > 0.5).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    val = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(batch)
    return train, val


def _toy_model():
    return models.mlp((4,), 2, depth=1, width=8, dropout=0.0)


def _weights(model):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]


@heavy
def test_compile_and_fit_writes_history_curves_and_best(tmp_path):
    train, val = _toy_datasets()
    run_dir = str(tmp_path)
    result = training.compile_and_fit(
        _toy_model(),
        train,
        val,
        run_dir=run_dir,
        epochs=3,
        learning_rate=1e-2,
        warmup_epochs=1,
        verbose=0,
    )
    rows = training.read_history_rows(os.path.join(run_dir, "history.csv"))
    assert rows == result.rows and [r["epoch"] for r in rows] == [0, 1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(rows[0])
    # The logged rate is the schedule after each epoch's 4 steps.
    for row in rows:
        step = 4 * (row["epoch"] + 1)
        assert row["learning_rate"] == pytest.approx(
            _reference_rate(step, 1e-2, 12, 4, 0.0), abs=1e-7
        )
    with open(os.path.join(run_dir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    best_epoch = min(rows, key=lambda r: r["val_loss"])
    best = keras.saving.load_model(result.best_path)
    assert best.evaluate(val, verbose=0)[0] == pytest.approx(best_epoch["val_loss"], rel=1e-4)
    assert result.nan_epoch is None
    # Finished cleanly: no backup left, no temporary files.
    assert sorted(os.listdir(run_dir)) == ["best.keras", "curves.png", "history.csv"]


@pytest.mark.parametrize("patience", [1, 2])
def test_training_stops_after_patience_epochs_without_improvement(tmp_path, patience):
    # A frozen model's val_loss is the same every epoch: epoch 0 sets the
    # best, and EarlyStopping ends the run `patience` epochs later.
    train, val = _toy_datasets()
    model = _toy_model()
    model.trainable = False
    result = training.compile_and_fit(
        model, train, val, run_dir=str(tmp_path), epochs=8, patience=patience, verbose=0
    )
    assert len(result.rows) == 1 + patience


@heavy
def test_tensorboard_writes_event_files_to_run_dir_logs(tmp_path):
    train, val = _toy_datasets()
    training.compile_and_fit(
        _toy_model(), train, val, run_dir=str(tmp_path), epochs=1, tensorboard=True, verbose=0
    )
    events = [
        name
        for _, _, names in os.walk(tmp_path / "logs")
        for name in names
        if name.startswith("events.out.tfevents")
    ]
    assert events, "no TensorBoard event file under logs/"


class _PoisonAtEpoch(keras.callbacks.Callback):
    """Remembers the weights after epoch 0, then makes them NaN at epoch 1."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.weights_after_first_epoch = _weights(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            for variable in self.model.trainable_variables:
                variable.assign(keras.ops.full(variable.shape, float("nan")))


@heavy
def test_nan_loss_stops_and_keeps_the_best_checkpoint(tmp_path):
    train, val = _toy_datasets()
    poison = _PoisonAtEpoch()
    result = training.compile_and_fit(
        _toy_model(),
        train,
        val,
        run_dir=str(tmp_path),
        epochs=5,
        verbose=0,
        extra_callbacks=[poison],
    )
    assert result.nan_epoch == 1
    assert len(result.rows) == 2  # stopped in the NaN epoch
    best = keras.saving.load_model(result.best_path)
    for kept, expected in zip(_weights(best), poison.weights_after_first_epoch):
        np.testing.assert_array_equal(kept, expected)
    message = training.nan_message(result)
    assert "NaN in epoch 2" in message and result.best_path in message


class _KillAtEpoch(keras.callbacks.Callback):
    """Stands in for SIGKILL: raises at the start of `epoch`, so Keras never
    runs `on_train_end` (which would delete the backup)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.last_weights = _weights(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class _RecordStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.start_weights = _weights(self.model)
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@heavy
def test_killed_run_resumes_from_last_finished_epoch(tmp_path):
    train, val = _toy_datasets()
    run_dir = str(tmp_path)
    kill = _KillAtEpoch(2)
    with pytest.raises(KeyboardInterrupt):
        training.compile_and_fit(
            _toy_model(), train, val, run_dir=run_dir, epochs=4, verbose=0, extra_callbacks=[kill]
        )
    assert os.path.exists(os.path.join(run_dir, "backup"))
    record = _RecordStart()
    result = training.compile_and_fit(
        _toy_model(), train, val, run_dir=run_dir, epochs=4, verbose=0, extra_callbacks=[record]
    )
    assert record.epochs == [2, 3]
    for restored, expected in zip(record.start_weights, kill.last_weights):
        np.testing.assert_array_equal(restored, expected)
    assert [row["epoch"] for row in result.rows] == [0, 1, 2, 3]


@pytest.mark.neutral
def test_history_csv_drops_rows_a_resume_reruns(tmp_path):
    path = str(tmp_path / "history.csv")
    training.write_history_rows(path, [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(4)])
    history = training.HistoryCSV(path)
    history.on_train_begin()
    history.on_epoch_begin(2)
    history.on_epoch_end(2, {"loss": 0.25})
    rows = training.read_history_rows(path)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[2]["loss"] == 0.25 and rows[1]["loss"] == 0.5


@pytest.mark.neutral
def test_plot_history_accepts_keras_history_dict(tmp_path):
    path = str(tmp_path / "curves.png")
    training.plot_history(
        {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]}, path
    )
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["curves.png"]
