"""torch.nn.BatchNorm semantics for norms whose statistics this package computes itself.

Each function mirrors one step of ``_BatchNorm.forward`` / ``F.batch_norm`` so that running stats,
``momentum=None``, ``track_running_stats`` and train/eval behave exactly as in torchvision.
"""

import math

import torch
from torch import nn

from .ops import channel_stats


def uses_batch_stats(norm: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether F.batch_norm would normalize with batch statistics (its ``bn_training``)."""
    return norm.training or (norm.running_mean is None and norm.running_var is None)


def check_batch_size(size: torch.Size) -> None:
    """The error F.batch_norm raises when a channel would see a single value in training."""
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


@torch.no_grad()
def update_running_stats(norm, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """Fold one batch's mean and biased variance into the running stats, as _BatchNorm.forward does."""
    if not (norm.training and norm.track_running_stats):
        return
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    if norm.running_mean is None:
        return
    unbiased = var * (count / (count - 1))
    norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype), alpha=factor)
    norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)


def affine(norm, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) of a norm in the accumulation dtype; ones and zeros when ``affine=False``."""
    if norm.weight is None:
        ones = torch.ones(norm.num_features, dtype=dtype, device=device)
        return ones, torch.zeros_like(ones)
    return norm.weight.to(dtype), norm.bias.to(dtype)


def statistics(norm, x: torch.Tensor, batch_mean=None, batch_var=None):
    """(mean, invstd, batch) that ``norm`` applies to x, updating its running stats like torch.

    Batch statistics are computed from x unless the caller already has them (a dense block does).
    """
    if not uses_batch_stats(norm):
        return norm.running_mean, torch.rsqrt(norm.running_var + norm.eps), False
    check_batch_size(x.shape)
    if batch_mean is None:
        with torch.no_grad():
            batch_mean, batch_var = channel_stats(x)
    update_running_stats(norm, batch_mean, batch_var, x.numel() // x.size(1))
    return batch_mean, torch.rsqrt(batch_var + norm.eps), True
