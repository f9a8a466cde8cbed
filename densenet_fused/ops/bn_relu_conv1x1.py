"""The fused BN -> ReLU -> 1x1 conv of each dense layer, read straight from the block's feature buffer.

Forward: ``y = W @ relu(gamma * (x - mean) * invstd + beta)`` per pixel, with x the prefix view
``buf[:, :C]``.  Backward recomputes the activation, returns the weight and affine gradients, and
*adds* the input gradient into the first C channels of the block's shared gradient buffer.
"""

import torch

from ._backend import backend_for, broadcast, implementations, is_channels_last
from .bn_relu import batch_norm_backward, bn_relu_reference, normalize


def matmul_channels(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv as a GEMM: weight [B, C] times x [N, C, *spatial], output in x's layout."""
    flat = x.flatten(2)
    if is_channels_last(x):
        out = (flat.mT @ weight.mT).mT
    else:
        out = weight @ flat
    return out.unflatten(2, x.shape[2:])


def bn_relu_conv1x1_reference(x, mean, invstd, gamma, beta, weight):
    return matmul_channels(weight, bn_relu_reference(x, mean, invstd, gamma, beta))


def bn_relu_conv1x1_backward_reference(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training):
    x_hat = normalize(x, mean, invstd)
    z = torch.relu(x_hat * broadcast(gamma, x) + broadcast(beta, x))
    grad_weight = torch.einsum("nbs,ncs->bc", grad_y.flatten(2).to(z.dtype), z.flatten(2))
    grad_y1 = matmul_channels(weight.mT.to(z.dtype), grad_y.to(z.dtype)) * (z > 0)
    grad_x, grad_gamma, grad_beta = batch_norm_backward(grad_y1, x_hat, invstd, gamma, training)
    grad_buffer[:, : x.size(1)] += grad_x.to(grad_buffer.dtype)
    return grad_weight.to(weight.dtype), grad_gamma, grad_beta


@torch.library.custom_op("densenet_fused::bn_relu_conv1x1", mutates_args=())
def bn_relu_conv1x1(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """weight [B, C] @ relu(bn(x)) for x [N, C, *spatial]; [N, B, *spatial] out in x's layout.

    ``training`` only matters for autograd: it says mean/invstd are x's own batch statistics.
    """
    return _IMPLS[backend_for(x, _IMPLS)](x, mean, invstd, gamma, beta, weight)


@torch.library.custom_op("densenet_fused::bn_relu_conv1x1_backward", mutates_args=("grad_buffer",))
def bn_relu_conv1x1_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    grad_buffer: torch.Tensor,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (grad_weight, grad_gamma, grad_beta); add grad_x into grad_buffer[:, :C] in place."""
    impl = _BACKWARD_IMPLS[backend_for(x, _BACKWARD_IMPLS)]
    return impl(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training)


def _fake(x, mean, invstd, gamma, beta, weight, training=False):
    n, _, *spatial = x.shape
    return x.new_empty((n, weight.size(0), *spatial))


def _fake_backward(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training):
    return torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(beta)


_IMPLS = implementations(bn_relu_conv1x1_reference, "bn_relu_conv1x1_cpp", _fake)
_BACKWARD_IMPLS = implementations(bn_relu_conv1x1_backward_reference, "bn_relu_conv1x1_backward_cpp", _fake_backward)
bn_relu_conv1x1.register_fake(_fake)
bn_relu_conv1x1_backward.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    x, mean, invstd, gamma, beta, weight, training = inputs
    ctx.save_for_backward(x, mean, invstd, gamma, beta, weight)
    ctx.training = training


def _backward(ctx, grad_y):
    x, mean, invstd, gamma, beta, weight = ctx.saved_tensors
    grad_x = torch.zeros_like(x)
    grad_weight, grad_gamma, grad_beta = bn_relu_conv1x1_backward(
        grad_y, x, mean, invstd, gamma, beta, weight, grad_x, ctx.training
    )
    return grad_x, None, None, grad_gamma, grad_beta, grad_weight, None


bn_relu_conv1x1.register_autograd(_backward, setup_context=_setup_context)
