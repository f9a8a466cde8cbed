"""DenseNet-BC models, drop-in for torchvision.models.densenet: same arguments, names, init and weights."""

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet as tv
from torchvision.models._utils import handle_legacy_interface

from . import _monai_checkpoints, distributed
from . import norm as bn
from . import stem_head, tracing
from .block import unfused
from .block.modules import _DenseBlock, _Transition, act_factory, layer_types, norm_factory

_SPATIAL_NAMES = {1: "L", 2: "H, W", 3: "D, H, W"}


class DenseNet(nn.Module):
    r"""Densenet-BC model class, based on
    `"Densely Connected Convolutional Networks" <https://arxiv.org/pdf/1608.06993.pdf>`_,
    with the dense blocks of `"Memory-Efficient Implementation of DenseNets" <https://arxiv.org/pdf/1707.06990.pdf>`_.

    Args:
        growth_rate (int) - how many filters to add each layer (`k` in paper)
        block_config (list of ints) - how many layers in each pooling block
        num_init_features (int) - the number of filters to learn in the first convolution layer
        bn_size (int) - multiplicative factor for number of bottle neck layers
          (i.e. bn_size * k features in the bottleneck layer)
        drop_rate (float) - dropout rate after each dense layer
        num_classes (int) - number of classification classes
        memory_efficient (bool) - If True (default), recompute each layer's BN-ReLU-Conv1x1 in backward;
          if False, keep the bottleneck outputs, trading memory for speed.
        spatial_dims (int, keyword-only) - 1, 2 (default) or 3: Conv1d/2d/3d, BatchNorm1d/2d/3d and pooling
          of that rank, for inputs [N, C, L], [N, C, H, W] or [N, C, D, H, W]
        in_channels (int, keyword-only) - channels of the input (3 by default, as in torchvision)
        norm (str or tuple, keyword-only) - "batch" (default: BatchNorm, as in torchvision) or "instance"
          (InstanceNorm, MONAI's choice for small batches of 3-D volumes), or MONAI's ``(name, kwargs)``
        small_inputs (bool, keyword-only) - if True, the stem is a 3x3 stride-1 conv alone (no norm0, relu0, pool0),
          as in the CIFAR/SVHN networks of Huang et al.; False (default): torchvision's ImageNet stem
        channel_dropout (bool, keyword-only) - if True, dropout zeroes whole channels per sample (F.dropout2d/3d,
          MONAI's choice in 2-D and 3-D); False (default): single values, as torchvision's
        act (str or tuple, keyword-only) - "relu" (default, torchvision's) or "prelu" (``nn.PReLU`` after every
          norm, MONAI's spec), or MONAI's ``(name, kwargs)``; a PReLU network has the head's as ``relu5``

    ``load_state_dict`` takes a MONAI DenseNet's keys (``denselayerN.layers.*``, ``class_layers.out.*``) as
    well as torchvision's: a load_state_dict pre-hook renames them.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0,
        num_classes: int = 1000,
        memory_efficient: bool = True,
        *,
        spatial_dims: int = 2,
        in_channels: int = 3,
        norm: str | tuple = "batch",
        small_inputs: bool = False,
        channel_dropout: bool = False,
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        types = layer_types(spatial_dims)
        norm_layer, act_layer = norm_factory(spatial_dims, norm), act_factory(act)
        self.spatial_dims = spatial_dims

        # First convolution
        if small_inputs:
            conv0 = types.conv(in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
            self.features = nn.Sequential(OrderedDict([("conv0", conv0)]))
        else:
            conv0 = types.conv(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
            self.features = nn.Sequential(
                OrderedDict(
                    [
                        ("conv0", conv0),
                        ("norm0", norm_layer(num_init_features)),
                        ("relu0", act_layer()),
                        ("pool0", types.max_pool(kernel_size=3, stride=2, padding=1)),
                    ]
                )
            )

        # Each denseblock
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
                spatial_dims=spatial_dims,
                norm=norm,
                channel_dropout=channel_dropout,
                act=act,
            )
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2, spatial_dims=spatial_dims, norm=norm, act=act)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2

        # Final batch norm
        self.features.add_module("norm5", norm_layer(num_features))
        head_act = act_layer()
        if type(head_act) is not nn.ReLU:  # torchvision's head applies F.relu
            self.relu5 = head_act

        # Linear layer
        self.classifier = nn.Linear(num_features, num_classes)

        # Official init from torch repo.
        for m in self.modules():
            if isinstance(m, types.conv):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, types.norm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

        # MONAI's state_dict keys load as they are (as torchvision's loader takes its legacy DenseNet keys)
        self.register_load_state_dict_pre_hook(_monai_checkpoints.rename_monai_keys)

    @classmethod
    def from_monai_config(
        cls,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
        dropout_prob: float = 0.0,
        memory_efficient: bool = True,
        pretrained: bool = False,
        progress: bool = True,
    ) -> "DenseNet":
        """The network ``monai.networks.nets.DenseNet`` builds from these arguments (MONAI's names and defaults).

        Same layers, initialization and numerics; module names and state_dict keys are torchvision's
        (``load_state_dict`` takes MONAI's keys as well; ``monai_state_dict`` gives them).  The fused blocks
        apply MONAI's "relu" (its default) or "prelu" ``act``, with MONAI's "batch" or "instance" norm and its
        arguments, and
        MONAI's dropout: single values in 1-D, whole channels in 2-D and 3-D (``channel_dropout``, drawn as
        MONAI's Dropout2d/3d draw them).  ``pretrained`` and ``progress`` are those of MONAI's
        ``DenseNet121/169/201/264``, the one whose default ``block_config`` this is (``densenet_fused.monai`` has
        those classes themselves).
        """
        kwargs = monai_arguments(
            spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config, bn_size, act, norm,
            dropout_prob,
        )  # fmt: skip
        arch = _MONAI_ARCHS.get(tuple(block_config))
        if pretrained:
            if arch is None:
                configs = ", ".join(f"{name}: {config}" for config, name in _MONAI_ARCHS.items())
                raise ValueError(
                    f"pretrained=True takes the weights of MONAI's network with this block_config ({configs}), "
                    f"got block_config={tuple(block_config)}"
                )
            _monai_checkpoints.check_pretrained(arch, spatial_dims)  # MONAI's errors (before building here)
        model = cls(**kwargs, memory_efficient=memory_efficient)
        if pretrained:
            _monai_checkpoints.load_pretrained(model, arch, progress)
        return model

    __prepare_scriptable__ = tracing.refuse_torchscript

    def forward(self, x: Tensor) -> Tensor:
        """``classifier(flatten(avg_pool(relu(features(x)))))``, with the stem's norm0 -> relu0 -> pool0 and the
        head's norm5 -> ReLU -> average fused where they are torchvision's modules (``stem_head.fusable``):
        their backward saves conv0's output and the last block's buffer only.  Empty batches and torch.func
        transforms run every module as torchvision's (``block.unfused``)."""
        if tracing.is_fx_traced(x):  # torch.fx traces through the model, with the blocks as leaves
            return self._head(self.features(x))
        self._check_input(x)
        head_act = self._modules.get("relu5")
        fusable = unfused.fusable_input(x)
        stem, head = stem_head.fusable(self.features, self.spatial_dims, head_act) if fusable else (False, False)
        if not (stem or head):
            return self._head(self.features(x))
        modules, out = list(self.features), x
        if stem:
            out = stem_head.norm_relu_max_pool(modules[0](out), modules[1], modules[2])
            modules = modules[4:]
        if head:
            *modules, norm5 = modules
        for module in modules:
            out = module(out)
        if head:
            return self.classifier(stem_head.norm_relu_mean(out, norm5, head_act))
        return self._head(out)

    def _head(self, features: Tensor) -> Tensor:
        head_act = self._modules.get("relu5")
        out = F.relu(features, inplace=True) if head_act is None else head_act(features)
        return self.classifier(stem_head.global_avg_pool(out, self.spatial_dims))

    def _check_input(self, x: Tensor) -> None:
        """Reject input the network cannot take before any layer runs (so no running stat moves)."""
        conv0, rank = self.features.conv0, self.spatial_dims + 2
        if not isinstance(x, Tensor) or x.dim() != rank:
            expected = f"[N, {conv0.in_channels}, {_SPATIAL_NAMES[self.spatial_dims]}]"
            raise ValueError(f"DenseNet expects a {rank}-D input {expected}, got {getattr(x, 'shape', type(x))}")
        if x.size(1) != conv0.in_channels:
            raise ValueError(f"DenseNet expects {conv0.in_channels} input channels, got {x.size(1)}")
        if not x.is_floating_point():
            raise TypeError(f"DenseNet expects a floating-point input, got {x.dtype}")
        if x.device != conv0.weight.device:
            raise RuntimeError(f"DenseNet: input is on {x.device} but the parameters are on {conv0.weight.device}")
        kernel, stride, padding = conv0.kernel_size[0], conv0.stride[0], conv0.padding[0]
        size = [(s + 2 * padding - kernel) // stride + 1 for s in x.shape[2:]]
        for name, module in self.features.named_children():
            if name == "pool0":
                size = [(s - 1) // 2 + 1 for s in size]  # 3, stride 2, padding 1
                continue
            for norm in module.modules():
                batch_stats = isinstance(norm, bn.NORMS) and bn.uses_batch_stats(norm)
                if batch_stats and distributed.sync_group(norm) is None:
                    bn.check_batch_size(torch.Size([x.size(0), norm.num_features, *size]), bn.is_instance(norm))
            if isinstance(module, _Transition):
                if min(size) < 2:
                    sees = "x".join(map(str, size))
                    raise ValueError(f"DenseNet input {tuple(x.shape)} is too small: {name} sees {sees}")
                size = [s // 2 for s in size]


_MONAI_ARCHS = {(6, 12, 24, 16): "densenet121", (6, 12, 32, 32): "densenet169", (6, 12, 48, 32): "densenet201",
                (6, 12, 64, 48): "densenet264"}  # fmt: skip


def monai_arguments(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    init_features: int,
    growth_rate: int,
    block_config: Sequence[int],
    bn_size: int,
    act: str | tuple,
    norm: str | tuple,
    dropout_prob: float,
) -> dict:
    """``DenseNet``'s arguments for MONAI's; ``ValueError`` for what the fused blocks do not compute."""
    act_factory(act)  # before anything is built: ValueError for an activation the blocks do not apply
    return dict(
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        num_init_features=init_features,
        bn_size=bn_size,
        drop_rate=dropout_prob,
        num_classes=out_channels,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        norm=_monai_layer_spec(norm),
        act=act,
        channel_dropout=spatial_dims != 1,  # MONAI's Dropout2d/3d; nn.Dropout in 1-D
    )


def _monai_layer_spec(spec: str | tuple) -> tuple[str, dict]:
    """MONAI's layer spec ``name`` or ``(name, kwargs)`` as (lower-case name, kwargs)."""
    name, kwargs = (spec, {}) if isinstance(spec, str) else spec
    return name.lower(), dict(kwargs)


def _densenet(
    growth_rate: int,
    block_config: tuple[int, ...],
    num_init_features: int,
    weights: Optional[tv.WeightsEnum],
    progress: bool,
    **kwargs: Any,
) -> DenseNet:
    if weights is not None:
        tv._ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        tv._load_state_dict(model=model, weights=weights, progress=progress)
    return model


@handle_legacy_interface(weights=("pretrained", tv.DenseNet121_Weights.IMAGENET1K_V1))
def densenet121(*, weights: Optional[tv.DenseNet121_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6/12/24/16); ``weights`` as in torchvision.models.densenet121."""
    return _densenet(32, (6, 12, 24, 16), 64, tv.DenseNet121_Weights.verify(weights), progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", tv.DenseNet161_Weights.IMAGENET1K_V1))
def densenet161(*, weights: Optional[tv.DenseNet161_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6/12/36/24); ``weights`` as in torchvision.models.densenet161."""
    return _densenet(48, (6, 12, 36, 24), 96, tv.DenseNet161_Weights.verify(weights), progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", tv.DenseNet169_Weights.IMAGENET1K_V1))
def densenet169(*, weights: Optional[tv.DenseNet169_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6/12/32/32); ``weights`` as in torchvision.models.densenet169."""
    return _densenet(32, (6, 12, 32, 32), 64, tv.DenseNet169_Weights.verify(weights), progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", tv.DenseNet201_Weights.IMAGENET1K_V1))
def densenet201(*, weights: Optional[tv.DenseNet201_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6/12/48/32); ``weights`` as in torchvision.models.densenet201."""
    return _densenet(32, (6, 12, 48, 32), 64, tv.DenseNet201_Weights.verify(weights), progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", None))
def densenet264(*, weights: None = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6/12/64/48); torchvision publishes no weights for it (so ``pretrained=True``
    raises, as torchvision's legacy interface does for a builder without weights)."""
    if weights is not None:
        raise ValueError("densenet264 has no pretrained weights")
    return _densenet(32, (6, 12, 64, 48), 64, None, progress, **kwargs)


def densenet_bc(depth: int, growth_rate: int = 12, **kwargs: Any) -> DenseNet:
    """The CIFAR DenseNet-BC of Huang et al. and Pleiss et al. (DenseNet-BC-100, k=12: 0.8M parameters).

    Three blocks of (depth - 4) / 6 layers after a 3x3 conv stem of 2k channels (``small_inputs=True``),
    bottleneck 4k, compression 0.5, 10 classes by default, as efficient_densenet_pytorch's ``DenseNet``;
    ``kwargs`` go to ``DenseNet`` (``drop_rate``, ``num_classes``, ``memory_efficient``, ...).
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 for some n >= 1 (40, 100, 190, 250, ...), got {depth}")
    n = (depth - 4) // 6
    kwargs = {"num_init_features": 2 * growth_rate, "num_classes": 10, **kwargs}
    return DenseNet(growth_rate, (n, n, n), small_inputs=True, **kwargs)
