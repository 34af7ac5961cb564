"""hlkeras: modern hidden layers for Keras 3 on TensorFlow, JAX and PyTorch.

The package root stays light: importing `hlkeras` imports keras and the
layers, never TensorFlow-only modules such as `hlkeras.data` or
`hlkeras.export`, so the layers keep working on every backend.
"""

__version__ = "0.1.0"

from hlkeras import layers  # noqa: E402,F401
