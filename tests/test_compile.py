"""torch.compile: blocks and transitions trace into one graph (fullgraph=True), each dense block as one opaque
custom op and its backward as another (the buffer, its slices and the in-place gradient accumulation stay
inside them), and train exactly like eager.  aot_eager runs the traced graphs with eager kernels; the
inductor tests are here and in test_fuzz.py."""

import copy

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torchvision.models.densenet import _DenseBlock as TorchvisionBlock
from helpers import (
    TINY_2X2,
    assert_compiled_lockstep,
    assert_float32_as_accurate_as_torchvision,
    assert_lockstep,
    randomize_affine,
    twins,
)

import densenet_fused


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _recording_aot_eager(graphs: list):
    """aot_eager that also keeps the code of the forward and backward graphs it compiles."""

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def test_compiled_model_trains_like_torchvision():
    ours, theirs = twins(**TINY_2X2)
    graphs = []
    compiled = torch.compile(ours, backend=_recording_aot_eager(graphs), fullgraph=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_lockstep(compiled, theirs, x, torch.tensor([1, 3]), steps=2, rtol=1e-9, atol=1e-9)
    forward, backward = graphs[:2]
    for op in ("dense_block", "channel_stats", "bn_relu_pool_conv1x1"):
        assert f"densenet_fused.{op}.default" in forward, op
    for op in ("dense_block_backward", "bn_relu_pool_conv1x1_backward"):
        assert f"densenet_fused.{op}.default" in backward, op
    # The buffer, its slices and the gradient accumulation stay inside the block's ops: exposed to inductor,
    # they were re-laid out inconsistently (wrong gradients) and each layer's prefix was copied.
    for graph in (forward, backward):
        assert "slice_scatter" not in graph and "auto_functionalized" not in graph


def test_compiled_dropout_matches_torchvision():
    """Dropout inside the block traces too, and its backward reuses the forward's mask."""
    ours, theirs = twins(**{**TINY_2X2, "drop_rate": 0.4})
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for step in range(2):
        outputs = []
        for model in (compiled, theirs):
            torch.manual_seed(100 + step)
            out = model(x)
            out.square().sum().backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)


def test_cumulative_average_running_stats_do_not_break_the_graph():
    """momentum=None updates the running stats with 1 / num_batches_tracked as a tensor: still one graph."""
    torch.manual_seed(0)
    block = densenet_fused.DenseBlock(2, 4, 2, 3, 0.0, spatial_dims=2).double()
    for norm in block.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.momentum = None
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for step in range(3):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64) + step
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(block.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert int(block.denselayer2.norm1.num_batches_tracked) == 3


def test_compiled_model_under_autocast_and_channels_last_matches_eager():
    ours, _ = twins(dtype=torch.float32, **TINY_2X2)
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    results = []
    for model in (compiled, eager):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        results.append(out)
    assert results[0].dtype == torch.bfloat16
    torch.testing.assert_close(results[0], results[1], rtol=1e-2, atol=1e-2)
    for p, q in zip(ours.parameters(), eager.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2)


def test_inductor_block_float32_is_as_accurate_as_torchvision():
    """Compiled with inductor, a float32 block is judged against torchvision's block in float64."""

    def make(seed):
        torch.manual_seed(seed)
        block = randomize_affine(densenet_fused.DenseBlock(2, 4, 2, 3, 0.0))
        theirs = TorchvisionBlock(2, 4, 2, 3, 0.0)
        theirs.load_state_dict(block.state_dict())
        x = torch.randn(2, 4, 6, 6)
        weights = torch.randn(2, 10, 6, 6, dtype=torch.float64)
        return torch.compile(block, backend="inductor", fullgraph=True), theirs, x, lambda out: (out * weights).sum()

    assert_float32_as_accurate_as_torchvision(make)


def test_compiled_training_over_several_batch_sizes_matches_torchvision():
    """Batch sizes and sizes change from step to step (a last partial batch, multi-scale training): every
    step matches eager torchvision, and dynamo compiles no more graphs for ours than for torchvision."""
    from torch._dynamo.utils import counters

    shapes = [(b, s, s + 1) for b, s in [(2, 32), (3, 32), (4, 32), (5, 40), (6, 48), (1, 48), (2, 48), (3, 56)]]
    graphs = {}
    for name in ("ours", "torchvision"):
        torch._dynamo.reset()
        counters.clear()
        ours, theirs = twins(**TINY_2X2)
        randomize_affine(ours)
        theirs.load_state_dict(ours.state_dict())
        model = ours if name == "ours" else copy.deepcopy(theirs)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_compiled_lockstep(compiled, model, theirs, shapes, TINY_2X2["num_classes"])
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs["ours"] <= graphs["torchvision"], graphs
