"""BatchNorm (given statistics) followed by ReLU, and its backward: the BN2 -> ReLU before each 3x3 conv.

``training=True`` means mean/invstd are the batch statistics of x itself, so the backward includes the
gradient that flows through them (the train-mode BatchNorm formula); otherwise they are constants
(running statistics, the eval-mode formula).
"""

import torch

from ._backend import backend_for, broadcast, implementations


def normalize(x, mean, invstd):
    """x_hat = (x - mean) * invstd, in the accumulation dtype."""
    return (x.to(mean.dtype) - broadcast(mean, x)) * broadcast(invstd, x)


def batch_norm_backward(grad_y, x_hat, invstd, gamma, training):
    """Gradients of y = gamma * x_hat + beta for x, gamma and beta (x_hat from batch stats if training)."""
    dims = [0, *range(2, grad_y.dim())]
    grad_beta = grad_y.sum(dims)
    grad_gamma = (grad_y * x_hat).sum(dims)
    if training:
        count = grad_y.numel() // grad_y.size(1)
        grad_y = grad_y - broadcast(grad_beta / count, x_hat) - x_hat * broadcast(grad_gamma / count, x_hat)
    return grad_y * broadcast(gamma * invstd, x_hat), grad_gamma, grad_beta


def bn_relu_reference(x, mean, invstd, gamma, beta):
    z = normalize(x, mean, invstd) * broadcast(gamma, x) + broadcast(beta, x)
    return torch.relu(z).to(x.dtype)


def bn_relu_backward_reference(grad_z, x, mean, invstd, gamma, beta, training):
    x_hat = normalize(x, mean, invstd)
    active = x_hat * broadcast(gamma, x) + broadcast(beta, x) > 0
    grad_y = grad_z.to(mean.dtype) * active
    grad_x, grad_gamma, grad_beta = batch_norm_backward(grad_y, x_hat, invstd, gamma, training)
    return grad_x.to(x.dtype), grad_gamma, grad_beta


@torch.library.custom_op("densenet_fused::bn_relu", mutates_args=())
def bn_relu(
    x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, training: bool
) -> torch.Tensor:
    """relu(gamma * (x - mean) * invstd + beta) per channel, in x's dtype and layout."""
    return _IMPLS[backend_for(x, _IMPLS)](x, mean, invstd, gamma, beta)


@torch.library.custom_op("densenet_fused::bn_relu_backward", mutates_args=())
def bn_relu_backward(
    grad_z: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_gamma, grad_beta) of bn_relu, with the ReLU mask recomputed from x."""
    return _BACKWARD_IMPLS[backend_for(x, _BACKWARD_IMPLS)](grad_z, x, mean, invstd, gamma, beta, training)


def _fake(x, mean, invstd, gamma, beta, training=False):
    return torch.empty_like(x)


def _fake_backward(grad_z, x, mean, invstd, gamma, beta, training):
    return torch.empty_like(x), torch.empty_like(gamma), torch.empty_like(beta)


_IMPLS = implementations(bn_relu_reference, "bn_relu_cpp", _fake)
_BACKWARD_IMPLS = implementations(bn_relu_backward_reference, "bn_relu_backward_cpp", _fake_backward)
bn_relu.register_fake(_fake)
bn_relu_backward.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    x, mean, invstd, gamma, beta, training = inputs
    ctx.save_for_backward(x, mean, invstd, gamma, beta)
    ctx.training = training


def _backward(ctx, grad_z):
    x, mean, invstd, gamma, beta = ctx.saved_tensors
    grad_x, grad_gamma, grad_beta = bn_relu_backward(grad_z, x, mean, invstd, gamma, beta, ctx.training)
    return grad_x, None, None, grad_gamma, grad_beta, None


bn_relu.register_autograd(_backward, setup_context=_setup_context)
