"""Graph capture: torch.fx (blocks, layers and transitions as leaves), torch.export, and the TorchScript error.

Traced, extracted and exported models must compute exactly what eager does, in float64, gradients and running
statistics included.
"""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from helpers import TINY, randomize_affine

import densenet_fused

TINY = dict(TINY, growth_rate=4)
TORCHSCRIPT_ERROR = r"not support TorchScript.*torch\.compile.*torch\.export"
LEAVES = ["features.denseblock1", "features.transition1", "features.denseblock2"]


def _model(**config):
    torch.manual_seed(0)
    return randomize_affine(densenet_fused.DenseNet(**{**TINY, **config}).double())


def _step(model, x):
    """One forward and backward; returns the output, the input gradient and the parameter gradients."""
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return [out.detach(), x.grad, *[p.grad for p in model.parameters()]]


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def _assert_same_state(model, reference):
    _assert_same(list(model.state_dict().values()), list(reference.state_dict().values()))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_symbolic_trace_records_leaves_and_trains_like_eager(train):
    model = _model(drop_rate=0.2).train(train)
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert [c for c in calls if c.startswith("features.denseblock") or c.startswith("features.transition")] == LEAVES
    assert not any("denselayer" in str(node.target) for node in traced.graph.nodes)  # blocks are not traced into
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for step in range(2):
        torch.manual_seed(step)
        ours = _step(traced, x)
        torch.manual_seed(step)
        _assert_same(ours, _step(eager, x))
    _assert_same_state(model, eager)  # the traced module shares model's parameters and running stats


def test_layer_and_list_inputs_are_leaves_too():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = densenet_fused.DenseBlock(2, 6, 2, 3, 0.0)
            self.layer = densenet_fused.DenseLayer(12, 3, 2, 0.0)

        def forward(self, x, skip):
            return self.layer(self.block([x, skip]))

    torch.manual_seed(0)
    model = Skip().double()
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["block", "layer"]
    x, skip = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(traced(x, skip), eager(x, skip), rtol=0, atol=0)
    _assert_same_state(model, eager)


def test_a_fused_module_cannot_be_the_root_of_a_trace():
    with pytest.raises(TypeError, match="leaf module for torch.fx and cannot be the root"):
        torch.fx.symbolic_trace(densenet_fused.DenseBlock(2, 4, 2, 3, 0.0))


def test_torchvision_feature_extraction_matches_eager():
    model = _model()
    eager = copy.deepcopy(model)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == eval_nodes and [n for n in train_nodes if n in LEAVES] == LEAVES
    nodes = ["features.denseblock1", "features.transition1", "classifier"]
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    features = extractor(x)
    x_eager = x.detach().clone().requires_grad_()
    stem = eager.features[:4](x_eager)
    block = eager.features.denseblock1(stem)
    transition = eager.features.transition1(block)
    expected = [block, transition, eager.classifier(eager.features[6:](transition).relu().mean((2, 3)))]
    weights = [torch.randn_like(e) for e in expected]
    _assert_same(list(features.values()), expected)
    sum((f * w).sum() for f, w in zip(features.values(), weights)).backward()
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()
    _assert_same([x.grad, *[p.grad for p in model.parameters()]], [x_eager.grad, *[p.grad for p in eager.parameters()]])
    _assert_same_state(model, eager)


def test_timm_fx_feature_extraction_matches_eager():
    timm = pytest.importorskip("timm")
    from timm.models import get_notrace_modules
    from timm.models._features_fx import FeatureGraphNet

    torch.manual_seed(0)
    model = densenet_fused.convert(timm.create_model("densenet121", block_config=(2, 2, 2, 2), num_classes=3)).double()
    assert {densenet_fused.DenseBlock, densenet_fused.Transition, densenet_fused.DenseLayer} <= set(get_notrace_modules())
    model.eval()
    extractor = FeatureGraphNet(model, out_indices=(1, 2, 4))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    expected = model.forward_intermediates(x, indices=(1, 2, 4), intermediates_only=True)
    _assert_same(extractor(x), expected)


def test_export_matches_eager():
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    exported = torch.export.export(model, (x,))
    code = exported.graph_module.code
    assert "densenet_fused.dense_block" in code and "densenet_fused.bn_relu_pool_conv1x1" in code
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-12, atol=1e-12)
    y = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(exported.module()(y), model(y), rtol=1e-12, atol=1e-12)  # not a constant


def _with_block():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), densenet_fused.DenseBlock(2, 4, 2, 3, 0.0))


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: densenet_fused.DenseNet(**TINY), (2, 3, 32, 32)),
        (lambda: densenet_fused.DenseBlock(2, 4, 2, 3, 0.0), (2, 4, 5, 5)),
        (lambda: densenet_fused.DenseLayer(4, 3, 2, 0.0), (2, 4, 5, 5)),
        (lambda: densenet_fused.Transition(4, 2), (2, 4, 6, 6)),
        (_with_block, (2, 3, 5, 5)),
    ],
    ids=["densenet", "block", "layer", "transition", "inside_another_module"],
)
@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_raises_at_once_with_what_to_use_instead(make, shape):
    module = make()
    with pytest.raises(RuntimeError, match=TORCHSCRIPT_ERROR):
        torch.jit.script(module)
    with pytest.raises(RuntimeError, match=TORCHSCRIPT_ERROR):
        torch.jit.trace(module, (torch.randn(shape),))
