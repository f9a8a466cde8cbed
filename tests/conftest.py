"""Shared test setup.

Without a CUDA GPU the Triton kernels run on CPU tensors through Triton's interpreter, which has to be
switched on before anything imports triton (densenet_fused does, and so do torch._dynamo/_inductor).

A test parametrized over ``backend`` runs with ``DENSENET_FUSED_BACKEND``'s setting forced to it
(``_kernel_backend``).  For the kernel backends, ``cpp`` and ``triton``, it is also a kernel test, guarded
automatically:

* every reference fallback of a kernel raises, so a kernel that quietly ran the reference fails;
* a spy records the kernels that ran (``kernel_spy``), and the test fails if none of its backend did;
* fresh memory is poisoned (NaN, or the largest integer): an output or scratch element a kernel forgot
  to write cannot pass by being zero.
"""

import contextlib
import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The torch.hub cache of generated checkpoints (fixtures hub_cache, torch_home): it imports torchvision, which
# imports triton, so only after TRITON_INTERPRET is set.
from hub_cache import hub_cache, torch_home  # noqa: E402, F401

KERNEL_BACKENDS = ("cpp", "triton")


class KernelSpy:
    """The kernels a test ran: Triton kernels by name (every launch goes through ``ops._triton.launch``) and
    the ops whose kernel-table entry ran, per backend."""

    def __init__(self):
        self.launched, self.ops = [], {backend: [] for backend in KERNEL_BACKENDS}

    def ran(self, backend: str) -> bool:
        return bool(self.ops[backend]) or (backend == "triton" and bool(self.launched))


def _spy_on_kernels(monkeypatch) -> KernelSpy:
    """Make the reference fallbacks raise and record the kernels that run."""
    from densenet_fused.ops import PRIMITIVES
    from densenet_fused.ops import _triton as tr

    spy = KernelSpy()

    def fail(*args, **kwargs):
        raise AssertionError("a kernel fell back to the reference")

    for primitive in PRIMITIVES.values():
        for op in primitive.ops.values():
            monkeypatch.setattr(inspect.getmodule(op.reference), op.reference.__name__, fail)
            monkeypatch.setattr(op, "_runners", {})  # runners made before the spy would bypass it
            for backend in KERNEL_BACKENDS:
                if backend in op.kernels:

                    def record(*args, _kernel=op.kernels[backend], _calls=spy.ops[backend], _name=op.name):
                        _calls.append(_name)
                        return _kernel(*args)

                    monkeypatch.setitem(op.kernels, backend, record)
    launch = tr.launch

    def record_launch(kernel, *args, **kwargs):
        function = kernel
        while hasattr(function, "fn"):  # autotuners and heuristics wrap the JITFunction
            function = function.fn
        spy.launched.append(function.__name__)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(tr, "launch", record_launch)
    return spy


@contextlib.contextmanager
def poisoned_memory():
    """Fresh tensors (torch.empty and friends, also inside the C++ kernels) start as NaN or the largest integer:
    deterministic algorithms on (warn-only, so cuBLAS needs no workspace setting) with
    ``fill_uninitialized_memory``."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def backend():
    """None: the backend is not forced.  A test parametrized over ``backend`` overrides this with its value."""
    return None


@pytest.fixture(autouse=True)
def _kernel_backend(backend, monkeypatch):
    """Force a ``backend`` parameter's backend; guard kernel backends (see the module docstring)."""
    if backend is None:
        yield None
        return
    from densenet_fused.ops._backend import config

    monkeypatch.setattr(config, "backend", backend)
    if backend not in KERNEL_BACKENDS:
        yield None
        return
    spy = _spy_on_kernels(monkeypatch)
    with poisoned_memory():
        yield spy
    assert spy.ran(backend), f"no {backend} kernel ran: the test checked the reference, not the {backend} kernels"


@pytest.fixture
def ieee_fp32():
    """Float32 convolutions and GEMMs (cuDNN's, cuBLAS's and our 1x1 convolutions, which follow torch's flag) in
    IEEE fp32, not TF32: on a GPU, float32 comparisons are then tight on both sides."""
    from benchmarks.flags import fp32

    with fp32(conv="ieee", matmul="ieee"):
        yield


@pytest.fixture
def kernel_spy(_kernel_backend) -> KernelSpy:
    """The kernels a ``backend``-parametrized test ran so far (its ``KernelSpy``)."""
    assert _kernel_backend is not None, "kernel_spy needs a test parametrized over a kernel backend"
    return _kernel_backend
