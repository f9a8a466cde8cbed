"""Pretrained weights through the real loaders, without a network: torch.hub reads generated ImageNet checkpoints
from a temporary ``TORCH_HOME`` (tests/hub_cache.py), written once per session.

- Our torchvision builders' ``weights=``/``pretrained=`` load what torchvision's own builders load from the
  same file (densenet121/161/169/201).
- ``densenet_fused.monai.DenseNet121/169/201(pretrained=True)`` load what MONAI's load (same seed: the same
  fresh classifier and conv0 too), and train like MONAI's in float64; ``from_monai_config(pretrained=True)``
  and ``convert`` of a pretrained MONAI network do the same.
"""

import re
import warnings

import pytest
import torch
import torchvision
from hub_cache import WEIGHTS
from helpers import assert_lockstep

import densenet_fused
from densenet_fused import monai as fused_monai
from densenet_fused._monai_checkpoints import to_monai

monai_nets = pytest.importorskip("monai.networks.nets")

_TV_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _as_torchvision_keys(checkpoint):
    """The file's legacy keys renamed as torchvision's loader does."""
    return {(f"{m.group(1)}{m.group(2)}" if (m := _TV_LEGACY.match(k)) else k): v for k, v in checkpoint.items()}


def _assert_same_state(actual, expected):
    assert list(actual) == list(expected)
    for key in actual:
        assert torch.equal(actual[key], expected[key]), key


def _build(builder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=
        return builder(progress=False, **kwargs)


@pytest.mark.parametrize(
    "name,spelling",
    [("densenet121", "weights"), ("densenet121", "pretrained"), ("densenet161", "weights"),
     ("densenet169", "weights"), ("densenet201", "pretrained")],
)  # fmt: skip
def test_torchvision_builders_load_the_cached_file_as_torchvision(torch_home, name, spelling):
    checkpoint = _as_torchvision_keys(torch_home.checkpoint(name))
    kwargs = {"weights": WEIGHTS[name]} if spelling == "weights" else {"pretrained": True}
    ours = _build(getattr(densenet_fused, name), **kwargs)
    theirs = _build(getattr(torchvision.models, name), **kwargs)
    _assert_same_state(ours.state_dict(), theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert key.endswith("num_batches_tracked") or torch.equal(value, checkpoint[key]), key


def test_densenet121_weights_by_name_compute_as_torchvision_float64(torch_home):
    ours = densenet_fused.densenet121(weights="IMAGENET1K_V1", progress=False)
    _assert_same_state(densenet_fused.densenet121(weights="DEFAULT", progress=False).state_dict(), ours.state_dict())
    theirs = torchvision.models.densenet121(weights="DEFAULT", progress=False)
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="num_classes"):  # torchvision's semantics: the weights' 1000 classes
        densenet_fused.densenet121(weights="DEFAULT", num_classes=10)


MONAI_PRETRAINED = {  # MONAI class, its arguments: the ImageNet network, or others that take part of its weights
    "121-in3-out1000": ("DenseNet121", dict(spatial_dims=2, in_channels=3, out_channels=1000)),
    "121-in1-out3-blocks(2,2)": ("DenseNet121", dict(spatial_dims=2, in_channels=1, out_channels=3,
                                                     block_config=(2, 2))),
    "169-bn2-blocks(3,2)": ("DenseNet169", dict(spatial_dims=2, in_channels=3, out_channels=2, block_config=(3, 2),
                                                bn_size=2)),
    "201-1d-blocks(2,3)": ("DenseNet201", dict(spatial_dims=1, in_channels=3, out_channels=5, block_config=(2, 3))),
}  # fmt: skip


@pytest.mark.parametrize("case", MONAI_PRETRAINED)
def test_monai_pretrained_loads_what_monai_loads(torch_home, case):
    """Same seed, same cached file: MONAI's network and ours hold the same state, key for key.  Loaded: what fits
    by MONAI's name and shape; fresh: the classifier always (even with 1000 classes: MONAI's name for it is not
    the file's), conv0 unless 3 input channels in 2-D, the bottlenecks a bn_size of 2 reshapes, 1-D convolutions,
    and what another block_config reshapes."""
    name, config = MONAI_PRETRAINED[case]
    checkpoint = _as_torchvision_keys(torch_home.checkpoint(name.lower()))
    states = []
    for module, pretrained in ((monai_nets, True), (fused_monai, True), (fused_monai, False)):
        torch.manual_seed(0)
        states.append(getattr(module, name)(**config, pretrained=pretrained, progress=False).state_dict())
    theirs, ours, fresh = states
    _assert_same_state(to_monai(ours), theirs)
    loaded = set()
    for key, value in ours.items():
        fits = key in checkpoint and checkpoint[key].shape == value.shape and not key.startswith("classifier.")
        assert torch.equal(value, checkpoint[key] if fits else fresh[key]), key
        loaded.update([key] * fits)
    two_d = config["spatial_dims"] == 2
    assert ("features.conv0.weight" in loaded) == (config["in_channels"] == 3 and two_d)
    assert "features.norm0.weight" in loaded and "features.denseblock1.denselayer1.norm1.weight" in loaded
    assert ("features.norm5.weight" in loaded) == ("block_config" not in config)
    assert ("features.denseblock1.denselayer1.conv1.weight" in loaded) == (two_d and "bn_size" not in config)
    assert not any(key.startswith("classifier.") for key in loaded)


@pytest.mark.parametrize("act", ["relu", "prelu"])
def test_monai_pretrained_trains_like_monai_float64(torch_home, act):
    """A PReLU network loads what fits too: every weight but its slopes (no ImageNet file has them)."""
    nets = []
    for module in (fused_monai, monai_nets):
        torch.manual_seed(0)
        net = module.DenseNet121(2, 3, 3, block_config=(2, 2), act=act, pretrained=True, progress=False)  # part loaded
        nets.append(net.double())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_lockstep(*nets, x, torch.tensor([0, 2]), steps=2, rtol=1e-9, atol=1e-9)


def test_monai_pretrained_features_match_torchvision_pretrained_float64(torch_home):
    """MONAI's test_pretrain_consistency (tests/peer), in float64 with a tolerance: the fused kernels sum in
    another order than torchvision's, so float32 features are not bit for bit torchvision's."""
    ours = fused_monai.DenseNet121(spatial_dims=2, in_channels=3, out_channels=1, pretrained=True, progress=False)
    theirs = torchvision.models.densenet121(weights="DEFAULT")
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.features(x), theirs.features(x), rtol=1e-10, atol=1e-10)


def test_from_monai_config_pretrained_is_monai_densenet121s(torch_home):
    config = dict(spatial_dims=2, in_channels=1, out_channels=4, pretrained=True, progress=False)
    torch.manual_seed(0)
    built = densenet_fused.DenseNet.from_monai_config(**config, memory_efficient=False)
    torch.manual_seed(0)
    expected = fused_monai.DenseNet121(**config)
    assert type(built) is densenet_fused.DenseNet and not built.features.denseblock1.denselayer1.memory_efficient
    _assert_same_state(built.state_dict(), expected.state_dict())


def test_monai_pretrained_network_converts_exactly(torch_home):
    torch.manual_seed(0)
    original = monai_nets.DenseNet121(2, 1, 3, block_config=(2, 2), pretrained=True, progress=False).double()
    converted = densenet_fused.convert(original)
    assert type(converted) is densenet_fused.DenseNet
    _assert_same_state(to_monai(converted.state_dict()), original.state_dict())
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    assert_lockstep(converted, original, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9)
