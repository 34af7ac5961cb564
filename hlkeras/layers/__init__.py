"""The hlkeras custom layers. Each family lives in its own module."""

from hlkeras.layers.residual import ConvResidualBlock
from hlkeras.layers.residual import DropPath
from hlkeras.layers.residual import ResidualBlock

__all__ = ["ConvResidualBlock", "DropPath", "ResidualBlock"]

from hlkeras.layers.lora import LoRADense  # noqa: E402

__all__ += ["LoRADense"]
