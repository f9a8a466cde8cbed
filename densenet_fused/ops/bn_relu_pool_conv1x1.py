"""The fused transition: BN -> ReLU -> 2x2 average pool -> 1x1 conv, read from the block's buffer.

torchvision convolves then pools; both are linear, so pooling first is the same function with 4x
fewer GEMM FLOPs (2^d fewer in d spatial dims).  Backward recomputes the activation from x.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _triton as _tr
from ._autograd import bn_autograd
from ._conv1x1_triton import conv1x1_backward_triton, conv1x1_forward_triton, runs_conv1x1_triton
from ._primitive import Op
from ._math import batch_norm_backward, bn_relu_math, matmul_channels, normalize
from .layout import broadcast, empty_like_layout, to_layout_of

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def avg_pool2x(z: torch.Tensor) -> torch.Tensor:
    """Average over 2x..x2 windows with stride 2 (floor), for 1, 2 or 3 spatial dims."""
    return _AVG_POOL[z.dim() - 2](z, kernel_size=2, stride=2)


def avg_pool2x_backward(grad_pooled: torch.Tensor, spatial) -> torch.Tensor:
    """Spread each pooled gradient evenly over its window; pixels cut off by the floor get zero."""
    grad = grad_pooled / 2 ** len(spatial)
    for dim in range(2, grad.dim()):
        grad = grad.repeat_interleave(2, dim=dim)
    padding = []
    for dim in reversed(range(len(spatial))):
        padding += [0, spatial[dim] - grad.size(2 + dim)]
    return F.pad(grad, padding)


def bn_relu_pool_conv1x1_reference(
    x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor
) -> Tensor:
    """weight [B, C] @ avgpool2(relu(bn(x))), in x's layout."""
    pooled = avg_pool2x(bn_relu_math(x, mean, invstd, gamma, beta))
    return to_layout_of(matmul_channels(weight, pooled), x)  # CPU avg_pool3d drops channels_last_3d


def bn_relu_pool_conv1x1_backward_reference(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Return (grad_x, grad_weight, grad_gamma, grad_beta) of bn_relu_pool_conv1x1."""
    x_hat = normalize(x, mean, invstd)
    z = torch.relu(x_hat * broadcast(gamma, x) + broadcast(beta, x))
    pooled = avg_pool2x(z)
    grad_y = grad_y.to(z.dtype)
    grad_weight = torch.einsum("nbs,ncs->bc", grad_y.flatten(2), pooled.flatten(2))
    grad_z = avg_pool2x_backward(matmul_channels(weight.mT.to(z.dtype), grad_y), x.shape[2:])
    grad_x, grad_gamma, grad_beta = batch_norm_backward(grad_z * (z > 0), x_hat, invstd, gamma, training)
    return to_layout_of(grad_x.to(x.dtype), x), grad_weight.to(weight.dtype), grad_gamma, grad_beta


def _fake(x, mean, invstd, gamma, beta, weight):
    """[N, B, *spatial // 2] in x's layout: the output, also what the Triton launcher allocates."""
    return empty_like_layout(x, weight.size(0), spatial=[s // 2 for s in x.shape[2:]])


def _fake_backward(grad_y, x, mean, invstd, gamma, beta, weight, training):
    return empty_like_layout(x, x.size(1)), torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(beta)


# ---------------------------------------------------------------------------------------------------
# Triton: the shared 1x1-conv kernels of ``_conv1x1_triton`` with a 2x2 (2^d) averaging window applied
# to each BN -> ReLU tile as it is loaded, before the GEMM.


def _pool_runs_triton(x, *others) -> bool:
    """1 to 3 spatial dims of size >= 2 at least (the reference decides what smaller sizes mean)."""
    return runs_conv1x1_triton(x, *others) and 1 <= x.dim() - 2 <= 3 and min(x.shape[2:]) >= 2


def bn_relu_pool_conv1x1_triton(x, mean, invstd, gamma, beta, weight):
    """Triton forward; spatial sizes below 2 and more than 3 spatial dims use the reference."""
    if not _pool_runs_triton(x, weight):
        return bn_relu_pool_conv1x1_reference(x, mean, invstd, gamma, beta, weight)
    out = _fake(x, mean, invstd, gamma, beta, weight)
    return conv1x1_forward_triton(x, _tr.NormArgs.of(mean, invstd, gamma, beta), weight, out, pool=True)


def bn_relu_pool_conv1x1_backward_triton(grad_y, x, mean, invstd, gamma, beta, weight, training):
    """Triton backward: (grad_x, grad_weight, grad_gamma, grad_beta), grad_x in x's layout."""
    if not _pool_runs_triton(x, grad_y, weight):
        return bn_relu_pool_conv1x1_backward_reference(grad_y, x, mean, invstd, gamma, beta, weight, training)
    grad_x = empty_like_layout(x, x.size(1))
    grad_weight, grad_gamma, grad_beta = conv1x1_backward_triton(
        grad_y, x, _tr.NormArgs.of(mean, invstd, gamma, beta), weight, grad_x, training, pool=True, accumulate=False
    )
    return grad_x, grad_weight, grad_gamma, grad_beta


# ---------------------------------------------------------------------------------------------------
# The custom ops.  ``training`` says mean/invstd are x's batch statistics (autograd only).


def _kernel_backward(grad_y, x, mean, invstd, gamma, beta, weight, training):
    grad_x, grad_weight, grad_gamma, grad_beta = bn_relu_pool_conv1x1_backward(
        grad_y, x, mean, invstd, gamma, beta, weight, training
    )
    return grad_x, grad_gamma, grad_beta, grad_weight


bn_relu_pool_conv1x1_backward = Op(
    "bn_relu_pool_conv1x1", "bn_relu_pool_conv1x1_backward", bn_relu_pool_conv1x1_backward_reference,
    _fake_backward, triton=bn_relu_pool_conv1x1_backward_triton,
).custom_op  # fmt: skip
bn_relu_pool_conv1x1 = Op(
    "bn_relu_pool_conv1x1", "bn_relu_pool_conv1x1", bn_relu_pool_conv1x1_reference, _fake,
    triton=bn_relu_pool_conv1x1_triton, autograd=bn_autograd(bn_relu_pool_conv1x1_reference, _kernel_backward),
).custom_op  # fmt: skip
