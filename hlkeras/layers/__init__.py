"""The hlkeras custom layers. Each family lives in its own module."""

from hlkeras.layers.residual import ConvResidualBlock
from hlkeras.layers.residual import DropPath
from hlkeras.layers.residual import ResidualBlock
from hlkeras.layers.moe import MixtureOfExperts

__all__ = ["ConvResidualBlock", "DropPath", "ResidualBlock"]
__all__ += ["MixtureOfExperts"]
