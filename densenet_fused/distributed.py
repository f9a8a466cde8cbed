"""SyncBatchNorm inside the fused blocks and transitions.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` swaps the BatchNorms inside our blocks for SyncBatchNorm
modules.  The blocks never call a norm's forward (they read its parameters and settings), so they
synchronize themselves, exactly when SyncBatchNorm would: in training, with torch.distributed initialized
and more than one process in the norm's group.

Forward all-reduces the per-channel sum and sum of squares (float64) of each channel once, when it is
written (k channels per layer, plus bn_size * k for each bottleneck), and the count once per block.
Backward runs the primitives with their eval-mode BatchNorm formula (grad_x = gamma * invstd * dy), which
also return the local sums the training formula needs (grad_beta = sum dy, grad_gamma = sum dy * x_hat);
it all-reduces those and subtracts their term, as SyncBatchNorm's backward does.  The returned
grad_gamma/grad_beta stay local sums: DistributedDataParallel averages them like every other gradient.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ops import bn_relu_pool_conv1x1, bn_relu_pool_conv1x1_backward
from .ops.layout import broadcast


def sync_group(norm: nn.Module):
    """The process group ``norm`` synchronizes over in this forward, or None: SyncBatchNorm's ``need_sync``."""
    if not (isinstance(norm, nn.SyncBatchNorm) and norm.training and dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def common_group(norms: list, what: str):
    """The process group all ``norms`` synchronize over (None: none does); raise if they disagree."""
    groups = [sync_group(norm) for norm in norms]
    if any(group is not groups[0] for group in groups):
        raise ValueError(
            f"{what} computes each channel's batch statistics once for all its BatchNorms, so those that use "
            "batch statistics must all be SyncBatchNorm over the same process group, or none of them"
        )
    return groups[0] if groups else None


def global_count(local_count: int, device: torch.device, group) -> Tensor:
    """The number of values per channel over the whole group (float64 scalar tensor: no host sync)."""
    count = torch.tensor(float(local_count), dtype=torch.float64, device=device)
    dist.all_reduce(count, group=group)
    return count


def all_reduce_stats(mean: Tensor, var: Tensor, local_count: int, count: Tensor, group) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over the group from this rank's: all-reduce sum x and sum x^2 in float64."""
    mean64 = mean.double()
    sums = torch.stack([mean64, var.double() + mean64 * mean64]) * local_count
    dist.all_reduce(sums, group=group)
    global_mean, mean_square = (sums / count).unbind(0)
    global_var = (mean_square - global_mean * global_mean).clamp_min(0)
    return global_mean.to(mean.dtype), global_var.to(var.dtype)


def sync_batch_norm_backward_(grad_x, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, group) -> None:
    """Turn ``grad_x`` = gamma * invstd * dy (the eval formula) into SyncBatchNorm's training gradient, in place.

    Subtracts gamma * invstd * (sum dy + x_hat * sum dy x_hat) / count with both sums all-reduced over the group.
    """
    sums = torch.stack([sum_dy, sum_dy_xhat])
    dist.all_reduce(sums, group=group)
    scale = gamma * invstd / count
    slope = scale * invstd * sums[1]
    offset = scale * sums[0] - slope * mean
    grad_x.sub_((broadcast(slope, x) * x + broadcast(offset, x)).to(grad_x.dtype))


def refuse_double_backward(what: str) -> None:
    """Raise when autograd records this backward (create_graph=True): its all-reduces have no derivative here."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"double backward (create_graph=True) through a {what} with synchronized BatchNorms (SyncBatchNorm "
            "across processes) is not supported; compute that gradient with local BatchNorms, or with "
            "torchvision's DenseNet"
        )


class SyncTransitionFunction(torch.autograd.Function):
    """bn_relu_pool_conv1x1 normalizing with the group's batch statistics, its backward synchronized too."""

    @staticmethod
    def forward(ctx, group, count, x, mean, invstd, gamma, beta, weight):
        ctx.group, ctx.count = group, count
        ctx.save_for_backward(x, mean, invstd, gamma, beta, weight)
        return bn_relu_pool_conv1x1(x, mean, invstd, gamma, beta, weight, False)

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward("transition")
        x, mean, invstd, gamma, beta, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_gamma, grad_beta = bn_relu_pool_conv1x1_backward(
            grad_y, x, mean, invstd, gamma, beta, weight, False
        )
        sync_batch_norm_backward_(grad_x, x, mean, invstd, gamma, grad_beta, grad_gamma, ctx.count, ctx.group)
        return None, None, grad_x, None, None, grad_gamma, grad_beta, grad_weight


def group_name(group) -> str | None:
    """The name a custom op takes a process group by (None: no group)."""
    return None if group is None else group.group_name


def resolve_group(name: str | None):
    """The process group ``group_name`` named (None: no group)."""
    return None if name is None else dist.distributed_c10d._resolve_process_group(name)
