"""Channel dropout: MONAI's Dropout2d/Dropout3d in 2-D and 3-D (a mask per sample and channel), drawn with the
same RNG draws, so that a seeded run matches MONAI's network in float64 (1-D: MONAI's nn.Dropout, single values).

Every lockstep seeds the RNG alike before each model's forward: outputs, input and parameter gradients and
running statistics must agree over two SGD steps, then in eval.  Backends: C++ (CPU's default), the reference,
Triton (interpreted on CPU: a tiny block only).  Also: ``convert()`` of MONAI networks with dropout, the
unfused path (a hook inside a block), torch.compile, and the memory of the masks (one value per channel)."""

import copy

import pytest
import torch
from torch import nn
from helpers import MONAI_TINY, assert_compiled_lockstep, assert_lockstep, randomize_affine

import densenet_fused
from densenet_fused.backends import triton as triton_backend

monai_nets = pytest.importorskip("monai.networks.nets")
monai_densenet = pytest.importorskip("monai.networks.nets.densenet")

SHAPES = {1: (2, 2, 67), 2: (2, 2, 35, 39), 3: (2, 2, 19, 21, 18)}
P = 0.3


def _monai(spatial_dims, dropout_prob=P, cls=None, **config):
    torch.manual_seed(0)
    cls = cls or monai_nets.DenseNet
    config = {**MONAI_TINY, "dropout_prob": dropout_prob, **config}
    net = cls(spatial_dims=spatial_dims, in_channels=2, out_channels=3, **config)
    return randomize_affine(net.double())


def _ours(theirs, spatial_dims, dropout_prob=P):
    ours = densenet_fused.DenseNet.from_monai_config(spatial_dims, 2, 3, **MONAI_TINY, dropout_prob=dropout_prob)
    ours = ours.double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def _layers(model):
    return [m for m in model.modules() if isinstance(m, densenet_fused.DenseLayer)]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_from_monai_config_drops_like_monai(spatial_dims, backend):
    theirs = _monai(spatial_dims)
    ours = _ours(theirs, spatial_dims)
    assert all(layer.channel_dropout == (spatial_dims != 1) and layer.drop_rate == P for layer in _layers(ours))
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9, seed=5)


def test_dropout_prob_one_drops_every_channel_like_monai():
    """p = 1: MONAI's Dropout2d zeroes every channel and draws nothing (nor do we; no 1 / 0 scale)."""
    theirs = _monai(2, dropout_prob=1.0)
    ours = _ours(theirs, 2, dropout_prob=1.0)
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9, seed=5)


def test_channel_dropout_changes_no_state_dict_key():
    tiny = dict(growth_rate=4, block_config=(2,), num_init_features=8, bn_size=2)
    plain, channel = densenet_fused.DenseNet(**tiny), densenet_fused.DenseNet(**tiny, channel_dropout=True)
    assert list(plain.state_dict()) == list(channel.state_dict())
    assert all(layer.channel_dropout for layer in _layers(channel))
    assert not any(layer.channel_dropout for layer in _layers(plain))  # torchvision's: single values


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_convert_fuses_monai_dropout(spatial_dims):
    original = _monai(spatial_dims)
    converted = densenet_fused.convert(original)
    assert all(layer.channel_dropout == (spatial_dims != 1) and layer.drop_rate == P for layer in _layers(converted))
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    assert_lockstep(converted, original, x, torch.tensor([0, 2]), steps=2, rtol=1e-9, atol=1e-9, seed=7)


@pytest.mark.parametrize("dropout", [nn.AlphaDropout(P), nn.Dropout3d(P)], ids=["alpha", "other_rank"])
def test_convert_refuses_other_dropouts(dropout):
    model = _monai(2)
    model.features.denseblock2.denselayer1.layers.dropout = dropout
    with pytest.raises(ValueError, match=rf"dropout is a {type(dropout).__name__}; .*Dropout2d"):
        densenet_fused.convert(model)


def _block_lockstep(ours, theirs, x, steps=2):
    """Two SGD steps of a block each (same seed before each forward), compared."""
    channels = x.size(1) + sum(layer.conv2.out_channels for layer in ours.values())
    weight = torch.randn(x.size(0), channels, *x.shape[2:], dtype=x.dtype)
    for step in range(steps):
        results = []
        for model in (ours, theirs):
            torch.manual_seed(11 + step)
            inp = x.clone().requires_grad_()
            model.zero_grad(set_to_none=True)
            out = model(inp)
            (out * weight).sum().backward()
            results.append((out.detach(), inp.grad, [p.grad.clone() for p in model.parameters()]))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        (out, gx, grads), (out_t, gx_t, grads_t) = results
        torch.testing.assert_close(out, out_t, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gx, gx_t, rtol=1e-9, atol=1e-9)
        for g, g_t in zip(grads, grads_t):
            torch.testing.assert_close(g, g_t, rtol=1e-9, atol=1e-9)
        for s, s_t in zip(ours.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(s, s_t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("backend", ["triton"])
def test_triton_block_drops_like_monai(backend, shape, monkeypatch):
    """A converted MONAI block on the Triton kernels (interpreted): the copy kernel reads the channel mask
    through zero strides."""
    spatial_dims = len(shape) - 2
    torch.manual_seed(0)
    theirs = monai_densenet._DenseBlock(spatial_dims, 2, 4, 2, 3, P)
    theirs = randomize_affine(theirs.double())
    ours = densenet_fused.convert(theirs)
    assert isinstance(ours, densenet_fused.DenseBlock) and all(layer.channel_dropout for layer in ours.values())
    keeps = []
    real = triton_backend.stats_pass

    def spy(src, dst, keep=None, *args):
        if keep is not None:
            keeps.append(keep)
        return real(src, dst, keep, *args)

    monkeypatch.setattr(triton_backend, "stats_pass", spy)
    x = torch.randn(shape, dtype=torch.float64)
    _block_lockstep(ours, theirs, x)
    assert keeps
    assert all(keep.stride()[2:] == (0,) * spatial_dims and keep.shape == (2, 3, *shape[2:]) for keep in keeps)


def test_unfused_path_drops_channels_like_monai():
    """A hook inside a block runs it as its modules (block.unfused): the layers drop channels there too."""
    theirs = _monai(3)
    ours = _ours(theirs, 3)
    calls = []
    ours.features.denseblock2.denselayer2.norm2.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(SHAPES[3], dtype=torch.float64)
    with pytest.warns(UserWarning, match="runs as its modules"):
        assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9, seed=5)
    assert calls


def test_compiled_channel_dropout_matches_eager():
    """torch.compile (aot_eager, one graph) over two batch sizes: the same masks as eager for the same seed."""
    torch._dynamo.reset()
    try:
        theirs = _monai(2, block_config=(2, 2))
        torch.manual_seed(1)
        eager = densenet_fused.DenseNet.from_monai_config(2, 2, 3, **{**MONAI_TINY, "block_config": (2, 2)},
                                                         dropout_prob=P).double()  # fmt: skip
        eager.load_state_dict(theirs.state_dict())
        model = copy.deepcopy(eager)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        shapes = [(2, 20, 18), (3, 20, 18), (2, 20, 18)]
        assert_compiled_lockstep(compiled, model, eager, shapes, num_classes=3, in_channels=2, seed=30)
    finally:
        torch._dynamo.reset()


def _saved_bytes(block, x):
    """Bytes of the storages the block saves for backward, and the bool tensors among them."""
    saved, masks = {}, []

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        if t.dtype == torch.bool:
            masks.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(saved.values()), masks


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masks_saved_per_channel_not_per_value(spatial_dims):
    """Backward keeps one bool per sample and channel of each dropping layer: L * N * k bytes more than
    without dropout (element dropout keeps N * k * H * W per layer)."""
    layers, n, channels, growth, spatial = 3, 2, 4, 3, (6,) * spatial_dims

    def block(drop):
        torch.manual_seed(0)
        return densenet_fused.DenseBlock(layers, channels, 2, growth, drop, spatial_dims=spatial_dims,
                                         channel_dropout=True).double()  # fmt: skip

    x = torch.randn(n, channels, *spatial, dtype=torch.float64, requires_grad=True)
    without, _ = _saved_bytes(block(0.0), x)
    with_dropout, masks = _saved_bytes(block(P), x)
    assert len(masks) == layers and all(mask.shape == (n, growth, *[1] * spatial_dims) for mask in masks)
    assert all(mask.untyped_storage().nbytes() == n * growth for mask in masks)
    assert with_dropout - without == layers * n * growth


def test_double_backward_drops_channels_like_monai():
    """create_graph=True (the differentiable backward) multiplies by the same channel masks."""
    torch.manual_seed(0)
    theirs = randomize_affine(monai_densenet._DenseBlock(2, 2, 4, 2, 3, P).double())
    ours = densenet_fused.convert(theirs)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    weight = torch.randn(2, 10, 5, 6, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        torch.manual_seed(3)
        inp = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        (grad,) = torch.autograd.grad((model(inp) * weight).sum(), inp, create_graph=True)
        grad.square().sum().backward()
        results.append([grad.detach(), inp.grad, *[p.grad for p in model.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
