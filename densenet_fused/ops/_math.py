"""The pure-PyTorch math the primitives' references share: normalization, the BatchNorm backward, BN -> ReLU and
a 1x1 convolution as a GEMM.  Each primitive's reference composes these, so no primitive builds on another."""

import math

import torch
from torch import Tensor

from .layout import broadcast, is_channels_last


def normalize(x, mean, invstd):
    """x_hat = (x - mean) * invstd, in the accumulation dtype."""
    return (x.to(mean.dtype) - broadcast(mean, x)) * broadcast(invstd, x)


def batch_norm_backward(grad_y, x_hat, invstd, gamma, training):
    """Gradients of y = gamma * x_hat + beta for x, gamma and beta (x_hat from batch stats if training).

    Statistics are per channel [C], or per sample and channel [N, C] (instance norm): then the training
    formula's means run over each sample's spatial dims only.
    """
    spatial = list(range(2, grad_y.dim()))
    sample_beta, sample_gamma = grad_y.sum(spatial), (grad_y * x_hat).sum(spatial)  # [N, C]
    grad_beta, grad_gamma = sample_beta.sum(0), sample_gamma.sum(0)
    if training:
        count = math.prod(grad_y.shape[2:])  # per sample (also for an empty batch)
        if invstd.dim() == 1:
            sample_beta, sample_gamma, count = grad_beta, grad_gamma, count * grad_y.size(0)
        grad_y = grad_y - broadcast(sample_beta / count, x_hat) - x_hat * broadcast(sample_gamma / count, x_hat)
    return grad_y * broadcast(gamma * invstd, x_hat), grad_gamma, grad_beta


def bn_relu_math(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """relu(gamma * (x - mean) * invstd + beta) per channel, in x's dtype and layout."""
    z = normalize(x, mean, invstd) * broadcast(gamma, x) + broadcast(beta, x)
    return torch.relu(z).to(x.dtype)


def matmul_channels(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv as a GEMM: weight [B, C] times x [N, C, *spatial], output in x's layout."""
    flat = x.flatten(2)
    if is_channels_last(x):
        out = (flat.mT @ weight.mT).mT
    else:
        out = weight @ flat
    return out.unflatten(2, x.shape[2:])
