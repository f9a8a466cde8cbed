"""MONAI networks and checkpoints on the fused blocks: ``convert`` of MONAI's DenseNets, ``from_monai_config``
with ``load_monai_state_dict`` / ``monai_state_dict``.  They must compute exactly what MONAI's networks do
(float64: outputs, gradients and running statistics, train and eval, in 1-D, 2-D and 3-D), with batch norm
and with instance norm (MONAI's own spec, and with affine parameters and running statistics)."""

import copy
import inspect
import io

import pytest
import torch
from torch import nn
from helpers import MONAI_TINY, assert_lockstep, randomize_affine, train_step

import densenet_fused
from densenet_fused import monai as fused_monai

monai_nets = pytest.importorskip("monai.networks.nets")

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
        (lambda: _monai(2, act="elu"), "relu is a ELU; fused blocks apply ReLU and PReLU"),
        (lambda: _monai(3, norm=("group", {"num_groups": 2})), "norm1 is a GroupNorm"),
        (lambda: _set(_monai(2), "class_layers.pool", nn.AdaptiveMaxPool2d(1)), "class_layers is"),
        (lambda: nn.Sequential(_monai(2).features.denseblock1.denselayer1), "a MONAI dense layer returns its input"),
    ],
    ids=["elu", "group_norm", "max_pool_head", "bare_layer"],
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


@pytest.mark.parametrize("norm", [("group", {"num_groups": 2}), "layer", ("instance", {"eps": 1e-5, "bogus": 1})])
def test_from_monai_config_refuses_other_norms(norm):
    with pytest.raises((ValueError, TypeError), match="norm='batch' and norm='instance'|bogus"):
        densenet_fused.DenseNet.from_monai_config(2, 2, 3, **MONAI_TINY, norm=norm)


def test_a_block_mixing_batch_and_instance_norms_raises():
    block = densenet_fused.DenseBlock(2, 8, 2, 4, 0.0)
    block.denselayer2.norm1 = nn.InstanceNorm2d(12)
    with pytest.raises(ValueError, match="all BatchNorms or all InstanceNorms"):
        block(torch.randn(2, 8, 5, 5))


# densenet_fused.monai: MONAI's names, signatures and defaults; MONAI's checkpoints as they are.

monai_densenet = pytest.importorskip("monai.networks.nets.densenet")
MONAI_CLASSES = ["DenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264"]


def test_monai_names_signatures_and_aliases_are_monais():
    assert set(monai_densenet.__all__) <= set(fused_monai.__all__)
    for name in monai_densenet.__all__:
        theirs, ours = inspect.signature(getattr(monai_densenet, name)), inspect.signature(getattr(fused_monai, name))
        params = [[(p.name, p.kind, p.default) for p in sig.parameters.values()] for sig in (ours, theirs)]
        assert params[0] == params[1], name
        for other in monai_densenet.__all__:  # the same aliases: Densenet121 is densenet121 is DenseNet121
            same = getattr(monai_densenet, name) is getattr(monai_densenet, other)
            assert same == (getattr(fused_monai, name) is getattr(fused_monai, other)), (name, other)
        assert issubclass(getattr(fused_monai, name), densenet_fused.DenseNet)


@pytest.mark.parametrize("name", MONAI_CLASSES)
def test_monai_constructors_initialize_as_monai_bit_for_bit(name):
    """Same seed, same initial state under MONAI's keys; and the network from_monai_config builds with the
    class's default block_config."""
    config = dict(spatial_dims=3, in_channels=2, out_channels=3, init_features=4, growth_rate=2, bn_size=1)
    blocks = inspect.signature(getattr(monai_nets, name)).parameters["block_config"].default
    builds = [
        lambda: getattr(monai_nets, name)(**config),
        lambda: getattr(fused_monai, name)(**config),
        lambda: densenet_fused.DenseNet.from_monai_config(**config, block_config=blocks),
    ]
    models = []
    for build in builds:
        torch.manual_seed(0)
        models.append(build())
    assert type(models[1]) is getattr(fused_monai, name) and type(models[2]) is densenet_fused.DenseNet
    theirs, ours, built = (model.state_dict() for model in models)
    for actual, expected in ((densenet_fused.monai_state_dict(models[1]), theirs), (ours, built)):
        assert list(actual) == list(expected)
        assert all(torch.equal(value, expected[key]) for key, value in actual.items())


def _trained_monai(spatial_dims, norm="batch", **config):
    """A seeded MONAI network after one SGD step: running statistics and weights away from their init."""
    theirs = _monai(spatial_dims, norm=NORMS[norm], **config)
    train_step(theirs, torch.randn(SHAPES[spatial_dims], dtype=torch.float64), torch.tensor([0, 1]))
    return theirs


@pytest.mark.parametrize(
    "spatial_dims,norm", [(1, "batch"), (2, "batch"), (3, "batch"), (3, "instance_affine_running")]
)
def test_monai_state_dict_loads_as_it_is_and_trains_like_monai(spatial_dims, norm):
    """MONAI's state_dict -> our load_state_dict(strict=True): float64 outputs, gradients and statistics equal
    MONAI's over two SGD steps, then in eval (1-D: with MONAI's nn.Dropout, seeded alike)."""
    dropout = dict(dropout_prob=0.3) if spatial_dims == 1 else {}
    theirs = _trained_monai(spatial_dims, norm, **dropout)
    torch.manual_seed(123)  # another init: everything must come from the checkpoint
    config = dict(spatial_dims=spatial_dims, in_channels=2, out_channels=3, **MONAI_TINY, norm=NORMS[norm], **dropout)
    ours = fused_monai.DenseNet(**config).double()
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9, seed=5)


def test_monai_keys_load_under_a_prefix_and_after_copies():
    """The hook renames under the model's own prefix (a wrapped model), and copies keep it."""
    theirs = _trained_monai(2)
    wrapped = nn.Sequential(densenet_fused.DenseNet.from_monai_config(2, 2, 3, **MONAI_TINY).double())
    wrapped.load_state_dict({f"0.{key}": value for key, value in theirs.state_dict().items()})
    pickled = io.BytesIO()
    torch.save(copy.deepcopy(wrapped[0]), pickled)
    pickled.seek(0)
    for model in (wrapped[0], torch.load(pickled, weights_only=False)):
        model.load_state_dict(theirs.state_dict())
        state = densenet_fused.monai_state_dict(model)
        assert list(state) == list(theirs.state_dict())
        assert all(torch.equal(value, theirs.state_dict()[key]) for key, value in state.items())


def _load_error(model, state_dict, strict=True):
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        return str(error)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_monai_keys_fail_to_load_as_torch_fails(change, strict):
    """A MONAI checkpoint that does not fit fails (or reports) exactly as the same checkpoint under our keys."""
    state = _monai(2).state_dict()
    if change == "missing":
        del state["features.denseblock2.denselayer1.layers.norm1.weight"]
    elif change == "unexpected":
        state["features.denseblock1.denselayer1.layers.relu1.weight"] = torch.ones(1)  # a PReLU's slope
    else:
        state["class_layers.out.weight"] = torch.ones(5, 22)
    ours = densenet_fused.DenseNet.from_monai_config(2, 2, 3, **MONAI_TINY)
    expected = _load_error(copy.deepcopy(ours), fused_monai.checkpoints.to_ours(state), strict)
    assert _load_error(ours, state, strict) == expected
    if strict or change == "shape":  # raised, with torch's message
        assert isinstance(expected, str) and ("Missing key" in expected or "Unexpected key" in expected
                                              or "size mismatch" in expected)  # fmt: skip
    else:
        assert expected.missing_keys or expected.unexpected_keys


@pytest.mark.parametrize("name", ["DenseNet", "DenseNet121"])
def test_monai_constructors_refuse_other_activations_and_take_channel_dropout(name):
    build = getattr(fused_monai, name)
    with pytest.raises(ValueError, match=r"apply act='relu' and act='prelu' .*got act=\('elu', \{'alpha': 0.5\}\)"):
        build(2, 2, 3, act=("elu", {"alpha": 0.5}))
    net = build(3, 2, 3, init_features=4, growth_rate=2, block_config=(1, 1), dropout_prob=0.2)  # Dropout3d's
    layers = [m for m in net.modules() if isinstance(m, densenet_fused.DenseLayer)]
    assert layers and all(layer.channel_dropout and layer.drop_rate == 0.2 for layer in layers)


@pytest.mark.parametrize(
    "name,spatial_dims", [("DenseNet121", 3), ("DenseNet169", 3), ("DenseNet201", 3), ("DenseNet264", 2)]
)
def test_pretrained_raises_monais_errors(name, spatial_dims, torch_home):
    """3-D, or DenseNet264: MONAI's exception type and message (nothing is downloaded)."""
    config = dict(spatial_dims=spatial_dims, in_channels=1, out_channels=2, init_features=4, growth_rate=2,
                  block_config=(1, 1), pretrained=True)  # fmt: skip
    errors = []
    for module in (monai_nets, fused_monai):
        with pytest.raises(Exception) as caught:
            getattr(module, name)(**config)
        errors.append((caught.type, str(caught.value)))
    assert errors[0] == errors[1] and errors[0][0] is NotImplementedError
    blocks = inspect.signature(getattr(monai_nets, name)).parameters["block_config"].default
    with pytest.raises(NotImplementedError) as caught:
        densenet_fused.DenseNet.from_monai_config(**{**config, "block_config": blocks})
    assert str(caught.value) == errors[0][1]


def test_from_monai_config_pretrained_needs_a_monai_block_config():
    with pytest.raises(ValueError, match=r"densenet121: \(6, 12, 24, 16\).*got block_config=\(2, 3\)"):
        densenet_fused.DenseNet.from_monai_config(2, 3, 3, **MONAI_TINY, pretrained=True)
