"""Stand-ins for the few helpers the peer tests import from their projects' own test utilities."""

import contextlib
import random

import pytest
import torch

CUDA = torch.cuda.is_available()

# timm's pretrained cases (test_timm_models.py), the only download cases still skipped: timm fetches its
# weights from the Hugging Face Hub, which CI cannot reach and the generated torch.hub cache (tests/hub_cache.py,
# which serves torchvision's and MONAI's pretrained cases) cannot stand in for.  Their loading is timm's own and
# ends before convert() sees the network; convert of trained timm DenseNets is tested in tests/test_convert.py.
NEEDS_DOWNLOAD = pytest.mark.skip(
    reason="timm downloads these weights from the Hugging Face Hub (hf_hub_id timm/densenet*), not through torch.hub"
)


def set_rng_seed(seed: int) -> None:
    """Seed every RNG the tests draw from (torchvision's common_utils.set_rng_seed)."""
    torch.manual_seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def freeze_rng_state():
    """Run a block and restore torch's CPU (and CUDA) RNG state after it."""
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if CUDA else None
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)


def cpu_and_gpu():
    """The devices torchvision parametrizes over: cpu, and cuda where there is one."""
    return ("cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs CUDA")]))

# What the TorchScript error must say (item 4 of issue 12): that TorchScript is unsupported, and what to use.
TORCHSCRIPT_ERROR = r"not support TorchScript.*torch\.compile.*torch\.export"
