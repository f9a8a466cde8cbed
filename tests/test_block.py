"""The shared-buffer block: gradients, the buffer scheme itself, and what it saves for backward."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torchvision.models.densenet import _DenseBlock as TorchvisionBlock
from torchvision.models.densenet import _DenseLayer as TorchvisionLayer
from helpers import randomize_affine

import densenet_fused
from densenet_fused.block import autograd as block_autograd
from densenet_fused.backends import OpKernels


def _block(num_layers=3, channels=4, bn_size=2, growth=3, drop_rate=0.0, memory_efficient=True):
    torch.manual_seed(0)
    block = densenet_fused.DenseBlock(num_layers, channels, bn_size, growth, drop_rate, memory_efficient)
    return randomize_affine(block.double())  # non-trivial affine parameters: their gradients are checked too


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_gradcheck_tiny_block(train, memory_efficient):
    block = _block(num_layers=2, channels=3, bn_size=1, growth=2, memory_efficient=memory_efficient).train(train)
    if not train:  # non-trivial running statistics for eval mode
        block.train()(torch.randn(4, 3, 3, 3, dtype=torch.float64))
        block.eval()
    names = [name for name, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        return torch.func.functional_call(block, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True)


def test_block_matches_torchvision_and_returns_the_buffer():
    ours = _block(num_layers=4, channels=5, growth=3)
    theirs = TorchvisionBlock(4, 5, 2, 3, 0.0).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    out = ours(x)
    assert out.shape == (2, 5 + 4 * 3, 6, 7)
    assert torch.equal(out[:, :5], x)  # the input is copied in once, the new channels follow
    gy = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, gy)
    out_t = theirs(x)
    (gx_t,) = torch.autograd.grad(out_t, x, gy)
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx_t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_no_concatenation_anywhere(backend):
    """Neither forward nor backward concatenates or stacks, at any level: the profiler sees the aten ops C++
    calls too (and does see torchvision's block concatenate)."""
    concatenating = {"aten::cat", "aten::_cat", "aten::concat", "aten::concatenate", "aten::stack", "aten::_stack"}
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    names = {}
    for which, block in (("ours", _block()), ("torchvision", TorchvisionBlock(3, 4, 2, 3, 0.0).double())):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            block(x).sum().backward()
        names[which] = {event.name for event in prof.events()}
    assert names["torchvision"] & concatenating, "the profiler must see torchvision's concatenation"
    assert "densenet_fused::dense_block" in names["ours"]
    assert not names["ours"] & concatenating, sorted(names["ours"] & concatenating)


def test_statistics_computed_once_per_channel(monkeypatch):
    """norm1 statistics: once per channel for the whole block (C0 + L*k), not once per layer."""
    seen = []
    real = OpKernels.stats

    def counting(self, x):
        seen.append(x.size(1))
        return real(self, x)

    monkeypatch.setattr(OpKernels, "stats", counting)
    block = _block(num_layers=5, channels=4, bn_size=2, growth=3)
    block(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    bottleneck_stats = [6] * 5  # norm2 of each layer sees its own 2*3-channel bottleneck
    assert sorted(seen) == sorted([4] + [3] * 5 + bottleneck_stats)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_saves_only_the_buffer_and_statistics(memory_efficient):
    layers, channels, growth, bn_size = 6, 8, 4, 4
    block = _block(layers, channels, bn_size, growth, memory_efficient=memory_efficient)
    x = torch.randn(2, channels, 8, 8, dtype=torch.float64, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        buf = block(x)
    params = sum(p.untyped_storage().nbytes() for p in block.parameters())
    activations = sum(saved.values()) - params
    buffer_bytes = buf.numel() * buf.element_size()
    bottleneck_bytes = layers * 2 * bn_size * growth * 64 * 8
    stats_bytes = 8 * 2 * (buf.size(1) + layers * bn_size * growth)
    expected = buffer_bytes + stats_bytes + (0 if memory_efficient else bottleneck_bytes)
    assert activations == expected


def test_buffer_keeps_channels_last():
    block = _block()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    out = block(x.requires_grad_())
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    reference = _block()
    x2 = x.detach().contiguous().requires_grad_()
    reference(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("as_list", [False, True])
def test_layer_alone_has_torchvision_semantics(as_list):
    torch.manual_seed(0)
    ours = densenet_fused.DenseLayer(7, growth_rate=3, bn_size=2, drop_rate=0.0).double()
    theirs = TorchvisionLayer(7, growth_rate=3, bn_size=2, drop_rate=0.0).double()
    theirs.load_state_dict(ours.state_dict())
    pieces = [torch.randn(2, c, 4, 5, dtype=torch.float64, requires_grad=True) for c in (4, 3)]
    whole = torch.randn(2, 7, 4, 5, dtype=torch.float64, requires_grad=True)
    inputs = pieces if as_list else whole
    out, out_t = ours(inputs), theirs(inputs)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
    leaves = pieces if as_list else [whole]
    grads = torch.autograd.grad(out.square().sum(), leaves)
    grads_t = torch.autograd.grad(out_t.square().sum(), leaves)
    for g, g_t in zip(grads, grads_t):
        torch.testing.assert_close(g, g_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.norm1.running_var, theirs.norm1.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["train", "eval", "keep_bottleneck_dropout", "channels_last"])
def test_block_ops_pass_opcheck(monkeypatch, case):
    """The block's two custom ops: schema, fake (exact strides, as inductor requires) and dynamic shapes."""
    recorded = {}
    for name in ("dense_block", "dense_block_backward"):
        op = getattr(block_autograd, name)

        def recording(*args, op=op, name=name):
            recorded[name] = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, args)
            return op(*args)

        monkeypatch.setattr(block_autograd, name, recording)
    block = _block(memory_efficient=case != "keep_bottleneck_dropout", drop_rate=0.3 * (case == "keep_bottleneck_dropout"))
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    if case == "eval":
        block(x)
        block.eval()
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    block(x.requires_grad_()).square().sum().backward()
    for name, args in recorded.items():
        torch.library.opcheck(getattr(torch.ops.densenet_fused, name).default, args)
