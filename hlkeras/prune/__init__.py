"""Pruning for Keras 3 on every backend: weight sparsity, one-shot magnitude
pruning (per layer, global, or an m:n pattern such as 2:4), gradual
pruning during `fit` with tfmot's polynomial schedule, and structured
pruning (`structured`: whole hidden units, heads, experts and channels out,
a smaller model).

A pruned model here is a plain Keras model whose pruned weights are exactly
zero: no wrapper layers, so it saves, loads (`safe_mode=True`), fine-tunes,
takes LoRA adapters and exports like the model it came from. While `fit`
runs, the `Pruning` callback's masks are the kernels' constraints: the
optimizer multiplies them in after every step, inside its compiled step
(on JAX they are optimizer variables, which its stateless step carries),
so a pruned weight is zero whenever a step ends, at no Python cost per
step. The zeros are the masks' saved form: a `.keras` file or a resumed
run (`BackupAndRestore`) holds them, and `Pruning` rebuilds its masks
from them when the first batch begins.

What is pruned (the *prunable weights*): the kernels of `Dense`,
`EinsumDense`, `Conv1D/2D/3D` and `LoRADense` layers, at any depth inside
hlkeras layers and nested models, and the two expert kernels of every
`MixtureOfExperts`. Biases, norms, embeddings and MoE routers are left
alone. Layers are chosen by path, as in `hlkeras.lora`: `targets=None` (or
`"all-linear"`) takes every layer holding a prunable weight except the
head (the model's last `Dense`); a glob or a list of globs matches whole
layer paths (`"backbone/block_*"`).

The parts: `masks` (which weights, their masks, `magnitude`), `gradual`
(the schedule and the `Pruning` callback), `units` (structured pruning).

Example:

>>> model = hlkeras.models.mlp((8, 8, 1), 10, depth=1, width=32)
>>> pruned = magnitude(model, 0.75)
>>> round(sparsity(pruned), 2), round(sparsity(model), 2)
(0.75, 0.0)
"""

from hlkeras.prune.gradual import Pruning
from hlkeras.prune.gradual import polynomial_sparsity
from hlkeras.prune.masks import ALL_LINEAR
from hlkeras.prune.masks import SCOPES
from hlkeras.prune.masks import PrunableWeight
from hlkeras.prune.masks import check_sparsity
from hlkeras.prune.masks import magnitude
from hlkeras.prune.masks import magnitude_masks
from hlkeras.prune.masks import parse_pattern
from hlkeras.prune.masks import pattern_mask
from hlkeras.prune.masks import prunable_weights
from hlkeras.prune.masks import sparsity
from hlkeras.prune.masks import strip
from hlkeras.prune.units import CRITERIA
from hlkeras.prune.units import KINDS
from hlkeras.prune.units import structured

__all__ = [
    "ALL_LINEAR",
    "CRITERIA",
    "KINDS",
    "SCOPES",
    "PrunableWeight",
    "Pruning",
    "check_sparsity",
    "magnitude",
    "magnitude_masks",
    "parse_pattern",
    "pattern_mask",
    "polynomial_sparsity",
    "prunable_weights",
    "sparsity",
    "strip",
    "structured",
]
