"""Double backward (create_graph=True): gradient penalties, R1 regularization and MAML-style inner steps.

When autograd records the backward, the block, the transition and every primitive run differentiable
PyTorch formulas, so their gradients can be differentiated again.  Checked with gradgradcheck in float64
and against torchvision's second derivatives.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from helpers import TINY_2X2, randomize_affine, twins

import densenet_fused
from densenet_fused import ops
from densenet_fused.ops.channel_stats import channel_stats_reference

TINY = dict(TINY_2X2, growth_rate=3, num_init_features=4, num_classes=3)


def _penalized_grads(model, x):
    """Gradients of a loss plus the squared norm of its gradients for the input and the parameters (R1 and
    a MAML-style second-order term at once)."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks for both
    out = model(x)
    loss = out.square().sum() + out.sum()
    params = list(model.parameters())
    first = torch.autograd.grad(loss, [x, *params], create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    (loss + penalty).backward()
    return [out, x.grad, *[p.grad for p in params], *model.state_dict().values()]


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(memory_efficient=False),
        dict(drop_rate=0.3),
        dict(train=False),
        dict(channels_last=True),
        dict(momentum=None),
    ],
    ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items()) or "default",
)
def test_second_derivatives_match_torchvision(case):
    case = dict(case)
    train, channels_last = case.pop("train", True), case.pop("channels_last", False)
    norm_kwargs = {"momentum": case.pop("momentum")} if "momentum" in case else None
    ours, theirs = twins(norm_kwargs=norm_kwargs, **TINY, **case)
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    if not train:  # non-trivial running statistics first
        with torch.no_grad():
            ours(torch.randn(4, 3, 21, 23, dtype=torch.float64)), theirs(torch.randn(4, 3, 21, 23, dtype=torch.float64))
        theirs.load_state_dict(ours.state_dict())
    ours.train(train), theirs.train(train)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 21, 23, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
    ours_results, theirs_results = _penalized_grads(ours, x), _penalized_grads(theirs, x)
    for i, (a, b) in enumerate(zip(ours_results, theirs_results)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda m: f"result {i}: {m}")


def _functional(module):
    """``module`` as a function of (input, *parameters), for gradgradcheck."""
    names = [name for name, _ in module.named_parameters()]

    def run(x, *values):
        torch.manual_seed(0)  # dropout draws the same mask on every call
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))

    return run, [p.detach().clone().requires_grad_() for p in module.parameters()]


def _with_running_stats(module, shape):
    module.train()(torch.randn(shape, dtype=torch.float64))
    return module.eval()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "memory_efficient,drop_rate,act", [(True, 0.0, "relu"), (False, 0.0, "relu"), (True, 0.4, "relu"),
                                       (True, 0.0, "prelu"), (False, 0.0, "prelu")]
)  # fmt: skip
def test_block_gradgradcheck(train, memory_efficient, drop_rate, act):
    torch.manual_seed(0)
    block = densenet_fused.DenseBlock(2, 3, 1, 2, drop_rate, memory_efficient, act=act)
    block = randomize_affine(block.double())
    if not train:
        _with_running_stats(block, (4, 3, 3, 3))
    run, params = _functional(block)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(run, (x, *params), fast_mode=True)


@pytest.mark.parametrize("act", ["relu", "prelu"])
@pytest.mark.parametrize("train", [True, False])
def test_transition_and_layer_gradgradcheck(train, act):
    torch.manual_seed(0)
    for module in (densenet_fused.Transition(3, 2, act=act), densenet_fused.DenseLayer(3, 2, 1, 0.0, act=act)):
        module = randomize_affine(module.double())
        if not train:
            _with_running_stats(module, (4, 3, 4, 4))
        run, params = _functional(module)
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        assert gradgradcheck(run, (x, *params), fast_mode=True), type(module).__name__


def _primitive(name, training):
    """A primitive as a function of (x, gamma, beta[, weight]); with ``training`` its statistics are x's own
    batch statistics, recomputed from x on every call (so finite differences see them move with x)."""
    op = getattr(ops, name)
    fixed_mean, fixed_var = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def run(x, *params):
        with torch.no_grad():
            mean, var = channel_stats_reference(x) if training else (fixed_mean, fixed_var)
        return op(x, mean, torch.rsqrt(var + 1e-5), *params, training)

    return run


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["bn_relu", "bn_relu_conv1x1", "bn_relu_pool_conv1x1"])
def test_primitive_gradgradcheck(name, training):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    params = [torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)]
    if name != "bn_relu":
        params.append(torch.randn(2, 3, dtype=torch.float64))
    params = [p.requires_grad_() for p in params]
    run = _primitive(name, training)
    assert gradcheck(run, (x, *params), fast_mode=True)
    assert gradgradcheck(run, (x, *params), fast_mode=True)


def test_first_order_gradients_are_the_same_with_and_without_create_graph():
    """The differentiable path is only taken when autograd records; its first derivatives equal the kernels'."""
    ours, _ = twins(**TINY)
    randomize_affine(ours)
    x = torch.randn(3, 3, 21, 23, dtype=torch.float64, requires_grad=True)
    params = [x, *ours.parameters()]
    plain = torch.autograd.grad(ours(x).square().sum(), params)
    recorded = torch.autograd.grad(ours(x).square().sum(), params, create_graph=True)
    assert all(g.grad_fn is not None for g in recorded[:1])
    for a, b in zip(plain, recorded):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
