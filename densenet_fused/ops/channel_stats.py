"""Per-channel batch statistics: mean and biased variance over the batch and spatial dims.

A dense block computes them once per channel, when the channel is written, and every later layer's
norm1 reuses them: a channel's data never changes after it is written.
"""

import torch

from ._backend import acc_dtype, backend_for, broadcast, implementations


def channel_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of x [N, C, *spatial], in the accumulation dtype."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=0)
    dtype = acc_dtype(x.dtype)
    return mean.to(dtype), var.to(dtype)


@torch.library.custom_op("densenet_fused::channel_stats", mutates_args=())
def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of x [N, C, *spatial] (x may be a channel slice)."""
    return _IMPLS[backend_for(x, _IMPLS)](x)


def _fake(x):
    dtype = acc_dtype(x.dtype)
    return x.new_empty(x.size(1), dtype=dtype), x.new_empty(x.size(1), dtype=dtype)


_IMPLS = implementations(channel_stats_reference, "channel_stats_cpp", _fake)
channel_stats.register_fake(_fake)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    count = x.numel() // x.size(1)
    centered = x.to(mean.dtype) - broadcast(mean, x)
    grad = broadcast(grad_mean / count, x) + 2 * centered * broadcast(grad_var / count, x)
    return grad.to(x.dtype)


channel_stats.register_autograd(_backward, setup_context=_setup_context)
