"""Differential fuzzing against torchvision in float64: random DenseNets trained eagerly and compiled.

Each example draws a configuration (growth rate, bn_size, 1-3 blocks of 1-3 layers, batch 1-6, odd or even
spatial size, layout, train/eval, dropout, memory_efficient, momentum) and compares two training steps of
ours with torchvision's on the same weights and input: output, every parameter gradient, the input gradient
and the running statistics, to 1e-8.  Eager runs 100 examples; compiled runs 2 plus the explicit
``@example`` (a cold inductor compile takes about a minute here), the shape that trained with wrong
gradients under inductor when the block's buffer writes and gradient accumulation were exposed to it.
"""

import math

import pytest
import torch
from helpers import randomize_affine, twins

# Without hypothesis (e.g. on a lent GPU machine) the file skips, so the rest of the suite still collects.
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOLERANCE = dict(rtol=1e-8, atol=1e-8)


def _side(draw, blocks: int, last: int) -> int:
    """An input side whose last block sees ``last`` pixels: the stem halves twice (ceil), transitions floor."""
    first = last * 2 ** (blocks - 1) + draw(st.integers(0, 2 ** (blocks - 1) - 1))
    return 4 * first - draw(st.integers(0, 3))


@st.composite
def configs(draw):
    """A model config and run settings whose BatchNorms all see more than 4 values per channel."""
    blocks = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 6))
    smallest = 1 if batch > 4 else 2 if batch > 1 else 3  # batch * smallest**2 > 4
    sides = [_side(draw, blocks, draw(st.integers(smallest, smallest + 1))) for _ in range(2)]
    config = dict(
        growth_rate=draw(st.integers(2, 6)),
        block_config=tuple(draw(st.lists(st.integers(1, 3), min_size=blocks, max_size=blocks))),
        num_init_features=draw(st.integers(4, 10)),
        bn_size=draw(st.integers(1, 3)),
        drop_rate=draw(st.sampled_from([0.0, 0.3])),
        num_classes=3,
        memory_efficient=draw(st.booleans()),
    )
    run = dict(
        shape=(batch, 3, *sides),
        channels_last=draw(st.booleans()),
        train=draw(st.booleans()),
        momentum=draw(st.sampled_from([None, 0.1, 0.37])),
    )
    return config, run


def _values_per_channel(config, shape) -> int:
    """Values per channel of the smallest BatchNorm (the last block's)."""
    sizes = [(s + 3) // 4 for s in shape[2:]]
    for _ in config["block_config"][1:]:
        sizes = [s // 2 for s in sizes]
    return shape[0] * math.prod(sizes)


def _step(model, x, seed):
    """Output, input gradient, parameter gradients and buffers after one forward and backward from ``seed``."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both
    out = model(x)
    (out.square().sum() + out.sum()).backward()
    return out, x.grad, [p.grad for p in model.parameters()], list(model.state_dict().values())


def _check(config, run, compile_model):
    assert _values_per_channel(config, run["shape"]) > 4, run["shape"]
    ours, theirs = twins(norm_kwargs=dict(momentum=run["momentum"]), **config)
    randomize_affine(ours)
    if not run["train"]:  # non-trivial running statistics
        for name, buffer in ours.named_buffers():
            if "running_mean" in name:
                buffer.uniform_(-0.5, 0.5)
            elif "running_var" in name:
                buffer.uniform_(0.5, 2.0)
    theirs.load_state_dict(ours.state_dict())
    ours.train(run["train"]), theirs.train(run["train"])
    torch.manual_seed(1)
    x = torch.randn(run["shape"], dtype=torch.float64)
    if run["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
    model = torch.compile(ours, fullgraph=True) if compile_model else ours
    for step in range(2):  # a second step also sees the updated running statistics and num_batches_tracked
        (out, gx, grads, state), (out_t, gx_t, grads_t, state_t) = _step(model, x, step), _step(theirs, x, step)
        torch.testing.assert_close(out, out_t, **TOLERANCE, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(gx, gx_t, **TOLERANCE, msg=lambda m: f"step {step} input grad: {m}")
        for (name, _), g, g_t in zip(ours.named_parameters(), grads, grads_t):
            torch.testing.assert_close(g, g_t, **TOLERANCE, msg=lambda m: f"step {step} {name} grad: {m}")
        for name, b, b_t in zip(ours.state_dict(), state, state_t):
            torch.testing.assert_close(b, b_t, **TOLERANCE, msg=lambda m: f"step {step} {name}: {m}")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)
@given(configs())
def test_eager_training_matches_torchvision(case):
    _check(*case, compile_model=False)


# The shape of the bug report: batch 4 at 48x48, three blocks of three layers.
REPORTED = (
    dict(growth_rate=8, block_config=(3, 3, 3), num_init_features=16, bn_size=2, drop_rate=0.0, num_classes=5,
         memory_efficient=True),
    dict(shape=(4, 3, 48, 48), channels_last=False, train=True, momentum=0.1),
)  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], derandomize=True, database=None)
@given(configs())
@example(REPORTED)
def test_compiled_training_matches_torchvision(case):
    """Inductor, fullgraph=True, with eager's random numbers (fallback_random) so that dropout draws the same."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        _check(*case, compile_model=True)
