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
    """The number of values per channel over the whole group (float64 scalar tensor: no host sync, and filled on
    the device rather than copied from host memory, which CUDA's sync debug mode flags)."""
    count = torch.full((), float(local_count), dtype=torch.float64, device=device)
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


class BatchNormSync:
    """The one hook by which fused blocks and transitions synchronize their BatchNorms over ``group``.

    Forward: ``stats`` turns this rank's statistics of a channel into the group's.  Backward: the kernels
    run the eval formula (grad_x = gamma * invstd * dy) and return the local sums of the training formula;
    ``backward_`` all-reduces those and subtracts their term, as SyncBatchNorm's backward does.  ``count``
    is the number of values per channel over the group.
    """

    def __init__(self, group, count: Tensor) -> None:
        self.group, self.count = group, count

    @classmethod
    def named(cls, name: str | None, count: Tensor | None) -> "BatchNormSync | None":
        """The hook for the group a custom op received by ``name`` (None: no synchronization)."""
        return None if name is None else cls(dist.distributed_c10d._resolve_process_group(name), count)

    @property
    def name(self) -> str:
        return self.group.group_name

    def stats(self, x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        return all_reduce_stats(mean, var, x.numel() // x.size(1), self.count, self.group)

    def backward_(self, grad_x, x, mean, invstd, gamma, sum_dy, sum_dy_xhat) -> None:
        """Turn ``grad_x`` from the eval formula into SyncBatchNorm's training gradient, in place: subtract
        gamma * invstd * (sum dy + x_hat * sum dy x_hat) / count with both sums all-reduced over the group."""
        sums = torch.stack([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=self.group)
        scale = gamma * invstd / self.count
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
