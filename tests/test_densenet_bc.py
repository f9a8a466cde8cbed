"""densenet_bc: the CIFAR DenseNet-BC of Huang et al. / Pleiss et al., against a torchvision-module twin."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet as tv
from helpers import assert_lockstep, randomize_affine, train_step

import densenet_fused


class TorchvisionBC(nn.Module):
    """The network of efficient_densenet_pytorch's ``DenseNet(small_inputs=True)``, from torchvision's modules
    and under torchvision's names: conv0 (3x3, 2k channels) alone as the stem, transitions to
    ``int(channels * 0.5)``, then norm5, ReLU, global average pool and the classifier."""

    def __init__(self, depth, growth_rate, num_classes=10, drop_rate=0.0, compression=0.5):
        super().__init__()
        n, channels = (depth - 4) // 6, 2 * growth_rate
        features = OrderedDict(conv0=nn.Conv2d(3, channels, kernel_size=3, padding=1, bias=False))
        for i in range(3):
            features[f"denseblock{i + 1}"] = tv._DenseBlock(n, channels, 4, growth_rate, drop_rate)
            channels += n * growth_rate
            if i < 2:
                features[f"transition{i + 1}"] = tv._Transition(channels, int(channels * compression))
                channels = int(channels * compression)
        features["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(features)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(out, 1))


def bc_twins(depth, growth_rate, **kwargs):
    """(densenet_bc, TorchvisionBC) in float64 with the same (non-trivial) weights."""
    torch.manual_seed(0)
    ours = randomize_affine(densenet_fused.densenet_bc(depth, growth_rate, **kwargs).double())
    theirs = TorchvisionBC(depth, growth_rate, drop_rate=kwargs.get("drop_rate", 0.0)).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def test_densenet_bc_100_structure_and_parameter_count():
    model = densenet_fused.densenet_bc(100)
    features = model.features
    assert [name for name, _ in features.named_children()] == [
        "conv0", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3", "norm5"
    ]  # fmt: skip
    conv0 = features.conv0
    assert (conv0.in_channels, conv0.out_channels, conv0.kernel_size, conv0.stride, conv0.padding) == (
        3, 24, (3, 3), (1, 1), (1, 1)
    )  # fmt: skip
    assert [len(getattr(features, f"denseblock{i}")) for i in (1, 2, 3)] == [16, 16, 16]
    layer = features.denseblock1.denselayer1
    assert (layer.conv1.out_channels, layer.conv2.out_channels) == (48, 12)  # bottleneck 4k, growth k
    # 24 + 16*12 = 216 -> 108; 108 + 192 = 300 -> 150; 150 + 192 = 342
    assert (features.transition1.conv.in_channels, features.transition1.conv.out_channels) == (216, 108)
    assert (features.transition2.conv.in_channels, features.transition2.conv.out_channels) == (300, 150)
    assert (model.classifier.in_features, model.classifier.out_features) == (342, 10)
    assert sum(p.numel() for p in model.parameters()) == 769_162  # Huang et al., Table 2: 0.8M
    assert list(model.state_dict()) == list(TorchvisionBC(100, 12).state_dict())


@pytest.mark.parametrize("depth,growth_rate,millions", [(250, 24, 15.3), (190, 40, 25.6)])
def test_parameter_counts_of_the_papers_larger_nets(depth, growth_rate, millions):
    with torch.device("meta"):
        model = densenet_fused.densenet_bc(depth, growth_rate)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions  # Huang et al., Table 2


@pytest.mark.parametrize("depth", [4, 41, 99, -2])
def test_depth_not_6n_plus_4_raises(depth):
    with pytest.raises(ValueError, match=f"6n \\+ 4 .* got {depth}"):
        densenet_fused.densenet_bc(depth)


def test_keyword_arguments_reach_densenet():
    model = densenet_fused.densenet_bc(16, growth_rate=4, num_classes=7, drop_rate=0.25, memory_efficient=False)
    assert model.classifier.out_features == 7 and model.features.conv0.out_channels == 8
    block = model.features.denseblock2
    assert block.denselayer1.drop_rate == 0.25 and block.denselayer1.memory_efficient is False


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_trains_like_torchvision_modules_float64(memory_efficient):
    ours, theirs = bc_twins(16, 4, memory_efficient=memory_efficient)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 4, 9]), steps=2, rtol=1e-9, atol=1e-9)  # then eval


def test_dropout_trains_like_torchvision_modules_float64():
    ours, theirs = bc_twins(10, 4, drop_rate=0.3)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([0, 2, 5]), steps=2, rtol=1e-9, atol=1e-9, seed=7)


def test_eval_mode_gradients_match_torchvision_modules():
    ours, theirs = bc_twins(10, 4)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    (out, gx, grads), (out_t, gx_t, grads_t) = (train_step(m, x, torch.tensor([3, 1, 0])) for m in (ours, theirs))
    torch.testing.assert_close(out, out_t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx, gx_t, rtol=1e-9, atol=1e-9)
    for g, g_t in zip(grads, grads_t):
        torch.testing.assert_close(g, g_t, rtol=1e-9, atol=1e-9)


def test_input_check_follows_the_3x3_stem():
    model = densenet_fused.densenet_bc(10, growth_rate=4)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 10)  # no stride in the stem: 4 -> 2 -> 1
    with pytest.raises(ValueError, match="too small: transition2 sees 1x1"):
        model(torch.randn(2, 3, 2, 2))
