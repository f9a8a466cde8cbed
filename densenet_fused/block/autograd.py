"""Autograd of the block ops: the backward op, accumulating into the incoming gradient where nothing else
can see it, and a differentiable backward for ``create_graph=True``."""

import sys
import sysconfig
import weakref

import torch
from torch import Tensor

from .. import distributed
from ..ops import prelu
from ..ops._autograd import as_batch_stats, grad_leaves
from ..ops.bn_relu import bn_relu_reference
from ..ops.bn_relu_conv1x1 import bn_relu_conv1x1_reference
from .ops import conv3x3, dense_block, dense_block_backward, dense_block_backward_, drop_scale
from .plan import _plans, _unflatten, layer_norms


class _DenseBlockFunction(torch.autograd.Function):
    """Autograd of ``dense_block``: its backward op, or under ``create_graph=True`` a differentiable backward.

    A plain autograd.Function rather than ``register_autograd``: the differentiable backward runs autograd
    through the saved buffer, which torch.library's autograd wrapper does not allow re-entrantly.
    """

    @staticmethod
    def forward(ctx, num_inputs, sizes, plan_args, group, instance, count, *tensors):
        inputs, rest = tensors[:num_inputs], tensors[num_inputs:]
        params, running, masks = _split(rest, sizes)
        buf, mean, var, mean2, var2, bottlenecks = dense_block(
            inputs, params, running, masks, *plan_args, group, instance, count
        )
        ctx.plan_args, ctx.group, ctx.instance, ctx.sizes = plan_args, group, instance, sizes
        ctx.input_channels = [x.size(1) for x in inputs]
        ctx.save_for_backward(buf, mean, var, mean2, var2, count, *rest, *bottlenecks)
        ctx.mark_non_differentiable(mean, var, mean2, var2)
        return buf, mean, var, mean2, var2

    @staticmethod
    def backward(ctx, grad_buf, *unused_stat_grads):
        return _block_backward(ctx, grad_buf, in_place=False)


# Writing into a gradient needs autograd's boxed calling convention (``boxed_grads_call``) and exact reference
# counts: sys.getrefcount counts every reference on CPython before 3.14 with the GIL (3.14 borrows references
# on its stack, free-threaded builds defer some).  Elsewhere every block backward copies the gradient.
_WRITES_GRADIENTS = (
    hasattr(torch.autograd.Function, "boxed_grads_call")
    and sys.implementation.name == "cpython"
    and sys.version_info < (3, 14)
    and not sysconfig.get_config_var("Py_GIL_DISABLED")
)


def _compiled_autograd_on() -> bool:
    """Whether torch's compiled autograd is switched on, which cannot run a ``boxed_grads_call`` Function (read
    without importing torch._dynamo, which imports triton: nothing can be on before it is imported)."""
    dynamo, compiled = sys.modules.get("torch._dynamo"), sys.modules.get("torch._dynamo.compiled_autograd")
    return (dynamo is not None and dynamo.config.compiled_autograd) or bool(compiled and compiled.compiled_autograd_enabled)


class _EagerDenseBlockFunction(_DenseBlockFunction):
    """``_DenseBlockFunction`` outside torch.compile, without the copy of the buffer's gradient where none is needed.

    It takes its gradients as one list (``boxed_grads_call``), which autograd hands over without keeping
    references of its own, empties the list, and accumulates into the buffer's gradient itself when nothing
    else can see that tensor (``_writable``).  torch.compile traces ``_DenseBlockFunction``: dynamo passes the
    gradients one by one, and its graphs keep ops functional.
    """

    boxed_grads_call = True

    @staticmethod
    def backward(ctx, grads):
        grad_buf = grads[0]
        grads.clear()
        in_place = _writable(grad_buf, ctx.saved_tensors[0])
        return _block_backward(ctx, grad_buf, in_place)


def _writable(grad: Tensor, buf: Tensor) -> bool:
    """Whether the block can accumulate into ``grad``, the gradient of ``buf`` its caller holds in one variable:
    a plain dense tensor in buf's dtype and strides, held by nothing else, so that no one sees it change.

    Anything that could see it holds a reference: from C++ (autograd's buffers of other nodes that receive the
    same gradient, saved tensors, a ``.grad``), from Python (the tensor a user passed to ``backward``, one a hook
    kept, a weak reference) or to its memory (views, ``detach()``).  So all the counts must be the least
    possible: one C++ reference (its Python object), three Python ones (the caller's variable, this argument,
    getrefcount's), no weak one, and two on its storage (this tensor and the storage object asked for here).
    """
    plain = type(grad) is torch.Tensor and grad.layout == torch.strided and not grad._is_zerotensor()
    layout = plain and grad.dtype == buf.dtype and grad.device == buf.device and grad.stride() == buf.stride()
    return (
        layout
        and not grad.requires_grad
        and grad._use_count() == 1
        and sys.getrefcount(grad) == 3
        and weakref.getweakrefcount(grad) == 0
        and torch._C._storage_Use_Count(grad.untyped_storage()._cdata) == 2
    )


def _block_backward(ctx, grad_buf, in_place: bool) -> tuple:
    """The gradients of ``_DenseBlockFunction``'s inputs; ``in_place``: accumulate into ``grad_buf`` itself."""
    buf, mean, var, mean2, var2, count, *rest = ctx.saved_tensors
    (params, running, masks), bottlenecks = _split(rest, ctx.sizes), rest[sum(ctx.sizes) :]
    block_args = (mean, var, mean2, var2, params, running, masks, bottlenecks, *ctx.plan_args, ctx.group, ctx.instance, count)
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, for double backward
        grad_buffer, grad_params = _differentiable_backward(
            ctx, grad_buf, buf, mean, var, mean2, var2, params, running, masks
        )
    elif in_place:
        grad_buffer, grad_params = grad_buf, dense_block_backward_(grad_buf, buf, *block_args)
    else:
        grad_buffer, grad_params = dense_block_backward(grad_buf, buf, *block_args)
    grad_inputs, start = [], 0
    for channels in ctx.input_channels:
        grad_inputs.append(grad_buffer[:, start : start + channels])
        start += channels
    return None, None, None, None, None, None, *grad_inputs, *grad_params, *[None] * (len(running) + len(masks))


def _split(tensors, sizes) -> list[list]:
    """``tensors`` cut into consecutive lists of the given ``sizes``."""
    parts, start = [], 0
    for size in sizes:
        parts.append(list(tensors[start : start + size]))
        start += size
    return parts


def _differentiable_backward(ctx, grad_buf, buf, mean, var, mean2, var2, params, running, masks):
    """dense_block's backward as PyTorch ops that autograd can differentiate again.

    It recomputes the block from its input channels (the first ones of the saved buffer) with the reference
    primitives and the batch statistics as functions of their channels (``as_batch_stats``), and lets
    autograd differentiate that with ``create_graph=True``.
    """
    if ctx.group is not None:
        distributed.refuse_double_backward("dense block")
    plans, masks = _plans(ctx.plan_args), iter(masks)
    with torch.enable_grad():
        leaves = grad_leaves([buf[:, : sum(ctx.input_channels)], *params])
        x, layers = leaves[0], _unflatten(leaves[1:], plans)
        for plan, p, (norm1, norm2) in zip(plans, layers, layer_norms(plans, layers, running, mean, var, mean2, var2)):
            m1, is1 = norm1.with_invstd(mean.dtype)[:2]
            if plan.training1:
                m1, is1 = as_batch_stats(x, m1, is1)
            weight = p.conv1.flatten(1).to(x.dtype)
            bottleneck = bn_relu_conv1x1_reference(x, m1, is1, p.gamma1, p.beta1, weight)
            if p.slope1 is not None:  # PReLU: the GEMM of relu(-t) too (ops.prelu)
                weight = prelu.slope_weight(weight, -p.slope1)
                bottleneck = bottleneck + bn_relu_conv1x1_reference(x, m1, is1, -p.gamma1, -p.beta1, weight)
            m2, is2 = norm2.with_invstd(mean.dtype)[:2]
            if plan.training2:
                m2, is2 = as_batch_stats(bottleneck, m2, is2)
            if p.slope2 is None:
                z2 = bn_relu_reference(bottleneck, m2, is2, p.gamma2, p.beta2)
            else:
                z2 = prelu.bn_prelu_reference(bottleneck, m2, is2, p.gamma2, p.beta2, p.slope2)
            new = conv3x3(z2, p.conv2)
            if plan.drop > 0:
                new = new * next(masks) * drop_scale(plan.drop)
            x = torch.cat([x, new], 1)
        grads = torch.autograd.grad(x, leaves, grad_buf, create_graph=True, allow_unused=True, materialize_grads=True)
    return grads[0], grads[1:]
