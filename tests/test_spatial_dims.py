"""1-D and 3-D DenseNets (spatial_dims) against the same network run with stock PyTorch modules, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import TINY, assert_lockstep, randomize_affine

import densenet_fused

SHAPES = {1: (2, 2, 67), 2: (2, 2, 35, 39), 3: (2, 2, 19, 21, 18)}


class PlainDenseNet(nn.Module):
    """A copy of a fused DenseNet run with its stock Conv/BatchNorm/pool modules: torch.cat before every
    layer, conv then pool in every transition (torchvision's order), as a plain PyTorch DenseNet does."""

    def __init__(self, fused: densenet_fused.DenseNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(fused)

    def forward(self, x):
        for module in self.net.features.children():
            if isinstance(module, densenet_fused.DenseBlock):
                features = [x]
                for layer in module.values():
                    bottleneck = layer.conv1(layer.relu1(layer.norm1(torch.cat(features, 1))))
                    new = layer.conv2(layer.relu2(layer.norm2(bottleneck)))
                    features.append(F.dropout(new, layer.drop_rate, self.training))
                x = torch.cat(features, 1)
            elif isinstance(module, densenet_fused.Transition):
                x = module.pool(module.conv(module.relu(module.norm(x))))
            else:
                x = module(x)
        return self.net.classifier(F.relu(x).flatten(2).mean(2))


def _model(spatial_dims, **config):
    torch.manual_seed(0)
    model = densenet_fused.DenseNet(**{**TINY, **config}, spatial_dims=spatial_dims, in_channels=2).double()
    return randomize_affine(model)


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_trains_like_plain_pytorch(spatial_dims, memory_efficient):
    ours = _model(spatial_dims, memory_efficient=memory_efficient)
    expected = {
        1: (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.MaxPool1d),
        2: (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d),
        3: (nn.Conv3d, nn.BatchNorm3d, nn.AvgPool3d, nn.MaxPool3d),
    }
    layer, features = ours.features.denseblock2.denselayer3, ours.features
    found = (type(layer.conv2), type(layer.norm1), type(features.transition1.pool), type(features.pool0))
    assert found == expected[spatial_dims] and type(features.norm5) is expected[spatial_dims][1]
    torch.manual_seed(1)
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    assert_lockstep(ours, PlainDenseNet(ours), x, torch.tensor([1, 3]), steps=2, rtol=1e-9, atol=1e-9)


def test_channels_last_3d_matches_contiguous():
    """The block's buffer keeps channels_last_3d, and results equal the contiguous path.

    (CPU Conv3d itself returns contiguous output, so in a whole model the layout is lost at the stem.)"""
    model = _model(3)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 8, 5, 6, 7, dtype=torch.float64)
    x_cl = x.to(memory_format=torch.channels_last_3d).requires_grad_()
    x.requires_grad_()
    out = model.features.transition1(model.features.denseblock1(x))
    buf_cl = twin.features.denseblock1(x_cl)
    out_cl = twin.features.transition1(buf_cl)
    assert buf_cl.is_contiguous(memory_format=torch.channels_last_3d)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (out_cl * weights).sum().backward()
    torch.testing.assert_close(out_cl, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-10, atol=1e-10)
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10)


def test_monai_configuration():
    config = dict(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4, block_config=(2, 2))
    torch.manual_seed(0)
    model = densenet_fused.DenseNet.from_monai_config(**config, bn_size=2)
    torch.manual_seed(0)
    expected = densenet_fused.DenseNet(4, (2, 2), 8, 2, 0.0, 2, spatial_dims=3, in_channels=1)
    state, expected_state = model.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state)
    assert all(torch.equal(state[key], expected_state[key]) for key in state)  # same init, bit for bit
    assert type(model.features.conv0) is nn.Conv3d and model.features.conv0.in_channels == 1
    one_d = densenet_fused.DenseNet.from_monai_config(**{**config, "spatial_dims": 1}, dropout_prob=0.1)
    assert one_d.features.denseblock1.denselayer1.drop_rate == 0.1  # MONAI's 1-D dropout is nn.Dropout
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 2)
    densenet_fused.DenseNet.from_monai_config(**config, act=("RELU", {"inplace": False}), norm=("batch", {}))
    prelu = densenet_fused.DenseNet.from_monai_config(**config, act="PRELU")  # MONAI's names in any case
    assert {type(prelu.features.relu0), type(prelu.features.denseblock1.denselayer1.relu2), type(prelu.relu5)} == {nn.PReLU}
    with pytest.raises(ValueError, match="apply act='relu' and act='prelu'"):
        densenet_fused.DenseNet.from_monai_config(**config, act="leakyrelu")
    eps = densenet_fused.DenseNet.from_monai_config(**config, norm=("batch", {"eps": 1e-3}))  # MONAI's norm args
    assert all(m.eps == 1e-3 for m in eps.modules() if isinstance(m, nn.BatchNorm3d))
    instance = densenet_fused.DenseNet.from_monai_config(**config, norm="instance")
    assert {type(m) for m in instance.modules() if "norm" in type(m).__name__.lower()} == {nn.InstanceNorm3d}
    dropped = densenet_fused.DenseNet.from_monai_config(**config, dropout_prob=0.1)  # MONAI's Dropout3d
    assert dropped.features.denseblock1.denselayer1.channel_dropout and not one_d.features.denseblock1.denselayer1.channel_dropout


def test_spatial_dims_errors():
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        densenet_fused.DenseNet(**TINY, spatial_dims=4)
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        densenet_fused.Transition(4, 2, spatial_dims=0)
    model = densenet_fused.DenseNet(**TINY, spatial_dims=3, in_channels=1)
    with pytest.raises(ValueError, match=r"expects a 5-D input \[N, 1, D, H, W\]"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="too small: transition1 sees 1x1x1"):
        model(torch.randn(2, 1, 4, 4, 4))
    block = densenet_fused.DenseBlock(2, 4, 2, 3, 0.0, spatial_dims=1)
    with pytest.raises(ValueError, match="expects a 3-D input"):
        block(torch.randn(2, 4, 5, 5))
