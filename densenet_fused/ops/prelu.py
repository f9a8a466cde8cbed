"""PReLU after a norm, from the BN -> ReLU primitives: no kernel of its own.

prelu(t) = relu(t) - a * relu(-t), and relu(-t) is BN -> ReLU with -gamma and -beta (``PReLUArgs``).  So each
fused BN -> ReLU primitive computes BN -> PReLU in two calls: an output that follows a linear map (the 1x1
conv, the transition's pool and conv, the head's average) as the sum of two calls, the second with the weight
``slope_weight`` (-W diag(a)); an output that does not (the stem's max pool) as ``bn_prelu``.  Their
backwards are two calls too: the BatchNorm backward is linear in the gradient it gets, training terms
included, so the two input gradients add up to PReLU's, and the slope's gradient is -sum(grad * relu(-t)).
Nothing is stored: backward recomputes both halves from x, as it recomputes the ReLU.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._math import normalize
from ._norm_args import NormArgs
from .layout import broadcast


class PReLUArgs(NamedTuple):
    """A PReLU after a norm as the ReLU kernels take it: ``negated``, the norm whose ReLU is relu(-t) (gamma and
    beta negated), and ``neg_slope``, -a ([1] or one per channel)."""

    negated: NormArgs
    neg_slope: Tensor


def prelu_args(norms: list[NormArgs], slopes: list[Tensor]) -> list[PReLUArgs]:
    """The ``PReLUArgs`` of PReLUs with these slopes after these norms (one foreach op negates them all)."""
    if not norms:  # ReLUs only
        return []
    negated = torch._foreach_neg([t for norm, slope in zip(norms, slopes) for t in (norm.gamma, norm.beta, slope)])
    parts = zip(norms, negated[0::3], negated[1::3], negated[2::3])
    return [PReLUArgs(norm._replace(gamma=gamma, beta=beta), neg_slope) for norm, gamma, beta, neg_slope in parts]


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return broadcast(v, x).to(x.dtype)


def bn_prelu(bn_relu, x: Tensor, norm: NormArgs, prelu: PReLUArgs) -> tuple[Tensor, Tensor]:
    """(prelu(t), relu(-t)) in x's dtype and layout for t the norm of x, by two calls of ``bn_relu(x, norm)``."""
    z, negative = bn_relu(x, norm), bn_relu(x, prelu.negated)
    return z.addcmul_(negative, _per_channel(prelu.neg_slope, x)), negative


def bn_prelu_backward(bn_relu_backward, grad_z: Tensor, x: Tensor, norm: NormArgs, prelu: PReLUArgs,
                      training: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad_x, grad_gamma, grad_beta) of ``bn_prelu`` by two calls of ``bn_relu_backward(grad, x, norm,
    training)``, overwriting ``grad_z`` (no more memory than ReLU's backward but the second input gradient);
    the slope's is ``slope_grad(grad_z, relu(-t), neg_slope)``, to take before."""
    grad_x, grad_gamma, grad_beta = bn_relu_backward(grad_z, x, norm, training)
    second = bn_relu_backward(grad_z.mul_(_per_channel(prelu.neg_slope, grad_z)), x, prelu.negated, training)
    torch._foreach_sub_([grad_gamma, grad_beta], list(second[1:]))
    return grad_x.add_(second[0]), grad_gamma, grad_beta


def slope_grad(grad: Tensor, negative: Tensor, neg_slope: Tensor) -> Tensor:
    """-sum(grad * negative) per channel (over everything for a single slope), shaped and typed as the slope:
    the slope's gradient for relu(-t) = ``negative``, and for the weight -W diag(a) with ``grad`` its gradient
    and ``negative`` W."""
    dims = list(range(grad.dim())) if neg_slope.numel() == 1 else [0, *range(2, grad.dim())]
    return torch.mul(grad, negative).sum(dims, dtype=neg_slope.dtype).neg_().view(neg_slope.shape)


def _input_channels(neg_slope: Tensor, weight: Tensor) -> Tensor:
    return neg_slope.view(1, -1, *[1] * (weight.dim() - 2)).to(weight.dtype)


def slope_weight(weight: Tensor, neg_slope: Tensor) -> Tensor:
    """-W diag(a) (``neg_slope`` is -a): the weight [B, C, ...] that a linear map applies to relu(-t), so that
    the two calls sum to W applied to prelu(t)."""
    return weight * _input_channels(neg_slope, weight)


def add_slope_weight_(out: Tensor, weight: Tensor, neg_slope: Tensor) -> Tensor:
    """``out += slope_weight(weight, neg_slope)`` in one op: W's gradient from that of -W diag(a)."""
    return out.addcmul_(weight, _input_channels(neg_slope, weight))


def bn_prelu_reference(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, slope: Tensor) -> Tensor:
    """prelu(gamma * (x - mean) * invstd + beta, slope) per channel, in x's dtype and layout (the oracle)."""
    t = normalize(x, mean, invstd) * broadcast(gamma, x) + broadcast(beta, x)
    return F.prelu(t, slope.to(t.dtype)).to(x.dtype)
