"""The block's two custom ops: ``dense_block`` runs the layers over one buffer, ``dense_block_backward`` their
backward into one gradient buffer.  Both are opaque to torch.compile."""

import torch
from torch import Tensor
from typing import Optional

from .. import distributed
from ..ops import bn_relu, bn_relu_backward, bn_relu_conv1x1, bn_relu_conv1x1_backward
from ..ops import channel_stats
from ..ops.channel_stats import instance_stats
from ..ops.layout import acc_dtype, empty_like_layout
from .plan import _PLAN_SCHEMA, _plans, _running_stats, _unflatten


def _conv3x3(z: Tensor, weight: Tensor) -> Tensor:
    d = z.dim() - 2
    return torch.convolution(z, weight, None, [1] * d, [1] * d, [1] * d, False, [0] * d, 1)


def _conv3x3_backward(grad: Tensor, z: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    d = z.dim() - 2
    grad_z, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, z, weight, None, [1] * d, [1] * d, [1] * d, False, [0] * d, 1, [True, True, False]
    )
    return grad_z, grad_w


def _norm_inputs(eps: float, batch_mean: Tensor, batch_var: Tensor, running: Optional[tuple]) -> tuple:
    """(mean, invstd): the running ones when given, else from the batch statistics computed in the block."""
    if running is None:
        return batch_mean, torch.rsqrt(batch_var + eps)
    return running


def _batch_stats(x: Tensor, sync, instance: bool) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x's batch, or with a ``sync`` hook of the group's batch;
    per sample and channel ([N, C]) for instance norms."""
    if instance:
        return instance_stats(x)
    mean, var = channel_stats(x)
    return (mean, var) if sync is None else sync.stats(x, mean, var)


def _synchronize_(sync, training: bool, grad_x, x, mean, invstd, gamma, grad_beta, grad_gamma) -> None:
    """After a primitive's backward ran the eval formula for a synchronized norm (training and sync), add the
    group's training terms to grad_x in place; nothing to do otherwise."""
    if training and sync is not None:
        sync.backward_(grad_x, x, mean, invstd, gamma, grad_beta, grad_gamma)


def _apply_dropout(new: Tensor, mask: Tensor, drop: float) -> Tensor:
    """new * mask / (1 - p): F.dropout with the mask drawn before the block (see ``_dropout_masks``)."""
    return new * mask * (1.0 / (1.0 - drop))


@torch.library.custom_op(
    "densenet_fused::dense_block",
    mutates_args=(),
    schema=f"(Tensor[] inputs, Tensor[] params, Tensor[] running, Tensor[] masks, {_PLAN_SCHEMA}, str? group, "
    "bool instance, Tensor? count) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])",
)
def dense_block(inputs, params, running, masks, *plan_args_block):
    """Run the layers over one buffer holding ``inputs`` concatenated.

    ``params`` are the layers' ``_LayerParams`` flattened, ``running`` the (mean, invstd) of the norms that
    use running statistics, ``masks`` the dropout masks of the layers that drop, and the lists after them the
    layers' ``_LayerPlan`` field by field.  ``group`` names the process group the batch statistics are
    reduced over (None: this process's batch), ``instance`` says the norms are instance norms and ``count``
    is the number of values per channel over the group.  Returns (buffer, mean, var, mean2, var2, kept
    bottlenecks): the batch statistics of every buffer channel ([C], or [N, C] for instance norms) and of each
    layer's bottleneck ([L, width] or [L, N, width]), zeros where unused.
    """
    *plan_args, group, instance, count = plan_args_block
    plans, layers = _plans(plan_args), _unflatten(params)
    sync = distributed.BatchNormSync.named(group, count)
    growth, width, c0 = plans[0].growth, plans[0].width, sum(x.size(1) for x in inputs)
    buf = empty_like_layout(inputs[0], c0 + len(plans) * growth)
    start = 0
    for x in inputs:
        buf[:, start : start + x.size(1)].copy_(x)
        start += x.size(1)
    mean, mean2 = _stats_like(buf, len(plans), width, instance, torch.zeros)
    var, var2 = torch.zeros_like(mean), torch.zeros_like(mean2)
    any_batch = any(plan.training1 for plan in plans)
    if any_batch:
        mean[..., :c0], var[..., :c0] = _batch_stats(buf[:, :c0], sync, instance)
    masks, bottlenecks = iter(masks), []
    for l, (plan, p, (running1, running2)) in enumerate(zip(plans, layers, _running_stats(plans, running))):
        c = c0 + l * growth
        m1, is1 = _norm_inputs(plan.eps1, mean[..., :c], var[..., :c], running1)
        bottleneck = bn_relu_conv1x1(buf[:, :c], m1, is1, p.gamma1, p.beta1, p.conv1.flatten(1), plan.training1)
        if plan.training2:
            mean2[l], var2[l] = _batch_stats(bottleneck, sync, instance)
        m2, is2 = _norm_inputs(plan.eps2, mean2[l], var2[l], running2)
        new = _conv3x3(bn_relu(bottleneck, m2, is2, p.gamma2, p.beta2, plan.training2), p.conv2)
        if plan.drop > 0:
            new = _apply_dropout(new, next(masks), plan.drop)
        buf[:, c : c + growth].copy_(new)
        if any_batch:
            mean[..., c : c + growth], var[..., c : c + growth] = _batch_stats(buf[:, c : c + growth], sync, instance)
        if plan.keep_bottleneck:
            bottlenecks.append(bottleneck)
    return buf, mean, var, mean2, var2, bottlenecks


def _stats_like(buf: Tensor, layers: int, width: int, instance: bool, factory) -> tuple[Tensor, Tensor]:
    """New tensors (``factory``: torch.zeros or torch.empty) for the statistics of buf's channels and of each
    layer's bottleneck: [C] and [L, width], or per sample [N, C] and [L, N, width] for instance norms."""
    n = [buf.size(0)] if instance else []
    acc = acc_dtype(buf.dtype)
    return factory((*n, buf.size(1)), dtype=acc, device=buf.device), factory((layers, *n, width), dtype=acc, device=buf.device)


@dense_block.register_fake
def _dense_block_fake(inputs, params, running, masks, *plan_args_block):
    plans, instance = _plans(plan_args_block[:-3]), plan_args_block[-2]
    width = plans[0].width
    buf = empty_like_layout(inputs[0], sum(x.size(1) for x in inputs) + sum(plan.growth for plan in plans))
    mean, mean2 = _stats_like(buf, len(plans), width, instance, torch.empty)
    bottlenecks = [empty_like_layout(buf, width) for plan in plans if plan.keep_bottleneck]
    return buf, mean, torch.empty_like(mean), mean2, torch.empty_like(mean2), bottlenecks


@torch.library.custom_op(
    "densenet_fused::dense_block_backward",
    mutates_args=(),
    schema="(Tensor grad_buf, Tensor buf, Tensor mean, Tensor var, Tensor mean2, Tensor var2, Tensor[] params, "
    f"Tensor[] running, Tensor[] masks, Tensor[] bottlenecks, {_PLAN_SCHEMA}, str? group, bool instance, "
    "Tensor? count) -> (Tensor, Tensor[])",
)
def dense_block_backward(grad_buf, buf, mean, var, mean2, var2, params, running, masks, bottlenecks, *plan_args_block):
    """``dense_block``'s backward: (the gradient of the whole buffer, that of ``params``).

    Only the buffer's input channels of the first tensor are meaningful to the caller.
    """
    grad_buffer = empty_like_layout(buf, buf.size(1))
    grad_buffer.copy_(grad_buf)
    grads = dense_block_backward_(grad_buffer, buf, mean, var, mean2, var2, params, running, masks, bottlenecks,
                                  *plan_args_block)  # fmt: skip
    return grad_buffer, grads


def dense_block_backward_(grad_buffer, buf, mean, var, mean2, var2, params, running, masks, bottlenecks,
                          *plan_args_block) -> list[Tensor]:  # fmt: skip
    """``dense_block_backward`` into ``grad_buffer``, which holds the buffer's gradient in buf's layout: every
    layer's input gradient is added into it in place.  Returns the gradients of ``params``."""
    *plan_args, group, _, count = plan_args_block
    plans, layers = _plans(plan_args), _unflatten(params)
    running = _running_stats(plans, running)
    sync = distributed.BatchNormSync.named(group, count)
    growth = plans[0].growth
    c0 = buf.size(1) - len(plans) * growth
    masks, bottlenecks = list(masks), list(bottlenecks)
    grads = []
    for l in reversed(range(len(plans))):
        plan, p, (running1, running2), c = plans[l], layers[l], running[l], c0 + l * growth
        m1, is1 = _norm_inputs(plan.eps1, mean[..., :c], var[..., :c], running1)
        m2, is2 = _norm_inputs(plan.eps2, mean2[l], var2[l], running2)
        x, w1 = buf[:, :c], p.conv1.flatten(1)
        if plan.keep_bottleneck:
            bottleneck = bottlenecks.pop()
        else:
            bottleneck = bn_relu_conv1x1(x, m1, is1, p.gamma1, p.beta1, w1, plan.training1)
        grad_new = grad_buffer[:, c : c + growth]
        if plan.drop > 0:
            grad_new = _apply_dropout(grad_new, masks.pop(), plan.drop)
        z2 = bn_relu(bottleneck, m2, is2, p.gamma2, p.beta2, plan.training2)
        grad_z2, grad_w2 = _conv3x3_backward(grad_new, z2, p.conv2)
        del z2, grad_new
        # Synchronized norms run the eval formula here and get the group's training terms after it.
        local = sync is None
        grad_bottleneck, grad_g2, grad_b2 = bn_relu_backward(
            grad_z2, bottleneck, m2, is2, p.gamma2, p.beta2, plan.training2 and local
        )
        _synchronize_(sync, plan.training2, grad_bottleneck, bottleneck, m2, is2, p.gamma2, grad_b2, grad_g2)
        del grad_z2, bottleneck
        grad_w1, grad_g1, grad_b1 = bn_relu_conv1x1_backward(
            grad_bottleneck, x, m1, is1, p.gamma1, p.beta1, w1, grad_buffer, plan.training1 and local
        )
        del grad_bottleneck  # before the next layer's recompute: it would be live at that layer's peak
        _synchronize_(sync, plan.training1, grad_buffer[:, :c], x, m1, is1, p.gamma1, grad_b1, grad_g1)
        grads[:0] = [grad_g1, grad_b1, grad_w1.reshape(p.conv1.shape), grad_g2, grad_b2, grad_w2.contiguous()]
    return grads


@dense_block_backward.register_fake
def _dense_block_backward_fake(grad_buf, buf, mean, var, mean2, var2, params, *rest):
    return empty_like_layout(buf, buf.size(1)), [p.new_empty(p.shape) for p in params]
