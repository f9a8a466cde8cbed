"""How the primitives differentiate, and differentiable backward formulas for ``create_graph=True``.

The kernels' backward ops have no derivatives of their own.  When autograd records the backward, the
primitives and the block instead recompute their forward with the pure-PyTorch reference and let autograd
differentiate it, so the gradients they return can be differentiated again.
"""

from typing import Callable, NamedTuple, Optional

import torch


class Autograd(NamedTuple):
    """A forward op's ``register_autograd`` pair (None for an op autograd does not differentiate, such as
    a backward op), and the (name, type) arguments the op takes after its reference's: read by
    ``setup_context`` only, the kernels never see them."""

    backward: Optional[Callable] = None
    setup_context: Optional[Callable] = None
    args: tuple = ()


def bn_autograd(reference, kernel_backward) -> Autograd:
    """Autograd of ``op(x, mean, invstd, *params, training)`` = ``reference(x, mean, invstd, *params)``.

    ``kernel_backward(grad, x, mean, invstd, *params, training)`` returns (grad_x, *grad_params) through
    the op's backward kernels; under ``create_graph=True`` the reference is differentiated instead.
    mean and invstd get no gradient: ``training`` says they are x's batch statistics, and then the
    gradient through them is part of grad_x.
    """

    def setup_context(ctx, inputs, output):
        *tensors, ctx.training = inputs
        ctx.save_for_backward(*tensors)

    def backward(ctx, grad):
        x, mean, invstd, *params = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grad_x, *grad_params = reference_backward(reference, grad, x, mean, invstd, params, ctx.training)
        else:
            grad_x, *grad_params = kernel_backward(grad, x, mean, invstd, *params, ctx.training)
        return grad_x, None, None, *grad_params, None

    return Autograd(backward, setup_context, (("training", bool),))


def grad_leaves(tensors: list) -> list:
    """Stand-ins for ``tensors`` to recompute with and differentiate with respect to.

    Those that need a gradient become aliases (``view_as``), so that autograd.grad stops at them and never
    runs backward nodes beyond them (such as the block's own node, which also leads to its parameters);
    the others become detached leaves.
    """
    return [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in tensors]


def as_batch_stats(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``invstd`` (x's batch statistics, already computed) as differentiable functions of x.

    Their values stay the given ones; their derivatives of every order are those of x's mean and of
    rsqrt(var + eps), since var + eps = 1 / invstd^2 whatever eps was.  Per-sample statistics [N, C]
    (instance norm) are those of each sample's spatial dims.
    """
    dims = [*([0] if mean.dim() == 1 else []), *range(2, x.dim())]
    batch_var, batch_mean = torch.var_mean(x.to(mean.dtype), dim=dims, correction=0)
    mean = mean.detach() + (batch_mean - batch_mean.detach())
    return mean, torch.rsqrt(invstd.detach().pow(-2) + (batch_var - batch_var.detach()))


def reference_backward(reference, grad_out, x, mean, invstd, params: list, training: bool) -> tuple:
    """Gradients of ``reference(x, mean, invstd, *params)`` for x and each of ``params``, differentiable again.

    ``training`` says mean/invstd are x's batch statistics, so the gradient flows through them too.
    """
    leaves = grad_leaves([x, *params])
    with torch.enable_grad():
        if training:
            mean, invstd = as_batch_stats(leaves[0], mean, invstd)
        out = reference(leaves[0], mean, invstd, *leaves[1:])
        return torch.autograd.grad(out, leaves, grad_out, create_graph=True, allow_unused=True, materialize_grads=True)
