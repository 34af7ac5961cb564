"""The hlkeras custom layers. Each family lives in its own module."""

from hlkeras.layers.attention import MultiHeadAttention
from hlkeras.layers.embeddings import PositionEmbedding
from hlkeras.layers.lora_dense import LoRADense
from hlkeras.layers.moe import MixtureOfExperts
from hlkeras.layers.pooling import AttentionPooling
from hlkeras.layers.residual import ConvResidualBlock
from hlkeras.layers.residual import DropPath
from hlkeras.layers.residual import ResidualBlock
from hlkeras.layers.transformer import FeedForward
from hlkeras.layers.transformer import TransformerBlock

__all__ = [
    "AttentionPooling",
    "ConvResidualBlock",
    "DropPath",
    "FeedForward",
    "LoRADense",
    "MixtureOfExperts",
    "MultiHeadAttention",
    "PositionEmbedding",
    "ResidualBlock",
    "TransformerBlock",
]
