"""Every layer module's docstring examples run, as doctests, on every
backend: the `Example:` sections of the layer contract."""

import doctest

import keras
import pytest

from hlkeras.layers import attention
from hlkeras.layers import embeddings
from hlkeras.layers import lora_dense
from hlkeras.layers import moe
from hlkeras.layers import pooling
from hlkeras.layers import residual
from hlkeras.layers import transformer

MODULES = (attention, embeddings, lora_dense, moe, pooling, residual, transformer)


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_docstring_examples_run(module):
    globs = {"keras": keras, **{name: getattr(module, name) for name in dir(module)}}
    failures, tried = doctest.testmod(
        module, globs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert tried > 0, f"{module.__name__} has no docstring example"
    assert failures == 0
