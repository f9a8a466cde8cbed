"""PReLU after a norm, from the BN -> ReLU primitives: no kernel of its own.

prelu(t) = relu(t) - a * relu(-t), and relu(-t) is BN -> ReLU with -gamma and -beta (``negated``).  So each
fused BN -> ReLU primitive computes BN -> PReLU in two calls: an output that follows a linear map (the 1x1
conv, the transition's pool and conv, the head's average) as the sum of two calls, the second with the weight
``slope_weight`` (-W diag(a)); an output that does not (the stem's max pool) as ``bn_prelu``.  Their
backwards are two calls too: the BatchNorm backward is linear in the gradient it gets, training terms
included, so the two input gradients add up to PReLU's, and the slope's gradient is -sum(grad * relu(-t)).
Nothing is stored: backward recomputes both halves from x, as it recomputes the ReLU.
"""

import torch.nn.functional as F
from torch import Tensor

from ._math import normalize
from ._norm_args import NormArgs
from .layout import broadcast


def negated(norm: NormArgs) -> NormArgs:
    """The norm whose ReLU is relu(-t): gamma and beta negated."""
    return norm._replace(gamma=-norm.gamma, beta=-norm.beta)


def _channel_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def bn_prelu(bn_relu, x: Tensor, norm: NormArgs, slope: Tensor) -> tuple[Tensor, Tensor]:
    """(prelu(t), relu(-t)) in x's dtype and layout for t the norm of x, by two calls of ``bn_relu(x, norm)``;
    ``slope`` is PReLU's weight, [1] or [C]."""
    negative = bn_relu(x, negated(norm))
    return bn_relu(x, norm) - negative * broadcast(slope, x).to(x.dtype), negative


def bn_prelu_backward(bn_relu_backward, grad_z: Tensor, x: Tensor, norm: NormArgs, slope: Tensor, negative: Tensor,
                      training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad_x, grad_gamma, grad_beta, grad_slope) of ``bn_prelu`` by two calls of ``bn_relu_backward(grad, x,
    norm, training)``; ``negative`` is relu(-t), which ``bn_prelu`` returned."""
    grad_x, grad_gamma, grad_beta = bn_relu_backward(grad_z, x, norm, training)
    grad_negative = grad_z * broadcast(-slope, x).to(grad_z.dtype)
    grad_x2, grad_gamma2, grad_beta2 = bn_relu_backward(grad_negative, x, negated(norm), training)
    grad_slope = -(grad_z.to(slope.dtype) * negative).sum(_channel_dims(x)).sum_to_size(slope.shape)
    return grad_x + grad_x2, grad_gamma - grad_gamma2, grad_beta - grad_beta2, grad_slope


def slope_weight(weight: Tensor, slope: Tensor) -> Tensor:
    """-W diag(a): the weight [B, C, ...] that a linear map applies to relu(-t) so that the two calls sum to W
    applied to prelu(t)."""
    return weight * -slope.view(1, -1, *[1] * (weight.dim() - 2)).to(weight.dtype)


def weight_and_slope_grads(grad_weight: Tensor, grad_second: Tensor, weight: Tensor,
                           slope: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(grad W, grad a) from the gradients of W (first call) and of ``slope_weight(W, a)`` (second call)."""
    grad_weight = grad_weight + slope_weight(grad_second, slope)
    dims = [0, *range(2, weight.dim())]
    grad_slope = -(grad_second * weight).sum(dims).to(slope.dtype).sum_to_size(slope.shape)
    return grad_weight, grad_slope


def bn_prelu_reference(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, slope: Tensor) -> Tensor:
    """prelu(gamma * (x - mean) * invstd + beta, slope) per channel, in x's dtype and layout (the oracle)."""
    t = normalize(x, mean, invstd) * broadcast(gamma, x) + broadcast(beta, x)
    return F.prelu(t, slope.to(t.dtype)).to(x.dtype)
