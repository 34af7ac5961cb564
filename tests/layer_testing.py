"""The shared layer test helper: every hlkeras layer test calls
`run_layer_test`, which checks the layer contract of ARCHITECTURE.md in one go.

For a layer config and an input it checks:
- the output shape against `compute_output_shape`;
- at inference a sample's output does not depend on its batch-mates: each
  sample run alone equals its row of the batched output (the contract's
  bold rule);
- the `get_config` / `from_config` round trip;
- a functional model holding the layer saves to `.keras` and reloads with
  `safe_mode=True`, giving the same outputs;
- two `fit` steps change every trainable weight and leave the frozen
  non-trainable ones alone (two, because a zero-initialized factor such as a
  LoRA `B` gives its partner a zero gradient on the first step);
- training with `jit_compile=True` on the backends that compile (TF, JAX);
  on JAX only compiled (see `EAGER_FIT_BACKENDS`);
- a `mixed_bfloat16` copy with the same weights runs and stays close;
- on the TensorFlow backend, TFLite conversion with `TFLITE_BUILTINS` only and
  LiteRT interpreter parity (atol 1e-4 in float32).
"""

import os
import tempfile

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
ALL_BACKENDS = ("tensorflow", "jax", "torch")
# Compile-heavy layer and export tests (over the 10 s a unit test may take,
# tests/README.md) are `slow` but keep running on every backend.
HEAVY_MARKS = [pytest.mark.slow, pytest.mark.backends(*ALL_BACKENDS)]


def heavy(test):
    """Marks `test` slow (exempt from the 10 s unit-test limit) on every backend."""
    for mark in HEAVY_MARKS:
        test = mark(test)
    return test


# Torch's jit_compile is torch.compile (TorchDynamo + Inductor); compiling a
# model takes minutes on this CPU, so the jit check covers TF (XLA) and JAX.
JIT_BACKENDS = ("tensorflow", "jax")
# JAX's `jit_compile=False` runs a training step op by op, 5-6x slower than
# the traced step (13 s against 2.3 s for an MoE TransformerBlock) and with
# the same ops and gradients, so the eager fit is checked where eager is a
# mode users train in: TF (graph vs eager differ) and torch.
EAGER_FIT_BACKENDS = ("tensorflow", "torch")
# Non-trainable state that a forward pass in training mode updates by design.
RUNNING_STATISTICS = (
    "moving_mean",
    "moving_variance",  # BatchNormalization
    "routing_calls",
    "routing_dropped_total",
    "routing_load_total",  # MixtureOfExperts
)


def _as_list(inputs):
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _functional_model(layer, inputs, call_kwargs):
    symbolic = [
        keras.Input(shape=x.shape[1:], dtype=str(x.dtype), name=f"input_{i}")
        for i, x in enumerate(inputs)
    ]
    outputs = layer(*symbolic, **call_kwargs)
    return keras.Model(symbolic, outputs)


def _predict(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs, training=False))


def _weights_by_path(variables):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in variables}


def check_output_shape(layer, inputs, call_kwargs, output):
    shapes = [tuple(x.shape) for x in inputs]
    expected = layer.compute_output_shape(*shapes, **call_kwargs)
    assert tuple(output.shape) == tuple(expected), (
        f"output shape {output.shape} != compute_output_shape {expected}"
    )


def check_batch_independence(model, inputs, expected):
    """Each sample alone (batch 1, `training=False`) gives its row of the
    batched output, to float rounding (a batched matmul may sum in another
    order)."""
    tolerance = 1e-5 * (1.0 + float(np.max(np.abs(expected))))
    for i in range(len(inputs[0])):
        alone = _predict(model, [x[i : i + 1] for x in inputs])
        np.testing.assert_allclose(
            alone,
            expected[i : i + 1],
            rtol=0,
            atol=tolerance,
            err_msg=f"sample {i} alone differs from its row of the batched output",
        )


def check_config_round_trip(layer):
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer)
    assert revived.get_config() == config


def check_keras_file_round_trip(model, inputs, expected):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(_predict(reloaded, inputs), expected, rtol=0, atol=1e-6)


def check_fit_updates_only_trainable(model, inputs, jit_compile):
    target = np.random.default_rng(0).normal(size=(len(inputs[0]),) + tuple(model.output_shape[1:]))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=jit_compile)
    trainable_before = _weights_by_path(model.trainable_weights)
    frozen_before = {
        path: value
        for path, value in _weights_by_path(model.non_trainable_weights).items()
        if not path.endswith(RUNNING_STATISTICS)
    }
    assert trainable_before, "the layer has no trainable weights to fit"
    batch_size = max(1, len(inputs[0]) // 2)
    model.fit(inputs, target, batch_size=batch_size, epochs=1, verbose=0)
    trainable_after = _weights_by_path(model.trainable_weights)
    unchanged = [
        path
        for path, value in trainable_before.items()
        if np.array_equal(value, trainable_after[path])
    ]
    assert not unchanged, f"fit did not change trainable weights: {unchanged}"
    frozen_after = _weights_by_path(model.non_trainable_weights)
    changed = [
        path
        for path, value in frozen_before.items()
        if not np.array_equal(value, frozen_after[path])
    ]
    assert not changed, f"fit changed frozen weights: {changed}"


def check_mixed_bfloat16(layer, inputs, call_kwargs, expected, model):
    config = layer.get_config()
    config["dtype"] = "mixed_bfloat16"
    half_layer = layer.__class__.from_config(config)
    half_model = _functional_model(half_layer, inputs, call_kwargs)
    half_model.set_weights(model.get_weights())
    raw = _predict(half_model, inputs)
    # The layer computes under the policy (a layer that ignored it would
    # return float32 and pass any tolerance).
    assert str(raw.dtype) == "bfloat16", f"mixed_bfloat16 layer returned {raw.dtype}"
    output = raw.astype("float32")
    assert np.all(np.isfinite(output)), "mixed_bfloat16 output is not finite"
    # bfloat16 keeps 8 bits of precision (epsilon 2**-8 = 0.0039). The worst
    # error measured over every layer test on the three backends was
    # 0.0100 * (1 + max|y|) (ConvResidualBlock; attention and MoE <= 0.0064),
    # so 0.02 leaves a 2x margin.
    tolerance = 0.02 * (1.0 + float(np.max(np.abs(expected))))
    np.testing.assert_allclose(output, expected, rtol=0, atol=tolerance)


def check_tflite_parity(model, inputs, expected, atol=1e-4):
    from hlkeras import export

    tflite_model = export.model_to_tflite(model)
    if len(inputs) == 1:
        output = export.run_tflite(tflite_model, inputs[0])
    else:
        named = {tensor.name: array for tensor, array in zip(model.inputs, inputs)}
        output = export.run_tflite(tflite_model, named)
    np.testing.assert_allclose(output, expected, rtol=0, atol=atol)


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    *,
    call_kwargs=None,
    expected_output_shape=None,
    run_training_check=True,
    run_mixed_precision_check=True,
    run_tflite_check=True,
    tflite_atol=1e-4,
):
    """Checks the hlkeras layer contract for one config and one input.

    Args:
        layer_cls: The layer class.
        init_kwargs: Constructor arguments.
        input_data: A NumPy array, or a list of arrays for a layer called
            with several positional tensors (e.g. attention's query, value).
        call_kwargs: Extra keyword arguments for the call, fixed in the model.
        expected_output_shape: Optional shape the output must have.
        run_training_check: Fit two steps (eager and, where supported, jit)
            and check which weights move.
        run_mixed_precision_check: Check a `mixed_bfloat16` copy.
        run_tflite_check: On TensorFlow, convert to TFLite builtins-only and
            compare with the LiteRT interpreter.
        tflite_atol: Absolute tolerance of the TFLite parity check.

    Returns:
        The functional model holding the layer, for extra checks.
    """
    call_kwargs = dict(call_kwargs or {})
    inputs = _as_list(input_data)
    layer = layer_cls(**init_kwargs)
    model = _functional_model(layer, inputs, call_kwargs)
    expected = _predict(model, inputs)

    check_output_shape(layer, inputs, call_kwargs, expected)
    if expected_output_shape is not None:
        assert tuple(expected.shape) == tuple(expected_output_shape)
    assert np.all(np.isfinite(expected)), "float32 output is not finite"
    check_batch_independence(model, inputs, expected)
    check_config_round_trip(layer)
    check_keras_file_round_trip(model, inputs, expected)
    if run_mixed_precision_check:
        check_mixed_bfloat16(layer, inputs, call_kwargs, expected, model)
    if run_tflite_check and BACKEND == "tensorflow":
        check_tflite_parity(model, inputs, expected, atol=tflite_atol)
    if run_training_check:
        if BACKEND in EAGER_FIT_BACKENDS:
            check_fit_updates_only_trainable(model, inputs, jit_compile=False)
        if BACKEND in JIT_BACKENDS:
            jit_model = _functional_model(
                layer_cls.from_config(layer.get_config()), inputs, call_kwargs
            )
            check_fit_updates_only_trainable(jit_model, inputs, jit_compile=True)
    return model
