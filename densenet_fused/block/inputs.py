"""What the fused block, transition and ends check of their input, and the statistics a norm applies."""

import torch
from torch import Tensor, nn

from .. import distributed
from .. import norm as bn
from ..ops.layout import acc_dtype
from ..ops import channel_stats
from ..ops.channel_stats import instance_stats


def _check_input(inputs: list, expected_channels: int, weight: Tensor, what: str) -> torch.dtype:
    """Raise a clear error for input the block cannot take, before any work; return the compute dtype.

    The compute dtype (buffer, convolutions) is the input's, or under autocast the autocast dtype, which
    autocast would cast both the input and the weights to (float64 is never cast, as in torch.autocast).
    Statistics and BatchNorm parameters always stay in float32 (float64 for float64).
    """
    if not inputs:
        raise ValueError(f"{what} expects a tensor or a non-empty list of tensors")
    rank = weight.dim()
    for x in inputs:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} expects tensors, got {type(x).__name__}")
        if x.dim() != rank:
            raise ValueError(f"{what} expects a {rank}-D input [N, C, *spatial], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{what} expects a floating-point input, got {x.dtype}")
        if x.device != weight.device:
            raise RuntimeError(f"{what}: input is on {x.device} but its parameters are on {weight.device}")
        if x.size(0) == 0:
            raise ValueError(f"{what} got an empty batch (input shape {tuple(x.shape)})")
        if x.dtype != inputs[0].dtype or x.shape[2:] != inputs[0].shape[2:] or x.size(0) != inputs[0].size(0):
            raise ValueError(f"{what}: all inputs must share batch size, spatial size and dtype")
    channels = sum(x.size(1) for x in inputs)
    if channels != expected_channels:
        raise ValueError(f"{what} expects {expected_channels} input channels, got {channels}")
    dtype = _autocast_dtype(inputs[0].dtype, weight.device.type)
    if dtype != _autocast_dtype(weight.dtype, weight.device.type):
        raise TypeError(f"{what}: input dtype {inputs[0].dtype} does not match the parameters' {weight.dtype}")
    return dtype


def _autocast_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype torch.autocast runs a convolution of a ``dtype`` tensor in (``dtype`` outside autocast)."""
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if dtype != torch.float64 and autocast:
        return torch.get_autocast_dtype(device_type)
    return dtype


def _instance(norms: list, what: str) -> bool:
    """Whether ``norms`` (one block's or transition's) are instance norms; raise if they mix kinds."""
    kinds = {bn.is_instance(norm) for norm in norms}
    if len(kinds) > 1:
        raise ValueError(f"{what} computes its statistics once per channel for all its norms, which must be all BatchNorms or all InstanceNorms")
    return kinds == {True}


def _batch_group(norms: list, size: torch.Size, x: Tensor, instance: bool, what: str):
    """(sync hook or None, values per channel) of the batch statistics of ``norms`` on x (batch size ``size``).

    Local statistics reject a single value per channel as F.batch_norm (F.instance_norm) does; synchronized
    ones do not, as SyncBatchNorm with more than one process does not.  Instance norms count per sample.
    """
    group = distributed.common_group(norms, what)
    local_count = bn.stats_count(x, instance)
    if group is None:
        bn.check_batch_size(size, instance)
        return None, local_count
    count = distributed.global_count(local_count, x.device, group)
    return distributed.BatchNormSync(group, count), count


def _batch_stats(x: Tensor, sync, instance: bool) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x's batch, or with a ``sync`` hook of the group's batch;
    per sample and channel ([N, C]) for instance norms."""
    if instance:
        return instance_stats(x)
    mean, var = channel_stats(x)
    return (mean, var) if sync is None else sync.stats(x, mean, var)


def norm_inputs(norm: nn.Module, x: Tensor, what: str) -> tuple[tuple, bool, object]:
    """((mean, invstd, gamma, beta), training, sync hook or None) for one norm applied to all of x, as a fused
    primitive takes them: its running statistics, or x's batch (or per-sample) statistics, in which case the
    norm's running statistics move as F.batch_norm (F.instance_norm) moves them."""
    acc = acc_dtype(x.dtype)
    gamma, beta = bn.affine(norm, acc, x.device)
    if not bn.uses_batch_stats(norm):
        return (*bn.running_stats(norm, acc), gamma, beta), False, None
    instance = bn.is_instance(norm)
    sync, count = _batch_group([norm], x.shape, x, instance, what)
    with torch.no_grad():
        mean, var = _batch_stats(x, sync, instance)
    bn.update_running_stats(norm, mean, var, count)
    return (mean, torch.rsqrt(var + norm.eps), gamma, beta), True, sync
