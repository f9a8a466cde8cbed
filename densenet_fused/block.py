"""The shared-buffer dense block (Pleiss et al. 2017), its layers and the fused transition.

Module names, parameters and initialization follow torchvision's densenet.py exactly; only the
forward passes differ.  A block forward allocates one feature buffer [N, C0 + L*k, *spatial]; layer l
reads the prefix ``buf[:, :C_l]`` and writes its k new channels into ``buf[:, C_l:C_l + k]``.  The
batch statistics of a channel are computed once, when it is written.  Backward saves only the buffer
and the statistics, recomputes each layer's BN -> ReLU -> 1x1 conv, and adds every layer's input
gradient into one shared gradient buffer.

Under torch.autocast the buffer, its gradient and the convolutions use the autocast dtype, while
statistics and BatchNorm parameters stay float32.  Norms converted to SyncBatchNorm have their
statistics and BatchNorm-backward sums reduced over their process group (see ``distributed``).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from . import norm as bn
from . import tracing
from .ops import bn_relu, bn_relu_backward, bn_relu_conv1x1, bn_relu_conv1x1_backward, bn_relu_pool_conv1x1
from .ops import channel_stats
from .ops._backend import acc_dtype, empty_like_layout

_PARAMS_PER_LAYER = 10  # mean1, invstd1, gamma1, beta1, conv1, mean2, invstd2, gamma2, beta2, conv2


@dataclass(frozen=True)
class LayerTypes:
    """The torch.nn modules of one spatial rank."""

    conv: type
    norm: type
    avg_pool: type
    max_pool: type


_LAYER_TYPES = {
    1: LayerTypes(nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.MaxPool1d),
    2: LayerTypes(nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d),
    3: LayerTypes(nn.Conv3d, nn.BatchNorm3d, nn.AvgPool3d, nn.MaxPool3d),
}


def layer_types(spatial_dims: int) -> LayerTypes:
    """Conv/BatchNorm/pooling classes for 1, 2 or 3 spatial dims."""
    if spatial_dims not in _LAYER_TYPES:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return _LAYER_TYPES[spatial_dims]


@dataclass(frozen=True)
class _LayerPlan:
    """What one layer does in this forward: batch or running stats per norm, dropout, recompute."""

    batch1: bool
    eps1: float
    batch2: bool
    eps2: float
    drop: float
    keep_bottleneck: bool


def _conv3x3(z: Tensor, weight: Tensor) -> Tensor:
    d = z.dim() - 2
    return torch.convolution(z, weight, None, [1] * d, [1] * d, [1] * d, False, [0] * d, 1)


def _conv3x3_backward(grad: Tensor, z: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    d = z.dim() - 2
    grad_z, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, z, weight, None, [1] * d, [1] * d, [1] * d, False, [0] * d, 1, [True, True, False]
    )
    return grad_z, grad_w


def _norm_inputs(batch: bool, eps: float, batch_mean: Tensor, batch_var: Tensor, mean, invstd):
    """Batch statistics (computed inside the block) or the running ones passed in."""
    if batch:
        return batch_mean, torch.rsqrt(batch_var + eps)
    return mean, invstd


def _batch_stats(x: Tensor, group, count) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x's batch, or of the whole process group's batch."""
    mean, var = channel_stats(x)
    if group is None:
        return mean, var
    return distributed.all_reduce_stats(mean, var, x.numel() // x.size(1), count, group)


class _DenseBlockFunction(torch.autograd.Function):
    """Forward and backward of a run of dense layers over one shared feature buffer.

    ``group`` is the process group the batch statistics are reduced over (None: this process's batch) and
    ``count`` the number of values per channel they cover.
    """

    @staticmethod
    def forward(ctx, plans, group, count, num_inputs, *tensors):
        inputs, params = tensors[:num_inputs], tensors[num_inputs:]
        growth, c0 = params[9].size(0), sum(x.size(1) for x in inputs)
        buf = empty_like_layout(inputs[0], c0 + len(plans) * growth)
        start = 0
        for x in inputs:
            buf[:, start : start + x.size(1)].copy_(x)
            start += x.size(1)
        acc = acc_dtype(buf.dtype)
        mean = buf.new_zeros(buf.size(1), dtype=acc)
        var = torch.zeros_like(mean)
        any_batch = any(plan.batch1 for plan in plans)
        if any_batch:
            mean[:c0], var[:c0] = _batch_stats(buf[:, :c0], group, count)
        bottleneck_width = params[4].size(0)
        mean2 = buf.new_zeros((len(plans), bottleneck_width), dtype=acc)
        var2 = torch.zeros_like(mean2)
        masks, bottlenecks = [], []
        for l, plan in enumerate(plans):
            m1, is1, g1, b1, w1, m2, is2, g2, b2, w2 = params[l * _PARAMS_PER_LAYER : (l + 1) * _PARAMS_PER_LAYER]
            c = c0 + l * growth
            m1, is1 = _norm_inputs(plan.batch1, plan.eps1, mean[:c], var[:c], m1, is1)
            bottleneck = bn_relu_conv1x1(buf[:, :c], m1, is1, g1, b1, w1.flatten(1), plan.batch1)
            if plan.batch2:
                mean2[l], var2[l] = _batch_stats(bottleneck, group, count)
            m2, is2 = _norm_inputs(plan.batch2, plan.eps2, mean2[l], var2[l], m2, is2)
            new = _conv3x3(bn_relu(bottleneck, m2, is2, g2, b2, plan.batch2), w2)
            if plan.drop > 0:
                scaled_mask = F.dropout(torch.ones_like(new), plan.drop, True)
                new.mul_(scaled_mask)
                masks.append(scaled_mask != 0)
            buf[:, c : c + growth].copy_(new)
            if any_batch:
                mean[c : c + growth], var[c : c + growth] = _batch_stats(buf[:, c : c + growth], group, count)
            if plan.keep_bottleneck:
                bottlenecks.append(bottleneck)
        ctx.plans, ctx.group, ctx.count, ctx.input_channels = plans, group, count, [x.size(1) for x in inputs]
        ctx.save_for_backward(buf, mean, var, mean2, var2, *params, *masks, *bottlenecks)
        ctx.mark_non_differentiable(mean, var, mean2, var2)
        return buf, mean, var, mean2, var2

    @staticmethod
    def backward(ctx, grad_buf, *unused_stat_grads):
        plans, group, count = ctx.plans, ctx.group, ctx.count
        buf, mean, var, mean2, var2, *rest = ctx.saved_tensors
        params, rest = rest[: len(plans) * _PARAMS_PER_LAYER], rest[len(plans) * _PARAMS_PER_LAYER :]
        num_masks = sum(plan.drop > 0 for plan in plans)
        masks, bottlenecks = list(rest[:num_masks]), list(rest[num_masks:])
        growth, c0 = params[9].size(0), sum(ctx.input_channels)
        grad_buffer = empty_like_layout(buf, buf.size(1))
        grad_buffer.copy_(grad_buf)
        grads = [None] * len(params)
        for l in reversed(range(len(plans))):
            plan = plans[l]
            m1, is1, g1, b1, w1, m2, is2, g2, b2, w2 = params[l * _PARAMS_PER_LAYER : (l + 1) * _PARAMS_PER_LAYER]
            c = c0 + l * growth
            m1, is1 = _norm_inputs(plan.batch1, plan.eps1, mean[:c], var[:c], m1, is1)
            m2, is2 = _norm_inputs(plan.batch2, plan.eps2, mean2[l], var2[l], m2, is2)
            x = buf[:, :c]
            if plan.keep_bottleneck:
                bottleneck = bottlenecks.pop()
            else:
                bottleneck = bn_relu_conv1x1(x, m1, is1, g1, b1, w1.flatten(1), plan.batch1)
            grad_new = grad_buffer[:, c : c + growth]
            if plan.drop > 0:
                grad_new = grad_new * masks.pop() * (1.0 / (1.0 - plan.drop))
            z2 = bn_relu(bottleneck, m2, is2, g2, b2, plan.batch2)
            grad_z2, grad_w2 = _conv3x3_backward(grad_new, z2, w2)
            del z2, grad_new
            # Synchronized norms run the eval formula here and get the group's training terms after it.
            sync = group is not None
            grad_bottleneck, grad_g2, grad_b2 = bn_relu_backward(
                grad_z2, bottleneck, m2, is2, g2, b2, plan.batch2 and not sync
            )
            if plan.batch2 and sync:
                distributed.sync_batch_norm_backward_(
                    grad_bottleneck, bottleneck, m2, is2, g2, grad_b2, grad_g2, count, group
                )
            del grad_z2, bottleneck
            grad_w1, grad_g1, grad_b1 = bn_relu_conv1x1_backward(
                grad_bottleneck, x, m1, is1, g1, b1, w1.flatten(1), grad_buffer, plan.batch1 and not sync
            )
            if plan.batch1 and sync:
                distributed.sync_batch_norm_backward_(
                    grad_buffer[:, :c], x, m1, is1, g1, grad_b1, grad_g1, count, group
                )
            grads[l * _PARAMS_PER_LAYER : (l + 1) * _PARAMS_PER_LAYER] = [
                None, None, grad_g1, grad_b1, grad_w1.view_as(w1), None, None, grad_g2, grad_b2, grad_w2,
            ]  # fmt: skip
        starts = [0]
        for channels in ctx.input_channels:
            starts.append(starts[-1] + channels)
        grad_inputs = [grad_buffer[:, a:b] for a, b in zip(starts, starts[1:])]
        return None, None, None, None, *grad_inputs, *grads


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


def _batch_group(norms: list, size: torch.Size, x: Tensor, what: str):
    """(process group, values per channel) of the batch statistics of ``norms`` on x (batch size ``size``).

    Local statistics reject a single value per channel as F.batch_norm does; synchronized ones do not, as
    SyncBatchNorm with more than one process does not.
    """
    group = distributed.common_group(norms, what)
    local_count = x.numel() // x.size(1)
    if group is None:
        bn.check_batch_size(size)
        return None, local_count
    return group, distributed.global_count(local_count, x.device, group)


def dense_layers_forward(layers: list["_DenseLayer"], inputs: Tensor | list[Tensor], what: str) -> Tensor:
    """Run ``layers`` over one buffer holding ``inputs`` (a tensor or a list) concatenated; return the buffer."""
    first = layers[0]
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    dtype = _check_input(inputs, first.norm1.num_features, first.conv1.weight, what)
    inputs = [x.to(dtype) for x in inputs]
    x = inputs[0]
    acc = acc_dtype(dtype)
    plans, params, batch_norms = [], [], []
    for layer in layers:
        plan = _LayerPlan(
            batch1=bn.uses_batch_stats(layer.norm1),
            eps1=layer.norm1.eps,
            batch2=bn.uses_batch_stats(layer.norm2),
            eps2=layer.norm2.eps,
            drop=layer.drop_rate if layer.training else 0.0,
            keep_bottleneck=not layer.memory_efficient,
        )
        plans.append(plan)
        for norm, batch, conv in ((layer.norm1, plan.batch1, layer.conv1), (layer.norm2, plan.batch2, layer.conv2)):
            batch_norms += [norm] if batch else []
            running = (None, None) if batch else bn.running_stats(norm, acc)
            params += [*running, *bn.affine(norm, acc, x.device), conv.weight.to(dtype)]
    group, count = None, None
    if batch_norms:
        size = torch.Size([x.size(0), first.norm1.num_features, *x.shape[2:]])
        group, count = _batch_group(batch_norms, size, x, what)
    buf, mean, var, mean2, var2 = _DenseBlockFunction.apply(plans, group, count, len(inputs), *inputs, *params)
    for l, layer in enumerate(layers):
        channels = layer.norm1.num_features
        if plans[l].batch1:
            bn.update_running_stats(layer.norm1, mean[:channels], var[:channels], count)
        if plans[l].batch2:
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
    ) -> None:
        super().__init__()
        types = layer_types(spatial_dims)
        self.norm1 = types.norm(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = types.conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)

        self.norm2 = types.norm(bn_size * growth_rate)
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

    def __init__(self, num_input_features: int, num_output_features: int, spatial_dims: int = 2) -> None:
        super().__init__()
        types = layer_types(spatial_dims)
        self.norm = types.norm(num_input_features)
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
        acc = acc_dtype(dtype)
        gamma, beta = bn.affine(self.norm, acc, input.device)
        weight = self.conv.weight.to(dtype).flatten(1)
        if not bn.uses_batch_stats(self.norm):
            return bn_relu_pool_conv1x1(input, *bn.running_stats(self.norm, acc), gamma, beta, weight, False)
        group, count = _batch_group([self.norm], input.shape, input, "Transition")
        with torch.no_grad():
            mean, var = _batch_stats(input, group, count)
        bn.update_running_stats(self.norm, mean, var, count)
        invstd = torch.rsqrt(var + self.norm.eps)
        if group is None:
            return bn_relu_pool_conv1x1(input, mean, invstd, gamma, beta, weight, True)
        return distributed.SyncTransitionFunction.apply(group, count, input, mean, invstd, gamma, beta, weight)


DenseBlock = _DenseBlock
DenseLayer = _DenseLayer
Transition = _Transition

__all__ = ["DenseBlock", "DenseLayer", "Transition", "dense_layers_forward", "layer_types"]
