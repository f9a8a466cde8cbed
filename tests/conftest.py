"""Shared test setup.

Without a CUDA GPU the Triton kernels run on CPU tensors through Triton's interpreter, which has to be
switched on before anything imports triton (densenet_fused does, and so do torch._dynamo/_inductor).
"""

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The torch.hub cache of generated checkpoints (fixtures hub_cache, torch_home): it imports torchvision, which
# imports triton, so only after TRITON_INTERPRET is set.
from hub_cache import hub_cache, torch_home  # noqa: E402, F401


@pytest.fixture
def no_fallback(monkeypatch):
    """Make the launchers' reference fallback raise, so a test cannot pass on the reference silently."""
    from densenet_fused.ops import PRIMITIVES  # when used, not when pytest loads conftest

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher fell back to the reference")

    for primitive in PRIMITIVES.values():
        for op in primitive.ops.values():
            monkeypatch.setattr(inspect.getmodule(op.reference), op.reference.__name__, fail)
