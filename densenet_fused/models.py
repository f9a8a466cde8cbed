"""DenseNet-BC models, drop-in for torchvision.models.densenet: same arguments, names, init and weights."""

from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet as tv

from . import norm as bn
from .block import _DenseBlock, _Transition


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
    ) -> None:
        super().__init__()

        # First convolution
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
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
            )
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2

        # Final batch norm
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))

        # Linear layer
        self.classifier = nn.Linear(num_features, num_classes)

        # Official init from torch repo.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out

    def _check_input(self, x: Tensor) -> None:
        """Reject input the network cannot take before any layer runs (so no running stat moves)."""
        conv0 = self.features.conv0
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"DenseNet expects a 4-D input [N, 3, H, W], got {getattr(x, 'shape', type(x))}")
        if x.size(1) != conv0.in_channels:
            raise ValueError(f"DenseNet expects {conv0.in_channels} input channels, got {x.size(1)}")
        if not x.is_floating_point():
            raise TypeError(f"DenseNet expects a floating-point input, got {x.dtype}")
        if x.device != conv0.weight.device:
            raise RuntimeError(f"DenseNet: input is on {x.device} but the parameters are on {conv0.weight.device}")
        if x.size(0) == 0:
            raise ValueError(f"DenseNet got an empty batch (input shape {tuple(x.shape)})")
        size = [(s - 1) // 2 + 1 for s in x.shape[2:]]  # conv0: 7x7, stride 2, padding 3
        for name, module in self.features.named_children():
            if name == "pool0":
                size = [(s - 1) // 2 + 1 for s in size]  # 3x3, stride 2, padding 1
                continue
            for norm in module.modules():
                if isinstance(norm, nn.BatchNorm2d) and bn.uses_batch_stats(norm):
                    bn.check_batch_size(torch.Size([x.size(0), norm.num_features, *size]))
            if isinstance(module, _Transition):
                if min(size) < 2:
                    raise ValueError(f"DenseNet input {tuple(x.shape)} is too small: {name} sees {size[0]}x{size[1]}")
                size = [s // 2 for s in size]


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


def densenet121(*, weights: Optional[tv.DenseNet121_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6/12/24/16); ``weights`` as in torchvision.models.densenet121."""
    return _densenet(32, (6, 12, 24, 16), 64, tv.DenseNet121_Weights.verify(weights), progress, **kwargs)


def densenet161(*, weights: Optional[tv.DenseNet161_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6/12/36/24); ``weights`` as in torchvision.models.densenet161."""
    return _densenet(48, (6, 12, 36, 24), 96, tv.DenseNet161_Weights.verify(weights), progress, **kwargs)


def densenet169(*, weights: Optional[tv.DenseNet169_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6/12/32/32); ``weights`` as in torchvision.models.densenet169."""
    return _densenet(32, (6, 12, 32, 32), 64, tv.DenseNet169_Weights.verify(weights), progress, **kwargs)


def densenet201(*, weights: Optional[tv.DenseNet201_Weights | str] = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6/12/48/32); ``weights`` as in torchvision.models.densenet201."""
    return _densenet(32, (6, 12, 48, 32), 64, tv.DenseNet201_Weights.verify(weights), progress, **kwargs)


def densenet264(*, weights: None = None, progress: bool = True, **kwargs) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6/12/64/48); torchvision publishes no weights for it."""
    if weights is not None:
        raise ValueError("densenet264 has no pretrained weights")
    return _densenet(32, (6, 12, 64, 48), 64, None, progress, **kwargs)
