"""hlkeras: modern hidden layers for Keras 3 on TensorFlow, JAX and PyTorch.

Submodules load on first use (`hlkeras.layers`, `hlkeras.models`, ...), so
`import hlkeras` and the `hlkeras` CLI start without importing Keras, and
TensorFlow-only modules (`hlkeras.data`, `hlkeras.export`) load only when a
program asks for them.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "cli", "data", "export", "hypermodels", "layers", "lora", "models", "training"
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"hlkeras.{name}")
    raise AttributeError(f"module 'hlkeras' has no attribute {name!r}")
