"""The fused transition: BN -> ReLU -> 2x2 average pool -> 1x1 conv, read from the block's buffer.

torchvision convolves then pools; both are linear, so pooling first is the same function with 4x
fewer GEMM FLOPs (2^d fewer in d spatial dims).  Backward recomputes the activation from x.
"""

import torch
import torch.nn.functional as F

from ._backend import backend_for, broadcast, implementations
from .bn_relu import batch_norm_backward, bn_relu_reference, normalize
from .bn_relu_conv1x1 import matmul_channels

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


def bn_relu_pool_conv1x1_reference(x, mean, invstd, gamma, beta, weight):
    return matmul_channels(weight, avg_pool2x(bn_relu_reference(x, mean, invstd, gamma, beta)))


def bn_relu_pool_conv1x1_backward_reference(grad_y, x, mean, invstd, gamma, beta, weight, training):
    x_hat = normalize(x, mean, invstd)
    z = torch.relu(x_hat * broadcast(gamma, x) + broadcast(beta, x))
    pooled = avg_pool2x(z)
    grad_y = grad_y.to(z.dtype)
    grad_weight = torch.einsum("nbs,ncs->bc", grad_y.flatten(2), pooled.flatten(2))
    grad_z = avg_pool2x_backward(matmul_channels(weight.mT.to(z.dtype), grad_y), x.shape[2:])
    grad_x, grad_gamma, grad_beta = batch_norm_backward(grad_z * (z > 0), x_hat, invstd, gamma, training)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_gamma, grad_beta


@torch.library.custom_op("densenet_fused::bn_relu_pool_conv1x1", mutates_args=())
def bn_relu_pool_conv1x1(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """weight [B, C] @ avgpool2(relu(bn(x))); ``training`` says mean/invstd are x's batch statistics."""
    return _IMPLS[backend_for(x, _IMPLS)](x, mean, invstd, gamma, beta, weight)


@torch.library.custom_op("densenet_fused::bn_relu_pool_conv1x1_backward", mutates_args=())
def bn_relu_pool_conv1x1_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (grad_x, grad_weight, grad_gamma, grad_beta) of bn_relu_pool_conv1x1."""
    impl = _BACKWARD_IMPLS[backend_for(x, _BACKWARD_IMPLS)]
    return impl(grad_y, x, mean, invstd, gamma, beta, weight, training)


def _fake(x, mean, invstd, gamma, beta, weight, training=False):
    n, _, *spatial = x.shape
    return x.new_empty((n, weight.size(0), *[s // 2 for s in spatial]))


def _fake_backward(grad_y, x, mean, invstd, gamma, beta, weight, training):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(beta)


_IMPLS = implementations(bn_relu_pool_conv1x1_reference, "bn_relu_pool_conv1x1_cpp", _fake)
_BACKWARD_IMPLS = implementations(
    bn_relu_pool_conv1x1_backward_reference, "bn_relu_pool_conv1x1_backward_cpp", _fake_backward
)
bn_relu_pool_conv1x1.register_fake(_fake)
bn_relu_pool_conv1x1_backward.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    x, mean, invstd, gamma, beta, weight, training = inputs
    ctx.save_for_backward(x, mean, invstd, gamma, beta, weight)
    ctx.training = training


def _backward(ctx, grad_y):
    x, mean, invstd, gamma, beta, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_gamma, grad_beta = bn_relu_pool_conv1x1_backward(
        grad_y, x, mean, invstd, gamma, beta, weight, ctx.training
    )
    return grad_x, None, None, grad_gamma, grad_beta, grad_weight, None


bn_relu_pool_conv1x1.register_autograd(_backward, setup_context=_setup_context)
