"""hlkeras: modern hidden layers for Keras 3 on TensorFlow, JAX and PyTorch.

`import hlkeras` registers every serializable hlkeras object (the layers and
the learning-rate schedule), so `keras.saving.load_model` reads hlkeras
models after it. The other submodules (`hlkeras.models`, `hlkeras.lora`, and
the TensorFlow-only `hlkeras.data` and `hlkeras.export`) load on first use.
"""

import importlib

__version__ = "0.1.0"

from hlkeras import layers  # noqa: E402,F401  (registers the layers)
from hlkeras import training  # noqa: E402,F401  (registers WarmupCosine)
from hlkeras._validation import HlkerasWarning  # noqa: E402,F401

_LAZY_SUBMODULES = (
    "cli",
    "data",
    "diagnostics",
    "distill",
    "export",
    "lora",
    "models",
    "predict",
    "prune",
    "search",
)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"hlkeras.{name}")
    raise AttributeError(f"module 'hlkeras' has no attribute {name!r}")
