"""densenet_fused.convert: torchvision (and timm) DenseNets become fused ones with unchanged outputs."""

import copy
import io

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import densenet as tv
from helpers import TINY, assert_lockstep, randomize_affine

import densenet_fused


def _trained(model):
    """Non-trivial weights and running statistics, as a trained checkpoint has."""
    torch.manual_seed(2)
    model = randomize_affine(model.double())
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(3, 3, 32, 32, dtype=torch.float64))
    return model


def _fused_modules(model):
    fused = (densenet_fused.DenseBlock, densenet_fused.DenseLayer, densenet_fused.Transition)
    return [name for name, m in model.named_modules() if isinstance(m, fused)]


def _without_checkpointing(original):
    """torchvision's memory_efficient (timm's grad_checkpointing) reruns norm1 in backward, which updates its
    running stats a second time each step; ours updates them once, as without checkpointing, which otherwise
    computes exactly the same."""
    for layer in original.modules():
        if hasattr(layer, "memory_efficient") or hasattr(layer, "grad_checkpointing"):
            layer.memory_efficient = layer.grad_checkpointing = False


def _assert_same_training(converted, original, x, seed=None):
    """Same state_dict keys; two training steps (same dropout masks when seeded) and eval agree."""
    assert list(converted.state_dict()) == list(original.state_dict())
    assert_lockstep(converted, original, x, torch.tensor([1, 4]), steps=2, rtol=1e-9, atol=1e-9, seed=seed)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize(
    "config",
    [dict(TINY, memory_efficient=True), dict(TINY, memory_efficient=False), dict(TINY, drop_rate=0.3)],
    ids=["memory_efficient", "keep_bottlenecks", "dropout"],
)
def test_torchvision_densenet_converts_with_identical_training(config, inplace):
    model = _trained(torchvision.models.DenseNet(**config))
    original = copy.deepcopy(model)
    weight = model.features.denseblock1.denselayer1.conv1.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = densenet_fused.convert(model, inplace=inplace)
    assert (converted is model) == inplace
    assert (converted.features.denseblock1.denselayer1.conv1.weight is weight) == inplace
    layer = converted.features.denseblock2.denselayer3
    assert type(layer) is densenet_fused.DenseLayer
    assert layer.memory_efficient == config.get("memory_efficient", False)  # torchvision default: False
    assert layer.drop_rate == config.get("drop_rate", 0.0)
    assert _fused_modules(converted) == _fused_modules(densenet_fused.DenseNet(**config))
    if not inplace:
        assert _fused_modules(model) == []  # the original is untouched
    _without_checkpointing(original)
    x = torch.randn(2, 3, 35, 39, dtype=torch.float64)
    tracked = int(converted.features.denseblock1.denselayer1.norm1.num_batches_tracked)
    _assert_same_training(converted, original, x, seed=7)
    assert converted.features.denseblock1.denselayer1.norm1.num_batches_tracked == tracked + 2  # once per step
    if inplace:  # an optimizer built before the conversion still drives the converted model
        before = weight.detach().clone()
        optimizer.step()
        assert not torch.equal(weight, before)


def test_train_and_eval_flags_are_kept_per_module():
    model = _trained(torchvision.models.DenseNet(**TINY))
    model.features.denseblock2.denselayer2.norm1.eval()  # a frozen norm inside a training model
    original = copy.deepcopy(model)
    converted = densenet_fused.convert(model)
    assert not converted.features.denseblock2.denselayer2.norm1.training
    assert converted.features.denseblock2.denselayer2.training
    _assert_same_training(converted, original, torch.randn(2, 3, 35, 39, dtype=torch.float64))


def test_blocks_inside_other_architectures_and_a_block_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), tv._DenseBlock(2, 6, 2, 3, 0.0), tv._Transition(12, 5)).double()
    original = copy.deepcopy(net)
    converted = densenet_fused.convert(net)
    assert [type(m) for m in converted] == [nn.Conv2d, densenet_fused.DenseBlock, densenet_fused.Transition]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-10, atol=1e-10)
    block = densenet_fused.convert(original[1], inplace=True)  # a block itself comes back as a new module
    assert type(block) is densenet_fused.DenseBlock and type(original[1]) is tv._DenseBlock


@pytest.mark.parametrize(
    "where,replacement,message",
    [
        ("features.denseblock2.denselayer1.relu2", nn.GELU(), "relu2 is a GELU"),
        ("features.transition1.pool", nn.MaxPool2d(2, 2), "transition1.pool is MaxPool2d"),
        ("features.transition1.conv", nn.Conv2d(20, 10, 1, bias=True), "transition1.conv is Conv2d.*bias-free"),
        ("features.denseblock1.denselayer2.norm2", nn.GroupNorm(2, 12), "norm2 is a GroupNorm"),
        ("features.denseblock1.denselayer1.conv2", nn.Conv2d(12, 6, 3, padding=2, dilation=2, bias=False), "conv2"),
    ],
    ids=["activation", "pool", "conv_bias", "norm", "dilation"],
)
def test_what_cannot_be_fused_exactly_raises_and_converts_nothing(where, replacement, message):
    model = torchvision.models.DenseNet(**TINY)
    parent, _, name = where.rpartition(".")
    model.get_submodule(parent).add_module(name, replacement)
    with pytest.raises(ValueError, match=message):
        densenet_fused.convert(model, inplace=True)
    assert _fused_modules(model) == []


def test_modules_with_hooks_are_not_silently_replaced():
    model = torchvision.models.DenseNet(**TINY)
    model.features.denseblock2.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="features.denseblock2 has hooks registered"):
        densenet_fused.convert(model)
    model.features.norm5.register_forward_hook(lambda *args: None)  # modules that are kept may have hooks
    model.features.denseblock2._forward_hooks.clear()
    assert _fused_modules(densenet_fused.convert(model)) == _fused_modules(densenet_fused.DenseNet(**TINY))


@pytest.mark.parametrize("variant", ["plain", "deep_stem_blur_memory_efficient"])
def test_timm_densenet_converts_with_identical_training(variant):
    timm_densenet = pytest.importorskip("timm.models.densenet")
    from timm.layers import BlurPool2d

    torch.manual_seed(0)
    extra = dict(stem_type="deep", aa_layer=BlurPool2d, memory_efficient=True) if variant != "plain" else {}
    model = _trained(timm_densenet.DenseNet(growth_rate=6, block_config=(2, 3), bn_size=2, num_classes=5, **extra))
    original = copy.deepcopy(model)
    converted = densenet_fused.convert(model)
    _without_checkpointing(original)
    assert len(_fused_modules(converted)) == 2 + 1 + 5  # two blocks, one transition, five layers
    assert converted.features.denseblock1.denselayer1.memory_efficient == (variant != "plain")
    x = torch.randn(2, 3, 35, 39, dtype=torch.float64)
    _assert_same_training(converted, original, x)


def _fused_layers(model):
    return [m for m in model.modules() if isinstance(m, densenet_fused.DenseLayer)]


def test_timm_set_grad_checkpointing_switches_memory_efficient():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = densenet_fused.convert(timm.create_model("densenet121", block_config=(2, 3), num_classes=4)).double()
    assert isinstance(model, timm.models.DenseNet) and len(_fused_layers(model)) == 5
    assert {layer.memory_efficient for layer in _fused_layers(model)} == {False}  # timm's default
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = model(x)
    model.set_grad_checkpointing(True)
    assert {layer.memory_efficient for layer in _fused_layers(model)} == {True}
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    model.set_grad_checkpointing(False)
    assert {layer.memory_efficient for layer in _fused_layers(model)} == {False}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    restored.set_grad_checkpointing(True)
    assert {layer.memory_efficient for layer in _fused_layers(restored)} == {True}
