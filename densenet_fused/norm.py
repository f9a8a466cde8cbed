"""torch.nn.BatchNorm and InstanceNorm semantics for norms whose statistics this package computes itself.

Each function mirrors one step of ``_BatchNorm.forward`` / ``F.batch_norm`` (or ``_InstanceNorm.forward`` /
``F.instance_norm``) so that running stats, ``momentum=None``, ``track_running_stats`` and train/eval
behave exactly as in torchvision (or MONAI, whose instance norm is torch's).  Instance norm statistics
are per sample and channel, [N, C]; batch norm's per channel, [C].
"""

import math

import torch
from torch import nn


NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def is_instance(norm: nn.Module) -> bool:
    """Whether ``norm`` normalizes each sample with its own statistics (an InstanceNorm)."""
    return isinstance(norm, nn.modules.instancenorm._InstanceNorm)


def uses_batch_stats(norm: nn.Module) -> bool:
    """Whether the norm normalizes with the statistics of its input (F.batch_norm's ``bn_training``,
    F.instance_norm's ``use_input_stats``): in training, or when it keeps no running statistics."""
    return norm.training or (norm.running_mean is None and norm.running_var is None)


def check_batch_size(size: torch.Size, instance: bool = False) -> None:
    """The error F.batch_norm (F.instance_norm) raises when a channel would see a single value."""
    if instance and math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")
    if not instance and size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def stats_count(x: torch.Tensor, instance: bool) -> int:
    """How many values of x each statistic is taken over: per channel, or per sample and channel (instance)."""
    return x[0, 0].numel() if instance else x.numel() // x.size(1)


@torch.no_grad()
def update_running_stats(norm, mean: torch.Tensor, var: torch.Tensor, count) -> None:
    """Fold one batch's mean and biased variance into the running stats, as _BatchNorm.forward does.

    ``count`` is the number of values per channel (an int, or a tensor when it was all-reduced); for an
    InstanceNorm, per sample: torch.instance_norm averages the samples' updates, counts no batches, and
    reads ``momentum=None`` as 0.
    """
    if not (norm.training and norm.track_running_stats):
        return
    factor = 0.0 if norm.momentum is None else norm.momentum
    if is_instance(norm):
        mean, var = mean.mean(0), var.mean(0)
    elif norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # a tensor, not float(): no host sync and no torch.compile graph break
            factor = 1.0 / norm.num_batches_tracked.to(torch.float64)
    if norm.running_mean is None:
        return
    unbiased = var * (count / (count - 1))
    norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype) * factor)
    norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype) * factor)


def update_running_stats_of(norms: list, means: list, variances: list, count) -> None:
    """``update_running_stats`` of many norms, with one foreach op per step for every BatchNorm that tracks running
    statistics with a float ``momentum`` (and a plain int ``count``): a block's norms in a few launches, not
    several per norm.  Any other norm (instance norms, ``momentum=None``, a synchronized count) runs alone."""
    fast = {}
    for norm, mean, var in zip(norms, means, variances):
        if not (norm.training and norm.track_running_stats):
            continue
        plain = not is_instance(norm) and norm.running_mean is not None and norm.num_batches_tracked is not None
        if plain and norm.momentum is not None and isinstance(count, int):
            fast.setdefault(norm.momentum, []).append((norm, mean, var))
        else:
            update_running_stats(norm, mean, var, count)
    with torch.no_grad():
        for momentum, group in fast.items():
            norms, means, variances = zip(*group)
            torch._foreach_add_([norm.num_batches_tracked for norm in norms], 1)
            for running, batch, scale in (("running_mean", means, 1.0), ("running_var", variances, count / (count - 1))):
                buffers = [getattr(norm, running) for norm in norms]
                torch._foreach_mul_(buffers, 1 - momentum)
                torch._foreach_add_(buffers, batch, alpha=momentum * scale)


def running_stats(norm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(running mean, 1 / sqrt(running var + eps)) of a norm in the accumulation dtype: its eval-mode statistics."""
    return norm.running_mean.to(dtype), torch.rsqrt(norm.running_var + norm.eps).to(dtype)


def affine(norm, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) of a norm in the accumulation dtype; ones and zeros when ``affine=False``."""
    if norm.weight is None:
        ones = torch.ones(norm.num_features, dtype=dtype, device=device)
        return ones, torch.zeros_like(ones)
    weight, bias = norm.weight, norm.bias
    return (weight, bias) if weight.dtype == dtype == bias.dtype else (weight.to(dtype), bias.to(dtype))
