"""Which implementation of a fused primitive runs for a given tensor.

Every primitive in this package has a pure-PyTorch reference (the oracle), C++ CPU kernels from the
compiled extension ``densenet_fused._C`` and Triton GPU kernels.  The default is chosen by device:
CUDA tensors use Triton, CPU tensors use C++ (or the reference when the extension is not built).
``DENSENET_FUSED_BACKEND=reference|cpp|triton`` forces one everywhere; a forced backend that cannot
run on the tensor raises instead of silently running something else.
"""

import importlib.util
import math
import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "triton")
BUILD_COMMAND = "pip install -e . --no-build-isolation"


def _load_extension() -> bool:
    """Import the compiled kernels (their TORCH_LIBRARY registrations); warn once when missing."""
    try:
        importlib.import_module("densenet_fused._C")
    except ImportError as error:
        warnings.warn(
            f"densenet_fused._C is not built ({error}); CPU tensors run the pure-PyTorch reference "
            f"path. Build the kernels with: {BUILD_COMMAND}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


CPP_AVAILABLE = _load_extension()
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(x: torch.Tensor, implemented=BACKENDS) -> str:
    """Return the backend that runs a primitive on ``x``, among the ``implemented`` ones."""
    forced = os.environ.get("DENSENET_FUSED_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DENSENET_FUSED_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced not in implemented:
            raise NotImplementedError(f"this primitive has no {forced!r} backend (it has {implemented})")
        if forced == "cpp" and not CPP_AVAILABLE:
            raise RuntimeError(f"DENSENET_FUSED_BACKEND=cpp but densenet_fused._C is not built: {BUILD_COMMAND}")
        if forced == "cpp" and x.device.type != "cpu":
            raise RuntimeError(f"DENSENET_FUSED_BACKEND=cpp has CPU kernels only, got a {x.device.type} tensor")
        if forced == "triton":
            if not TRITON_AVAILABLE:
                raise RuntimeError("DENSENET_FUSED_BACKEND=triton but triton is not installed")
            if x.device.type == "cpu" and not _interpreting():
                raise RuntimeError(
                    "DENSENET_FUSED_BACKEND=triton on CPU tensors needs Triton's interpreter: "
                    "set TRITON_INTERPRET=1 before anything imports triton"
                )
        return forced
    if x.device.type == "cuda" and TRITON_AVAILABLE and "triton" in implemented:
        return "triton"
    if x.device.type == "cpu" and CPP_AVAILABLE and "cpp" in implemented:
        return "cpp"
    return "reference"


def implementations(reference, cpp_name: str, fake) -> dict:
    """The backends of one primitive: its reference, plus the C++ kernel when the extension has it."""
    impls = {"reference": reference}
    if CPP_AVAILABLE and hasattr(torch.ops.densenet_fused, cpp_name):
        impls["cpp"] = getattr(torch.ops.densenet_fused, cpp_name)
        torch.library.register_fake(f"densenet_fused::{cpp_name}", fake)
    return impls


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and BatchNorm parameters are computed in: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-channel vector so it broadcasts against ``x`` of shape [N, C, *spatial]."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def is_channels_last(x: torch.Tensor) -> bool:
    """True when channels are the innermost dimension, also for a channel slice of such a buffer."""
    return x.dim() >= 3 and x.stride(1) == 1 and math.prod(x.shape[2:]) > 1


def empty_like_layout(x: torch.Tensor, channels: int, dtype=None, spatial=None) -> torch.Tensor:
    """An empty [N, channels, *spatial] tensor (x's spatial size by default), channels-last exactly when
    ``x`` is (any spatial rank).  Kernels, references and fakes all allocate outputs through it."""
    n, spatial = x.size(0), x.shape[2:] if spatial is None else spatial
    dtype = dtype or x.dtype
    if not is_channels_last(x):
        return torch.empty((n, channels, *spatial), dtype=dtype, device=x.device)
    out = torch.empty((n, *spatial, channels), dtype=dtype, device=x.device)
    return out.movedim(-1, 1)


def to_layout_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` laid out channels-last exactly when ``x`` is; copies only when it is not already."""
    if is_channels_last(t) == is_channels_last(x):
        return t
    return empty_like_layout(x, t.size(1), t.dtype, t.shape[2:]).copy_(t)
