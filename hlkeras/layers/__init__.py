"""The hlkeras custom layers. Each family lives in its own module."""

from hlkeras.layers.attention import MultiHeadAttention
from hlkeras.layers.attention import PositionEmbedding
from hlkeras.layers.attention import TransformerBlock
from hlkeras.layers.lora import LoRADense
from hlkeras.layers.moe import MixtureOfExperts
from hlkeras.layers.residual import ConvResidualBlock
from hlkeras.layers.residual import DropPath
from hlkeras.layers.residual import ResidualBlock

__all__ = [
    "ConvResidualBlock",
    "DropPath",
    "LoRADense",
    "MixtureOfExperts",
    "MultiHeadAttention",
    "PositionEmbedding",
    "ResidualBlock",
    "TransformerBlock",
]
