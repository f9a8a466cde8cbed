"""The block's modules: torchvision's names, parameters and initialization, with fused forwards (torchvision's
where ``unfused`` says so: hooks inside, empty batches, torch.func)."""

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .. import activation, distributed
from .. import tracing
from . import unfused
from ..ops import bn_relu_pool_conv1x1, bn_relu_pool_conv1x1_backward, prelu
from .forward import dense_layers_forward
from .inputs import _check_input, norm_inputs


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


def _layer_spec(spec, names) -> tuple[str, dict] | None:
    """MONAI's layer spec ``name`` or ``(name, kwargs)`` as (lower-case name, kwargs), or None unless it is one
    of ``names``."""
    spec = (spec, {}) if isinstance(spec, str) else spec
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], dict)
            and isinstance(spec[0], str) and spec[0].lower() in names):  # fmt: skip
        return None
    return spec[0].lower(), dict(spec[1])


def norm_factory(spatial_dims: int, norm: str | tuple = "batch"):
    """``num_features -> norm module`` for a norm spec: "batch" (BatchNorm, torchvision's) or "instance"
    (InstanceNorm, with torch's defaults as MONAI uses them), alone or as MONAI's ``(name, kwargs)``."""
    types = layer_types(spatial_dims)
    classes = {"batch": types.norm, "instance": types.instance_norm}
    spec = _layer_spec(norm, classes)
    if spec is None:
        raise ValueError(f"the fused blocks implement norm='batch' and norm='instance', got norm={norm!r}")
    return partial(classes[spec[0]], **spec[1])


def act_factory(act: str | tuple = "relu"):
    """``() -> activation module`` for an activation spec: "relu" (torchvision's in-place ReLU) or "prelu"
    (``nn.PReLU``: one learnable slope, or ``num_parameters`` of them), alone or as MONAI's ``(name, kwargs)``
    (the kwargs go to the module, as MONAI's ``get_act_layer`` passes them)."""
    classes = {"relu": nn.ReLU, "prelu": nn.PReLU}
    spec = _layer_spec(act, classes)
    if spec is None:
        raise ValueError(
            f"the fused blocks apply act='relu' and act='prelu' (or MONAI's (name, kwargs)), got act={act!r}"
        )
    name, kwargs = spec
    return partial(classes[name], **({"inplace": True, **kwargs} if name == "relu" else kwargs))


class _DenseLayer(nn.Module):
    """One BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 layer; callable alone with torchvision's semantics.

    Dropout (``drop_rate > 0``, in training) zeroes single values of the new features, as torchvision's
    ``F.dropout``; with ``channel_dropout=True`` (keyword-only, attribute of the same name) it zeroes whole
    channels per sample, as ``F.dropout1d/2d/3d`` (MONAI's ``Dropout2d``/``Dropout3d`` in 2-D and 3-D), with the
    same RNG draws: seeded runs match.  The mask is kept per sample and channel ([N, k]), never per value.
    ``act`` (keyword-only): "relu" (torchvision's) or "prelu" (``nn.PReLU``, MONAI's spec), see
    ``act_factory``.
    """

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = True,
        spatial_dims: int = 2,
        norm: str | tuple = "batch",
        *,
        channel_dropout: bool = False,
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        types = layer_types(spatial_dims)
        norm_layer, act_layer = norm_factory(spatial_dims, norm), act_factory(act)
        self.norm1 = norm_layer(num_input_features)
        self.relu1 = act_layer()
        self.conv1 = types.conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)

        self.norm2 = norm_layer(bn_size * growth_rate)
        self.relu2 = act_layer()
        self.conv2 = types.conv(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

        self.drop_rate = float(drop_rate)
        self.channel_dropout = bool(channel_dropout)
        self.memory_efficient = memory_efficient

    __prepare_scriptable__ = tracing.refuse_torchscript

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        """A tensor or a list of tensors (concatenated along channels) in, ``growth_rate`` channels out."""
        if tracing.is_fx_traced(input):
            return tracing.leaf_call(self, input)
        if not unfused.runs_fused(self, input):
            return unfused.dense_layer(self, input)
        buf = dense_layers_forward([self], input, type(self).__name__)
        return buf[:, self.norm1.num_features :]


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers sharing one feature buffer; returns that buffer.

    ``channel_dropout`` and ``act`` (keyword-only) are its layers': dropout of whole channels instead of single
    values, and their activation.
    """

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
        *,
        channel_dropout: bool = False,
        act: str | tuple = "relu",
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
                channel_dropout=channel_dropout,
                act=act,
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
        if not unfused.runs_fused(self, init_features):
            return unfused.dense_block(self, init_features)
        return dense_layers_forward(list(self.values()), init_features, "DenseBlock")


class _Transition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool, run as one fused primitive (pool before conv); with
    ``act="prelu"`` (keyword-only) as two (``ops.prelu``)."""

    def __init__(
        self,
        num_input_features: int,
        num_output_features: int,
        spatial_dims: int = 2,
        norm: str | tuple = "batch",
        *,
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        types = layer_types(spatial_dims)
        self.norm = norm_factory(spatial_dims, norm)(num_input_features)
        self.relu = act_factory(act)()
        self.conv = types.conv(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = types.avg_pool(kernel_size=2, stride=2)

    __prepare_scriptable__ = tracing.refuse_torchscript

    def forward(self, input: Tensor) -> Tensor:
        if tracing.is_fx_traced(input):
            return tracing.leaf_call(self, input)
        if not unfused.runs_fused(self, input):
            return unfused.transition(self, input)
        weight = self.conv.weight  # once: a parametrization may have state (spectral_norm)
        dtype = _check_input([input], self.norm.num_features, weight, "Transition")
        if any(size < 2 for size in input.shape[2:]):
            raise ValueError(f"Transition pools by 2 and needs a spatial size of at least 2, got {tuple(input.shape)}")
        # statistics of the input as given (float32 under autocast), as torchvision's norm, which autocast leaves
        # in float32, takes them; then the input in the compute dtype
        slope = activation.slope_of(self.relu, self.norm)
        stats, training, sync = norm_inputs(self.norm, input, "Transition")
        input = input.to(dtype)
        weight = weight.to(dtype).flatten(1)

        def fused(stats, weight):
            if sync is None:
                return bn_relu_pool_conv1x1(input, *stats, weight, training)
            return _SyncTransitionFunction.apply(sync, input, *stats, weight)

        out = fused(stats, weight)
        if slope is None:
            return out
        mean, invstd, gamma, beta = stats
        return out + fused((mean, invstd, -gamma, -beta), prelu.slope_weight(weight, -slope))


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
        ctx.sync.backward_(grad_x, x, mean, invstd, gamma, grad_beta, grad_gamma)
        return None, grad_x, None, None, grad_gamma, grad_beta, grad_weight


DenseBlock = _DenseBlock
DenseLayer = _DenseLayer
Transition = _Transition

__all__ = ["DenseBlock", "DenseLayer", "Transition", "dense_layers_forward", "layer_types"]
