"""Tensor layout helpers shared by the primitives, their fakes and the block.

Channels-last is followed exactly: every output a kernel, reference or fake allocates is channels-last
exactly when its input is, for any spatial rank.
"""

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and BatchNorm parameters are computed in: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View per-channel values [C], or per-sample ones [N, C] (instance norm), so they broadcast against
    ``x`` of shape [N, C, *spatial]."""
    return v.view(*(v.shape if v.dim() == 2 else (1, -1)), *([1] * (x.dim() - 2)))


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
    # the strides of torch.empty((n, *spatial, channels)).movedim(-1, 1), in one allocation call
    strides, step = [], channels
    for size in reversed(spatial):
        strides.append(step)
        step *= size
    return torch.empty_strided((n, channels, *spatial), (step, 1, *reversed(strides)), dtype=dtype, device=x.device)


def to_layout_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` laid out channels-last exactly when ``x`` is; copies only when it is not already."""
    if is_channels_last(t) == is_channels_last(x):
        return t
    return empty_like_layout(x, t.size(1), t.dtype, t.shape[2:]).copy_(t)
