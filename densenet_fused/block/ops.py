"""The block's two custom ops: ``dense_block`` runs the layers over one buffer, ``dense_block_backward`` their
backward into one gradient buffer.  Both are opaque to torch.compile.

Each op picks its kernels once (``backends.layer_kernels``) and runs every layer as a few direct calls of
them: no per-layer custom-op dispatch, no glue between kernels.  The statistics of a channel are written
once, where the channel is produced (the copy of the block's input or of a layer's new channels, and the
bottleneck GEMM's epilogue), into the block's statistics tensors, which the kernels read directly.
"""

import torch
from torch import Tensor

from .. import distributed
from ..backends import layer_kernels
from ..ops.layout import acc_dtype, empty_like_layout
from ..ops.prelu import add_slope_weight_, bn_prelu, bn_prelu_backward, slope_grad, slope_weight
from .plan import _PLAN_SCHEMA, _flatten, _LayerParams, layer_norms, layer_prelus, _plans, _unflatten


def conv3x3(z: Tensor, weight: Tensor) -> Tensor:
    """A layer's 3x3 convolution (padding 1) of z."""
    d = z.dim() - 2
    return torch.convolution(z, weight, None, [1] * d, [1] * d, [1] * d, False, [0] * d, 1)


def _conv3x3_backward(grad: Tensor, z: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_z, grad_weight, contiguous as the op's fake promises)."""
    d = z.dim() - 2
    grad_z, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, z, weight, None, [1] * d, [1] * d, [1] * d, False, [0] * d, 1, [True, True, False]
    )
    return grad_z, grad_w.contiguous()


def drop_scale(drop: float) -> float:
    """The factor F.dropout scales the values it keeps by (0 at p = 1, where it keeps none)."""
    return 1.0 / (1.0 - drop) if drop < 1 else 0.0


def _conv1x1(kernels, x: Tensor, norm, weight: Tensor, prelu, stats=None) -> Tensor:
    """BN -> ReLU -> 1x1 conv of x, and its statistics into ``stats``; with ``prelu`` (``ops.prelu.PReLUArgs``)
    the sum of the GEMMs of relu(t) and relu(-t), its statistics from a pass over it in place."""
    if prelu is None:
        return kernels.conv1x1(x, norm, weight, stats)
    out = kernels.conv1x1(x, norm, weight)
    out += kernels.conv1x1(x, prelu.negated, slope_weight(weight, prelu.neg_slope))
    if stats is not None:
        kernels.copy(out, out, stats)
    return out


def _bn_act(kernels, x: Tensor, norm, prelu) -> tuple[Tensor, Tensor | None]:
    """(BN -> ReLU or PReLU of x, and for a PReLU relu(-t), which its backward needs)."""
    if prelu is None:
        return kernels.bn_relu(x, norm), None
    return bn_prelu(kernels.bn_relu, x, norm, prelu)


def _bn_act_backward(kernels, grad_z, x, norm, prelu, training: bool) -> tuple:
    """(grad_x, grad_gamma, grad_beta) of ``_bn_act``; a PReLU's overwrites grad_z."""
    if prelu is None:
        return kernels.bn_relu_backward(grad_z, x, norm, training)
    return bn_prelu_backward(kernels.bn_relu_backward, grad_z, x, norm, prelu, training)


def _conv1x1_backward(kernels, grad_y, x, norm, weight, prelu, grad_buffer, training: bool) -> tuple:
    """(grad_weight, grad_gamma, grad_beta, grad_slope or None) of ``_conv1x1``; x's gradient is added into
    ``grad_buffer``."""
    grad_weight, grad_gamma, grad_beta = kernels.conv1x1_backward(grad_y, x, norm, weight, grad_buffer, training)
    if prelu is None:
        return grad_weight, grad_gamma, grad_beta, None
    second_weight = slope_weight(weight, prelu.neg_slope)
    second = kernels.conv1x1_backward(grad_y, x, prelu.negated, second_weight, grad_buffer, training)
    torch._foreach_sub_([grad_gamma, grad_beta], list(second[1:]))
    grad_slope = slope_grad(second[0], weight, prelu.neg_slope)  # a's part in -W diag(a)
    return add_slope_weight_(grad_weight, second[0], prelu.neg_slope), grad_gamma, grad_beta, grad_slope


def _channels(stats: Tensor, start: int, stop: int) -> Tensor:
    """The statistics of channels start..stop: [C] per channel, [N, C] per sample."""
    return stats.narrow(-1, start, stop - start)


@torch.library.custom_op(
    "densenet_fused::dense_block",
    mutates_args=(),
    schema=f"(Tensor[] inputs, Tensor[] params, Tensor[] running, Tensor[] masks, {_PLAN_SCHEMA}, str? group, "
    "bool instance, Tensor? count) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])",
)
def dense_block(inputs, params, running, masks, *plan_args_block):
    """Run the layers over one buffer holding ``inputs`` concatenated.

    ``params`` are the layers' ``_LayerParams`` flattened, ``running`` the (running mean, running var) of the
    norms that use running statistics, ``masks`` the dropout masks of the layers that drop (shaped like their new
    features, or [N, k, 1, ...] for channel dropout: they broadcast), and the lists after
    them the layers' ``_LayerPlan`` field by field.  ``group`` names the process group the batch statistics are
    reduced over (None: this process's batch), ``instance`` says the norms are instance norms and ``count`` is
    the number of values per channel over the group.  Returns (buffer, mean, var, mean2, var2, kept
    bottlenecks): the batch statistics of every buffer channel ([C], or [N, C] for instance norms) and of each
    layer's bottleneck ([L, width] or [L, N, width]), zeros where unused.
    """
    *plan_args, group, instance, count = plan_args_block
    plans = _plans(plan_args)
    layers = _unflatten(params, plans)
    kernels = layer_kernels(inputs[0], instance, distributed.BatchNormSync.named(group, count))
    growth, c0 = plans[0].growth, sum(x.size(1) for x in inputs)
    buf = empty_like_layout(inputs[0], c0 + len(plans) * growth)
    every_stat = all(plan.training1 and plan.training2 for plan in plans)
    mean, var, mean2, var2 = _stats_like(buf, len(plans), plans[0].width, instance, torch.empty if every_stat else torch.zeros)
    any_batch = any(plan.training1 for plan in plans)

    def stats(start: int, stop: int):
        return (_channels(mean, start, stop), _channels(var, start, stop)) if any_batch else None

    start = 0
    for x in inputs:
        kernels.copy(x, buf[:, start : start + x.size(1)], stats(start, start + x.size(1)))
        start += x.size(1)
    masks, bottlenecks = iter(masks), []
    norms = layer_norms(plans, layers, running, mean, var, mean2, var2)
    for l, (plan, p, (norm1, norm2), (prelu1, prelu2)) in enumerate(zip(plans, layers, norms, layer_prelus(layers, norms))):
        c = c0 + l * growth
        stats2 = (mean2[l], var2[l]) if plan.training2 else None
        bottleneck = _conv1x1(kernels, buf[:, :c], norm1, p.conv1, prelu1, stats2)
        new = conv3x3(_bn_act(kernels, bottleneck, norm2, prelu2)[0], p.conv2)
        keep = next(masks).expand(new.shape) if plan.drop > 0 else None  # a channel mask: zero strides
        kernels.copy(new, buf[:, c : c + growth], stats(c, c + growth), keep, drop_scale(plan.drop) if plan.drop > 0 else 1.0)
        if plan.keep_bottleneck:
            bottlenecks.append(bottleneck)
    return buf, mean, var, mean2, var2, bottlenecks


def _stats_like(buf: Tensor, layers: int, width: int, instance: bool, factory) -> tuple[Tensor, ...]:
    """New tensors (``factory``: torch.zeros or torch.empty) for the (mean, var) of buf's channels and of each
    layer's bottleneck: [C] and [L, width], or per sample [N, C] and [L, N, width] for instance norms."""
    n = [buf.size(0)] if instance else []
    options = dict(dtype=acc_dtype(buf.dtype), device=buf.device)
    channels, bottlenecks = (*n, buf.size(1)), (layers, *n, width)
    return factory(channels, **options), factory(channels, **options), factory(bottlenecks, **options), factory(bottlenecks, **options)


@dense_block.register_fake
def _dense_block_fake(inputs, params, running, masks, *plan_args_block):
    plans, instance = _plans(plan_args_block[:-3]), plan_args_block[-2]
    width = plans[0].width
    buf = empty_like_layout(inputs[0], sum(x.size(1) for x in inputs) + sum(plan.growth for plan in plans))
    bottlenecks = [empty_like_layout(buf, width) for plan in plans if plan.keep_bottleneck]
    return buf, *_stats_like(buf, len(plans), width, instance, torch.empty), bottlenecks


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
    *plan_args, group, instance, count = plan_args_block
    plans = _plans(plan_args)
    layers = _unflatten(params, plans)
    sync = distributed.BatchNormSync.named(group, count)
    kernels = layer_kernels(buf, instance, sync)
    norms = layer_norms(plans, layers, running, mean, var, mean2, var2)
    prelus = layer_prelus(layers, norms)
    growth = plans[0].growth
    c0 = buf.size(1) - len(plans) * growth
    masks, bottlenecks = list(masks), list(bottlenecks)
    grads = []
    for l in reversed(range(len(plans))):
        plan, p, (norm1, norm2), (prelu1, prelu2), c = plans[l], layers[l], norms[l], prelus[l], c0 + l * growth
        x = buf[:, :c]
        bottleneck = bottlenecks.pop() if plan.keep_bottleneck else _conv1x1(kernels, x, norm1, p.conv1, prelu1)
        grad_new = grad_buffer[:, c : c + growth]
        if plan.drop > 0:
            grad_new = grad_new * masks.pop() * drop_scale(plan.drop)
        z2, negative = _bn_act(kernels, bottleneck, norm2, prelu2)
        grad_z2, grad_w2 = _conv3x3_backward(grad_new, z2, p.conv2)
        del z2, grad_new
        grad_a2 = None if prelu2 is None else slope_grad(grad_z2, negative, prelu2.neg_slope)
        del negative  # before the BatchNorm backward's transients
        # Synchronized norms run the eval formula here and get the group's training terms after it.
        local = sync is None
        grad_bottleneck, grad_g2, grad_b2 = _bn_act_backward(
            kernels, grad_z2, bottleneck, norm2, prelu2, plan.training2 and local
        )
        if plan.training2 and not local:
            sync.backward_(grad_bottleneck, bottleneck, *norm2.with_invstd(mean.dtype)[:3], grad_b2, grad_g2)
        del grad_z2, bottleneck
        grad_w1, grad_g1, grad_b1, grad_a1 = _conv1x1_backward(
            kernels, grad_bottleneck, x, norm1, p.conv1, prelu1, grad_buffer, plan.training1 and local
        )
        del grad_bottleneck  # before the next layer's recompute: it would be live at that layer's peak
        if plan.training1 and not local:
            sync.backward_(grad_buffer[:, :c], x, *norm1.with_invstd(mean.dtype)[:3], grad_b1, grad_g1)
        grads[:0] = _flatten([_LayerParams(grad_g1, grad_b1, grad_w1, grad_g2, grad_b2, grad_w2, grad_a1, grad_a2)])
    return grads


@dense_block_backward.register_fake
def _dense_block_backward_fake(grad_buf, buf, mean, var, mean2, var2, params, *rest):
    return empty_like_layout(buf, buf.size(1)), [p.new_empty(p.shape) for p in params]
