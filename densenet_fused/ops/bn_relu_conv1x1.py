"""The fused BN -> ReLU -> 1x1 conv of each dense layer, read straight from the block's feature buffer.

Forward: ``y = W @ relu(gamma * (x - mean) * invstd + beta)`` per pixel, with x the prefix view
``buf[:, :C]``.  Backward recomputes the activation, returns the weight and affine gradients, and
*adds* the input gradient into the first C channels of the block's shared gradient buffer.
"""

import torch
from torch import Tensor

from . import _triton as _tr
from ._autograd import bn_autograd
from ._conv1x1_triton import conv1x1_backward_triton, conv1x1_forward_triton, runs_conv1x1_triton
from ._primitive import Op
from ._math import batch_norm_backward, bn_relu_math, matmul_channels, normalize
from .layout import broadcast, empty_like_layout


def bn_relu_conv1x1_reference(
    x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor
) -> Tensor:
    """weight [B, C] @ relu(bn(x)) for x [N, C, *spatial]; [N, B, *spatial] out in x's layout."""
    return matmul_channels(weight, bn_relu_math(x, mean, invstd, gamma, beta))


def bn_relu_conv1x1_backward_reference(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor,
    grad_buffer: Tensor, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Return (grad_weight, grad_gamma, grad_beta); add grad_x into grad_buffer[:, :C] in place."""
    x_hat = normalize(x, mean, invstd)
    z = torch.relu(x_hat * broadcast(gamma, x) + broadcast(beta, x))
    grad_weight = torch.einsum("nbs,ncs->bc", grad_y.flatten(2).to(z.dtype), z.flatten(2))
    grad_y1 = matmul_channels(weight.mT.to(z.dtype), grad_y.to(z.dtype)) * (z > 0)
    grad_x, grad_gamma, grad_beta = batch_norm_backward(grad_y1, x_hat, invstd, gamma, training)
    grad_buffer[:, : x.size(1)] += grad_x.to(grad_buffer.dtype)
    return grad_weight.to(weight.dtype), grad_gamma, grad_beta


# ---------------------------------------------------------------------------------------------------
# Triton: the shared 1x1-conv kernels of ``_conv1x1_triton`` with a 1x1x1 window.


def bn_relu_conv1x1_triton(x, mean, invstd, gamma, beta, weight):
    """bn_relu_conv1x1 forward with Triton (empty inputs and more than 3 spatial dims use the reference)."""
    if not runs_conv1x1_triton(x, weight):
        return bn_relu_conv1x1_reference(x, mean, invstd, gamma, beta, weight)
    out = empty_like_layout(x, weight.size(0))
    return conv1x1_forward_triton(x, _tr.NormArgs.of(mean, invstd, gamma, beta), weight, out, pool=False)


def bn_relu_conv1x1_backward_triton(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training):
    """Triton backward: returns (grad_weight, grad_gamma, grad_beta), adds grad_x into grad_buffer[:, :C]."""
    grad_x = grad_buffer[:, : x.size(1)]
    if not runs_conv1x1_triton(grad_y, x, weight, grad_buffer) or _tr.common_geometry(x, grad_y, grad_x) is None:
        return bn_relu_conv1x1_backward_reference(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training)
    norm = _tr.NormArgs.of(mean, invstd, gamma, beta)
    return conv1x1_backward_triton(grad_y, x, norm, weight, grad_x, training, pool=False, accumulate=True)


# ---------------------------------------------------------------------------------------------------
# The custom ops.  ``training`` only matters for autograd: it says mean/invstd are x's batch statistics.


def _fake(x, mean, invstd, gamma, beta, weight):
    return empty_like_layout(x, weight.size(0))


def _fake_backward(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training):
    return torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(beta)


def _kernel_backward(grad_y, x, mean, invstd, gamma, beta, weight, training):
    grad_x = torch.zeros_like(x)
    grad_weight, grad_gamma, grad_beta = bn_relu_conv1x1_backward(
        grad_y, x, mean, invstd, gamma, beta, weight, grad_x, training
    )
    return grad_x, grad_gamma, grad_beta, grad_weight


bn_relu_conv1x1_backward = Op(
    "bn_relu_conv1x1", "bn_relu_conv1x1_backward", bn_relu_conv1x1_backward_reference, _fake_backward,
    triton=bn_relu_conv1x1_backward_triton, mutates_args=("grad_buffer",),
).custom_op  # fmt: skip
bn_relu_conv1x1 = Op(
    "bn_relu_conv1x1", "bn_relu_conv1x1", bn_relu_conv1x1_reference, _fake, triton=bn_relu_conv1x1_triton,
    autograd=bn_autograd(bn_relu_conv1x1_reference, _kernel_backward),
).custom_op  # fmt: skip
