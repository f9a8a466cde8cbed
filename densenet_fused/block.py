"""The shared-buffer dense block (Pleiss et al. 2017), its layers and the fused transition.

Module names, parameters and initialization follow torchvision's densenet.py exactly; only the
forward passes differ.  A block forward allocates one feature buffer [N, C0 + L*k, *spatial]; layer l
reads the prefix ``buf[:, :C_l]`` and writes its k new channels into ``buf[:, C_l:C_l + k]``.  The
batch statistics of a channel are computed once, when it is written.  Backward saves only the buffer
and the statistics, recomputes each layer's BN -> ReLU -> 1x1 conv, and adds every layer's input
gradient into one shared gradient buffer: the incoming gradient itself where nothing else can see it.

The whole block is one custom op (``densenet_fused::dense_block``, with ``dense_block_backward``), so
torch.compile sees it as opaque: the buffer, its slices and the in-place gradient accumulation are the
op's own business, and inductor cannot pick layouts for them that disagree with what the kernels write.
Under ``create_graph=True`` the backward runs differentiable PyTorch formulas, so double backward works.

The norms are BatchNorms (torchvision's) or InstanceNorms (``norm="instance"``, MONAI's choice for small
batches of 3-D volumes), all of one kind in a block.  Instance norm's statistics are per sample and
channel, and are computed once per channel too: they are exact for the same reason.

Under torch.autocast the buffer, its gradient and the convolutions use the autocast dtype, while
statistics and BatchNorm parameters stay float32.  Norms converted to SyncBatchNorm have their
statistics and BatchNorm-backward sums reduced over their process group (see ``distributed``).
"""

import sys
import sysconfig
import weakref
from dataclasses import dataclass, fields
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from . import norm as bn
from . import tracing
from .ops import bn_relu, bn_relu_backward, bn_relu_conv1x1, bn_relu_conv1x1_backward, bn_relu_pool_conv1x1
from .ops import bn_relu_pool_conv1x1_backward
from .ops import channel_stats
from .ops.channel_stats import instance_stats
from .ops._autograd import as_batch_stats, grad_leaves
from .ops.layout import acc_dtype, empty_like_layout
from .ops.bn_relu import bn_relu_reference
from .ops.bn_relu_conv1x1 import bn_relu_conv1x1_reference


@dataclass(frozen=True)
class LayerTypes:
    """The torch.nn modules of one spatial rank."""

    conv: type
    norm: type
    avg_pool: type
    max_pool: type
    instance_norm: type


_LAYER_TYPES = {
    1: LayerTypes(nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.MaxPool1d, nn.InstanceNorm1d),
    2: LayerTypes(nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d, nn.InstanceNorm2d),
    3: LayerTypes(nn.Conv3d, nn.BatchNorm3d, nn.AvgPool3d, nn.MaxPool3d, nn.InstanceNorm3d),
}


def layer_types(spatial_dims: int) -> LayerTypes:
    """Conv/BatchNorm/pooling classes for 1, 2 or 3 spatial dims."""
    if spatial_dims not in _LAYER_TYPES:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return _LAYER_TYPES[spatial_dims]


def norm_factory(spatial_dims: int, norm: str | tuple = "batch"):
    """``num_features -> norm module`` for a norm spec: "batch" (BatchNorm, torchvision's) or "instance"
    (InstanceNorm, with torch's defaults as MONAI uses them), alone or as MONAI's ``(name, kwargs)``."""
    types = layer_types(spatial_dims)
    classes = {"batch": types.norm, "instance": types.instance_norm}
    spec = (norm, {}) if isinstance(norm, str) else norm
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], dict)
            and isinstance(spec[0], str) and spec[0].lower() in classes):  # fmt: skip
        raise ValueError(f"the fused blocks implement norm='batch' and norm='instance', got norm={norm!r}")
    return partial(classes[spec[0].lower()], **spec[1])


@dataclass(frozen=True)
class _LayerPlan:
    """What one layer does in this forward: its widths, batch or running statistics per norm (``training``,
    as in F.batch_norm and the primitives), dropout, and whether backward recomputes the bottleneck."""

    growth: int
    width: int
    training1: bool
    eps1: float
    training2: bool
    eps2: float
    drop: float
    keep_bottleneck: bool


class _LayerParams(NamedTuple):
    """The differentiable tensors one layer reads: each norm's affine parameters and each conv's weight."""

    gamma1: Tensor
    beta1: Tensor
    conv1: Tensor
    gamma2: Tensor
    beta2: Tensor
    conv2: Tensor


def _flatten(params: list[_LayerParams]) -> list[Tensor]:
    return [t for p in params for t in p]


def _unflatten(flat: list) -> list[_LayerParams]:
    n = len(_LayerParams._fields)
    return [_LayerParams(*flat[i : i + n]) for i in range(0, len(flat), n)]


def _running_stats(plans: list["_LayerPlan"], running: list[Tensor]) -> list[tuple]:
    """Per layer, (mean, invstd) of norm1 and of norm2 from the flat ``running`` list, None where a norm uses
    batch statistics (``running`` holds only the others, in layer order)."""
    stats = iter(running)
    return [tuple(None if training else (next(stats), next(stats)) for training in (plan.training1, plan.training2)) for plan in plans]


_PLAN_FIELDS = tuple(f.name for f in fields(_LayerPlan))
# The block ops take the plans field by field, as lists: "int[] growth, int[] width, bool[] training1, ..."
_PLAN_SCHEMA = ", ".join(f"{f.type.__name__}[] {f.name}" for f in fields(_LayerPlan))


def _plan_args(plans: list[_LayerPlan]) -> list[list]:
    """The plans as the op's per-field lists (growth: int[], width: int[], training1: bool[], ...)."""
    return [[getattr(plan, name) for plan in plans] for name in _PLAN_FIELDS]


def _plans(plan_args) -> list[_LayerPlan]:
    return [_LayerPlan(*values) for values in zip(*plan_args)]


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
        x, layers = leaves[0], _unflatten(leaves[1:])
        for l, (plan, p, (running1, running2)) in enumerate(zip(plans, layers, _running_stats(plans, running))):
            c = x.size(1)
            m1, is1 = _norm_inputs(plan.eps1, mean[..., :c], var[..., :c], running1)
            if running1 is None:
                m1, is1 = as_batch_stats(x, m1, is1)
            bottleneck = bn_relu_conv1x1_reference(x, m1, is1, p.gamma1, p.beta1, p.conv1.flatten(1))
            m2, is2 = _norm_inputs(plan.eps2, mean2[l], var2[l], running2)
            if running2 is None:
                m2, is2 = as_batch_stats(bottleneck, m2, is2)
            new = _conv3x3(bn_relu_reference(bottleneck, m2, is2, p.gamma2, p.beta2), p.conv2)
            if plan.drop > 0:
                new = _apply_dropout(new, next(masks), plan.drop)
            x = torch.cat([x, new], 1)
        grads = torch.autograd.grad(x, leaves, grad_buf, create_graph=True, allow_unused=True, materialize_grads=True)
    return grads[0], grads[1:]


def _dropout_masks(x: Tensor, growth: int, plans: list[_LayerPlan]) -> list[Tensor]:
    """The dropout masks of the layers that drop, as bool, drawn in layer order the way torchvision's F.dropout
    calls draw them (same shape, dtype and layout as each layer's new features)."""
    drops = [plan.drop for plan in plans if plan.drop > 0]
    if not drops:  # the common case: no tensor to allocate
        return []
    ones = empty_like_layout(x, growth).fill_(1)
    return [F.dropout(ones, drop, True) != 0 for drop in drops]


def _check_input(inputs: list, expected_channels: int, weight: Tensor, what: str) -> torch.dtype:
    """Raise a clear error for input the block cannot take, before any work; return the compute dtype.

    The compute dtype (buffer, convolutions) is the input's, or under autocast the autocast dtype, which
    autocast would cast both the input and the weights to (float64 is never cast, as in torch.autocast).
    Statistics and BatchNorm parameters always stay in float32 (float64 for float64).
    """
    if not inputs:
        raise ValueError(f"{what} expects a tensor or a non-empty list of tensors")
    rank = weight.dim()
    for x in inputs:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} expects tensors, got {type(x).__name__}")
        if x.dim() != rank:
            raise ValueError(f"{what} expects a {rank}-D input [N, C, *spatial], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{what} expects a floating-point input, got {x.dtype}")
        if x.device != weight.device:
            raise RuntimeError(f"{what}: input is on {x.device} but its parameters are on {weight.device}")
        if x.size(0) == 0:
            raise ValueError(f"{what} got an empty batch (input shape {tuple(x.shape)})")
        if x.dtype != inputs[0].dtype or x.shape[2:] != inputs[0].shape[2:] or x.size(0) != inputs[0].size(0):
            raise ValueError(f"{what}: all inputs must share batch size, spatial size and dtype")
    channels = sum(x.size(1) for x in inputs)
    if channels != expected_channels:
        raise ValueError(f"{what} expects {expected_channels} input channels, got {channels}")
    dtype = _autocast_dtype(inputs[0].dtype, weight.device.type)
    if dtype != _autocast_dtype(weight.dtype, weight.device.type):
        raise TypeError(f"{what}: input dtype {inputs[0].dtype} does not match the parameters' {weight.dtype}")
    return dtype


def _autocast_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype torch.autocast runs a convolution of a ``dtype`` tensor in (``dtype`` outside autocast)."""
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if dtype != torch.float64 and autocast:
        return torch.get_autocast_dtype(device_type)
    return dtype


def _instance(norms: list, what: str) -> bool:
    """Whether ``norms`` (one block's or transition's) are instance norms; raise if they mix kinds."""
    kinds = {bn.is_instance(norm) for norm in norms}
    if len(kinds) > 1:
        raise ValueError(f"{what} computes its statistics once per channel for all its norms, which must be all BatchNorms or all InstanceNorms")
    return kinds == {True}


def _batch_group(norms: list, size: torch.Size, x: Tensor, instance: bool, what: str):
    """(sync hook or None, values per channel) of the batch statistics of ``norms`` on x (batch size ``size``).

    Local statistics reject a single value per channel as F.batch_norm (F.instance_norm) does; synchronized
    ones do not, as SyncBatchNorm with more than one process does not.  Instance norms count per sample.
    """
    group = distributed.common_group(norms, what)
    local_count = bn.stats_count(x, instance)
    if group is None:
        bn.check_batch_size(size, instance)
        return None, local_count
    count = distributed.global_count(local_count, x.device, group)
    return distributed.BatchNormSync(group, count), count


def norm_inputs(norm: nn.Module, x: Tensor, what: str) -> tuple[tuple, bool, object]:
    """((mean, invstd, gamma, beta), training, sync hook or None) for one norm applied to all of x, as a fused
    primitive takes them: its running statistics, or x's batch (or per-sample) statistics, in which case the
    norm's running statistics move as F.batch_norm (F.instance_norm) moves them."""
    acc = acc_dtype(x.dtype)
    gamma, beta = bn.affine(norm, acc, x.device)
    if not bn.uses_batch_stats(norm):
        return (*bn.running_stats(norm, acc), gamma, beta), False, None
    instance = bn.is_instance(norm)
    sync, count = _batch_group([norm], x.shape, x, instance, what)
    with torch.no_grad():
        mean, var = _batch_stats(x, sync, instance)
    bn.update_running_stats(norm, mean, var, count)
    return (mean, torch.rsqrt(var + norm.eps), gamma, beta), True, sync


def dense_layers_forward(layers: list["_DenseLayer"], inputs: Tensor | list[Tensor], what: str) -> Tensor:
    """Run ``layers`` over one buffer holding ``inputs`` (a tensor or a list) concatenated; return the buffer."""
    first = layers[0]
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    dtype = _check_input(inputs, first.norm1.num_features, first.conv1.weight, what)
    inputs = [x.to(dtype) for x in inputs]
    x = inputs[0]
    acc = acc_dtype(dtype)
    instance = _instance([norm for layer in layers for norm in (layer.norm1, layer.norm2)], what)
    plans, params, running, batch_norms = [], [], [], []
    for layer in layers:
        plan = _LayerPlan(
            growth=layer.conv2.out_channels,
            width=layer.conv1.out_channels,
            training1=bn.uses_batch_stats(layer.norm1),
            eps1=layer.norm1.eps,
            training2=bn.uses_batch_stats(layer.norm2),
            eps2=layer.norm2.eps,
            drop=layer.drop_rate if layer.training else 0.0,
            keep_bottleneck=not layer.memory_efficient,
        )
        plans.append(plan)
        for norm, batch in ((layer.norm1, plan.training1), (layer.norm2, plan.training2)):
            if batch:
                batch_norms.append(norm)
            else:
                running += bn.running_stats(norm, acc)
        gamma1, beta1 = bn.affine(layer.norm1, acc, x.device)
        gamma2, beta2 = bn.affine(layer.norm2, acc, x.device)
        params.append(_LayerParams(gamma1, beta1, layer.conv1.weight.to(dtype), gamma2, beta2, layer.conv2.weight.to(dtype)))
    sync, count = None, None
    if batch_norms:
        size = torch.Size([x.size(0), first.norm1.num_features, *x.shape[2:]])
        sync, count = _batch_group(batch_norms, size, x, instance, what)
    masks = _dropout_masks(x, first.conv2.out_channels, plans)
    params, sizes = _flatten(params), [len(params) * len(_LayerParams._fields), len(running), len(masks)]
    group, group_count = (None, None) if sync is None else (sync.name, sync.count)
    eager = _WRITES_GRADIENTS and not torch.compiler.is_compiling() and not _compiled_autograd_on()
    function = _EagerDenseBlockFunction if eager else _DenseBlockFunction
    buf, mean, var, mean2, var2 = function.apply(
        len(inputs), sizes, _plan_args(plans), group, instance, group_count, *inputs, *params, *running, *masks
    )
    for l, layer in enumerate(layers):
        channels = layer.norm1.num_features
        if plans[l].training1:
            bn.update_running_stats(layer.norm1, mean[..., :channels], var[..., :channels], count)
        if plans[l].training2:
            bn.update_running_stats(layer.norm2, mean2[l], var2[l], count)
    return buf


class _DenseLayer(nn.Module):
    """One BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 layer; callable alone with torchvision's semantics."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = True,
        spatial_dims: int = 2,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        types = layer_types(spatial_dims)
        norm_layer = norm_factory(spatial_dims, norm)
        self.norm1 = norm_layer(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = types.conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)

        self.norm2 = norm_layer(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = types.conv(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    __prepare_scriptable__ = tracing.refuse_torchscript

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        """A tensor or a list of tensors (concatenated along channels) in, ``growth_rate`` channels out."""
        if tracing.is_fx_traced(input):
            return tracing.leaf_call(self, input)
        buf = dense_layers_forward([self], input, type(self).__name__)
        return buf[:, self.norm1.num_features :]


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers sharing one feature buffer; returns that buffer."""

    _version = 2

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool = True,
        spatial_dims: int = 2,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
                spatial_dims=spatial_dims,
                norm=norm,
            )
            self.add_module("denselayer%d" % (i + 1), layer)

    __prepare_scriptable__ = tracing.refuse_torchscript

    def forward(self, init_features: Tensor | list[Tensor]) -> Tensor:
        """[N, C0 + L*k, *spatial]: the input followed by every layer's k new channels.

        A list of tensors (e.g. an upsampled map and a skip connection) is copied into the buffer side by
        side, as if concatenated along channels, without a torch.cat.
        """
        if tracing.is_fx_traced(init_features):
            return tracing.leaf_call(self, init_features)
        return dense_layers_forward(list(self.values()), init_features, "DenseBlock")


class _Transition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool, run as one fused primitive (pool before conv)."""

    def __init__(
        self, num_input_features: int, num_output_features: int, spatial_dims: int = 2, norm: str | tuple = "batch"
    ) -> None:
        super().__init__()
        types = layer_types(spatial_dims)
        self.norm = norm_factory(spatial_dims, norm)(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = types.conv(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = types.avg_pool(kernel_size=2, stride=2)

    __prepare_scriptable__ = tracing.refuse_torchscript

    def forward(self, input: Tensor) -> Tensor:
        if tracing.is_fx_traced(input):
            return tracing.leaf_call(self, input)
        dtype = _check_input([input], self.norm.num_features, self.conv.weight, "Transition")
        if any(size < 2 for size in input.shape[2:]):
            raise ValueError(f"Transition pools by 2 and needs a spatial size of at least 2, got {tuple(input.shape)}")
        input = input.to(dtype)
        weight = self.conv.weight.to(dtype).flatten(1)
        stats, training, sync = norm_inputs(self.norm, input, "Transition")
        if sync is None:
            return bn_relu_pool_conv1x1(input, *stats, weight, training)
        return _SyncTransitionFunction.apply(sync, input, *stats, weight)


class _SyncTransitionFunction(torch.autograd.Function):
    """The transition primitive normalizing with the group's batch statistics: its eval-formula backward,
    then the sync hook's training terms, as in the block."""

    @staticmethod
    def forward(ctx, sync, x, mean, invstd, gamma, beta, weight):
        ctx.sync = sync
        ctx.save_for_backward(x, mean, invstd, gamma, beta, weight)
        return bn_relu_pool_conv1x1(x, mean, invstd, gamma, beta, weight, False)

    @staticmethod
    def backward(ctx, grad_y):
        distributed.refuse_double_backward("transition")
        x, mean, invstd, gamma, beta, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_gamma, grad_beta = bn_relu_pool_conv1x1_backward(
            grad_y, x, mean, invstd, gamma, beta, weight, False
        )
        _synchronize_(ctx.sync, True, grad_x, x, mean, invstd, gamma, grad_beta, grad_gamma)
        return None, grad_x, None, None, grad_gamma, grad_beta, grad_weight


DenseBlock = _DenseBlock
DenseLayer = _DenseLayer
Transition = _Transition

__all__ = ["DenseBlock", "DenseLayer", "Transition", "dense_layers_forward", "layer_types"]
