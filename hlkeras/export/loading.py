"""Loading a `.keras` file safely, and the model an export converts (LoRA
adapters merged)."""

import os
import zipfile

import numpy as np

from hlkeras import _compat
from hlkeras.export.report import ExportError


def load_keras_model(path):
    """Loads a `.keras` file with `safe_mode=True`, or raises `ExportError`.

    Safe mode refuses `Lambda` layers: their Python bytecode would run on load.
    """
    import keras

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"Model file {path} does not exist (or is not a file).")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ExportError(
            f"{path} is not a Keras model file: expected a `.keras` zip archive "
            "written by `model.save(...)`."
        )
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad archive.
        if "Lambda" in str(error):
            raise ExportError(
                f"{path} contains a `Lambda` layer, which loading refuses under "
                "safe_mode=True because it would run arbitrary Python bytecode "
                "from the file. Replace the Lambda with a registered custom "
                "layer (keras.saving.register_keras_serializable)."
            ) from None
        first_line = str(error).strip().splitlines()[0] if str(error) else ""
        hint = ""
        if "Could not locate class" in str(error):
            # Also what a JAX/torch export hits: its TF subprocess imports
            # only keras and hlkeras.
            hint = (
                " Custom layers must be registered with "
                "keras.saving.register_keras_serializable in a module imported "
                "before loading (the JAX/torch export subprocess imports only "
                "keras and hlkeras)."
            )
        raise ExportError(
            f"{path} is not a loadable Keras model: {type(error).__name__}: "
            f"{first_line[:300]}{hint}"
        ) from None


def prepare_for_export(model):
    """Returns the model to export, with LoRA adapters merged.

    `hlkeras.lora.merge_lora` folds the adapters into plain layers, so the
    artifact holds no LoRA layer and no extra matmuls. (MoE layers export in
    both modes: capacity and dropless layouts have static shapes.)
    """
    from hlkeras import lora

    if any(lora.adapter_weights(layer) for layer in model.layers):
        return lora.merge_lora(model)
    return model


def all_layers(model):
    return _compat.sublayers(model)


def kernel_sparsity(model):
    """The fraction of exact zeros over `model`'s float weights of rank >= 2
    (kernels, expert kernels, embeddings): what pruning zeroed, and what the
    sparse `.tflite` encoding can save."""
    import keras

    kernels = [
        keras.ops.convert_to_numpy(weight)
        for weight in model.weights
        if len(weight.shape) >= 2 and "float" in str(weight.dtype)
    ]
    total = sum(kernel.size for kernel in kernels)
    return float(sum(np.sum(kernel == 0) for kernel in kernels) / total) if total else 0.0
