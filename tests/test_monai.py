"""MONAI networks and checkpoints on the fused blocks: ``convert`` of MONAI's DenseNets, ``from_monai_config``
with ``load_monai_state_dict`` / ``monai_state_dict``.  They must compute exactly what MONAI's networks do
(float64: outputs, gradients and running statistics, train and eval, in 1-D, 2-D and 3-D), with batch norm
and with instance norm (MONAI's own spec, and with affine parameters and running statistics)."""

import copy

import pytest
import torch
from torch import nn
from twins import assert_lockstep, randomize_affine

import densenet_fused

monai_nets = pytest.importorskip("monai.networks.nets")

MONAI_TINY = dict(init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2)
SHAPES = {1: (2, 2, 67), 2: (2, 2, 35, 39), 3: (2, 2, 19, 21, 18)}


def _monai(spatial_dims, cls=None, **config):
    torch.manual_seed(0)
    cls = cls or monai_nets.DenseNet
    net = cls(spatial_dims=spatial_dims, in_channels=2, out_channels=3, **{**MONAI_TINY, **config})
    return randomize_affine(net.double())


NORMS = {
    "batch": "batch",
    "instance": ("instance", {"eps": 1e-5}),  # MONAI's 3-D test case
    "instance_affine_running": ("instance", {"affine": True, "track_running_stats": True, "momentum": 0.3}),
    "instance_running_momentum_none": ("instance", {"track_running_stats": True, "momentum": None}),
    "batch_momentum": ("batch", {"momentum": 0.2, "eps": 1e-3}),
}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_monai_checkpoint_trains_like_monai(spatial_dims, norm):
    """A MONAI state_dict loaded into from_monai_config's network: the same outputs, gradients and statistics
    over two training steps, then in eval (instance norms without running statistics use the input's there)."""
    dropout = dict(dropout_prob=0.3) if spatial_dims == 1 else {}  # nn.Dropout: MONAI's 1-D dropout
    theirs = _monai(spatial_dims, norm=NORMS[norm], **dropout)
    ours = densenet_fused.DenseNet.from_monai_config(spatial_dims, 2, 3, **MONAI_TINY, norm=NORMS[norm], **dropout)
    ours = ours.double()
    densenet_fused.load_monai_state_dict(ours, theirs.state_dict())
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9, seed=5)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_our_checkpoint_loads_into_monai(spatial_dims):
    torch.manual_seed(1)
    ours = randomize_affine(densenet_fused.DenseNet.from_monai_config(spatial_dims, 2, 3, **MONAI_TINY).double())
    with torch.no_grad():
        ours(torch.randn(SHAPES[spatial_dims], dtype=torch.float64))  # non-trivial running statistics
    theirs = _monai(spatial_dims)
    assert theirs.load_state_dict(densenet_fused.monai_state_dict(ours), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="Missing key"):
        densenet_fused.load_monai_state_dict(ours, {k: v for k, v in theirs.state_dict().items() if "norm5" not in k})


@pytest.mark.parametrize(
    "cls,spatial_dims,norm",
    [("DenseNet", 3, "batch"), ("DenseNet121", 2, "batch"), ("DenseNet169", 1, "batch"), ("DenseNet201", 2, "batch"),
     ("DenseNet264", 3, "batch"), ("DenseNet", 3, "instance"), ("DenseNet121", 2, "instance_affine_running")],
)  # fmt: skip
def test_monai_networks_convert_and_train_like_monai(cls, spatial_dims, norm):
    original = _monai(spatial_dims, getattr(monai_nets, cls), norm=NORMS[norm])
    original.features.denseblock2.denselayer1.layers.norm1.eval()  # a frozen norm inside a training network
    model = copy.deepcopy(original)
    converted = densenet_fused.convert(model, inplace=True)
    assert type(converted) is densenet_fused.DenseNet and converted.spatial_dims == spatial_dims
    expected = densenet_fused.DenseNet.from_monai_config(spatial_dims, 2, 3, **MONAI_TINY, norm=NORMS[norm])
    assert [(n, type(m)) for n, m in converted.named_modules()] == [(n, type(m)) for n, m in expected.named_modules()]
    assert list(converted.state_dict()) == list(expected.state_dict())
    assert converted.features.conv0.weight is model.features.conv0.weight  # MONAI's own modules, not copies
    assert not converted.features.denseblock2.denselayer1.norm1.training
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    assert_lockstep(converted, original, x, torch.tensor([0, 2]), steps=2, rtol=1e-9, atol=1e-9)


def _set(model, path, module):
    parent, _, name = path.rpartition(".")
    model.get_submodule(parent).add_module(name, module)
    return model


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: _monai(2, act="prelu"), "relu is a PReLU; fused blocks apply ReLU"),
        (lambda: _monai(3, norm=("group", {"num_groups": 2})), "norm1 is a GroupNorm"),
        (lambda: _monai(2, dropout_prob=0.2), "dropout is a Dropout2d"),
        (lambda: _set(_monai(2), "class_layers.pool", nn.AdaptiveMaxPool2d(1)), "class_layers is"),
        (lambda: nn.Sequential(_monai(2).features.denseblock1.denselayer1), "a MONAI dense layer returns its input"),
    ],
    ids=["prelu", "group_norm", "channel_dropout", "max_pool_head", "bare_layer"],
)
def test_monai_modules_that_cannot_be_fused_raise(make, message):
    with pytest.raises(ValueError, match=message):
        densenet_fused.convert(make())


def test_monai_blocks_inside_other_networks_convert_in_place():
    original = _monai(2)
    net = nn.Sequential(original.features.denseblock1, original.features.transition1)
    reference = copy.deepcopy(net)
    converted = densenet_fused.convert(net)
    assert [type(m) for m in converted] == [densenet_fused.DenseBlock, densenet_fused.Transition]
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-10, atol=1e-10)


def test_from_monai_config_refuses_channel_dropout():
    with pytest.raises(ValueError, match="drops whole channels"):
        densenet_fused.DenseNet.from_monai_config(2, 2, 3, dropout_prob=0.1)


@pytest.mark.parametrize("norm", [("group", {"num_groups": 2}), "layer", ("instance", {"eps": 1e-5, "bogus": 1})])
def test_from_monai_config_refuses_other_norms(norm):
    with pytest.raises((ValueError, TypeError), match="norm='batch' and norm='instance'|bogus"):
        densenet_fused.DenseNet.from_monai_config(2, 2, 3, **MONAI_TINY, norm=norm)


def test_a_block_mixing_batch_and_instance_norms_raises():
    block = densenet_fused.DenseBlock(2, 8, 2, 4, 0.0)
    block.denselayer2.norm1 = nn.InstanceNorm2d(12)
    with pytest.raises(ValueError, match="all BatchNorms or all InstanceNorms"):
        block(torch.randn(2, 8, 5, 5))
