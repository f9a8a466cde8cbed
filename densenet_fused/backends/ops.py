"""The layer kernels as each primitive's kernel from its op's kernel table (``ops._primitive.Op.runner``): C++
for CPU tensors, the reference on other devices or when forced, and whatever backend runs the statistics
the Triton path does not take (per-sample ones, run once per sample, and synchronized BatchNorms)."""

import torch
from torch import Tensor

from ..ops import PRIMITIVES
from ..ops._norm_args import NormArgs
from ..ops.channel_stats import instance_stats
from ..ops.layout import acc_dtype


class OpKernels:
    """``backends.LayerKernels`` from one backend's kernel per primitive; statistics per sample (``instance``)
    or all-reduced over a process group (``sync``, a ``distributed.BatchNormSync``) when asked."""

    def __init__(self, backend: str, instance: bool, sync) -> None:
        def kernel(primitive: str, op: str):
            return PRIMITIVES[primitive].ops[op].runner(backend)

        self._stats = kernel("channel_stats", "channel_stats")
        self._bn_relu = kernel("bn_relu", "bn_relu")
        self._bn_relu_backward = kernel("bn_relu", "bn_relu_backward")
        self._conv1x1 = kernel("bn_relu_conv1x1", "bn_relu_conv1x1")
        self._conv1x1_backward = kernel("bn_relu_conv1x1", "bn_relu_conv1x1_backward")
        self.instance, self.sync = instance, sync
        self._invstd = {}  # id(norm) -> its (mean, invstd, gamma, beta): a layer's norms are used several times

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x's batch statistics: per channel, per sample and channel for instance norms, over the group when
        synchronized."""
        if self.instance:
            return instance_stats(x)
        mean, var = self._stats(x)
        return (mean, var) if self.sync is None else self.sync.stats(x, mean, var)

    def _write_stats(self, x: Tensor, stats) -> None:
        if stats is not None:
            torch._foreach_copy_(list(stats), list(self.stats(x)))

    def copy(self, src, dst, stats=None, keep=None, drop_scale: float = 1.0) -> None:
        dst.copy_(src if keep is None else src * keep * drop_scale)
        self._write_stats(dst, stats)

    def conv1x1(self, x, norm: NormArgs, weight, stats=None) -> Tensor:
        out = self._conv1x1(x, *self._norm(x, norm), _matrix(weight, x.dtype))
        self._write_stats(out, stats)
        return out

    def bn_relu(self, x, norm: NormArgs) -> Tensor:
        return self._bn_relu(x, *self._norm(x, norm))

    def bn_relu_backward(self, grad_z, x, norm: NormArgs, training: bool):
        return self._bn_relu_backward(grad_z, x, *self._norm(x, norm), training)

    def conv1x1_backward(self, grad_y, x, norm: NormArgs, weight, grad_buffer, training: bool):
        grad_weight, grad_gamma, grad_beta = self._conv1x1_backward(
            grad_y, x, *self._norm(x, norm), _matrix(weight, x.dtype), grad_buffer, training
        )
        if grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_weight.view(weight.shape), grad_gamma, grad_beta

    def _norm(self, x: Tensor, norm: NormArgs) -> tuple:
        """(mean, invstd, gamma, beta) in x's accumulation dtype, as the primitives take them (computed once per
        norm and block call: the norm objects live as long as this one)."""
        found = self._invstd.get(id(norm))
        if found is None or found[0] is not norm:
            found = self._invstd[id(norm)] = (norm, tuple(norm.with_invstd(acc_dtype(x.dtype))[:4]))
        return found[1]


def _matrix(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A 1x1 conv's weight [B, C, 1, ...] as the [B, C] matrix the primitives take, in the input's dtype."""
    matrix = weight.flatten(1)
    return matrix if matrix.dtype == dtype else matrix.to(dtype)
