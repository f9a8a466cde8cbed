"""Test helpers shared by the test files: model twins stepped in lockstep, float32 accuracy rules, tiny configs.

The twins and their errors against float64 live in ``benchmarks.twins``, which gpu_check.py reports from too.
"""

import statistics
from dataclasses import dataclass

import torch

from benchmarks.twins import (  # noqa: F401  (re-exported for the tests)
    ROUNDING_SPREAD,
    errors_against_float64,
    randomize_affine,
    relative_error,
    step_results,
    twins,
)
from densenet_fused.ops import PRIMITIVES


def train_step(model, x, target, lr=0.1):
    """One SGD step on a cross-entropy loss; returns (output, input grad, param grads)."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, target)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return out.detach(), x.grad, grads


def assert_close_tensors(actual, expected, rtol, atol, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


def assert_lockstep(ours, theirs, x, target, steps, rtol, atol, seed=None):
    """Train both for ``steps`` SGD steps, comparing everything each step, then compare in eval.

    With a ``seed``, both steps start from the same RNG state (the same dropout masks).
    """
    for step in range(steps):
        results = []
        for model in (ours, theirs):
            if seed is not None:
                torch.manual_seed(seed + step)
            results.append(train_step(model, x, target))
        (out, gx, grads), (out_t, gx_t, grads_t) = results
        torch.testing.assert_close(out, out_t, rtol=rtol, atol=atol, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(gx, gx_t, rtol=rtol, atol=atol, msg=lambda m: f"step {step} input grad: {m}")
        assert_close_tensors(grads, grads_t, rtol, atol, f"step {step} param grads")
        assert_close_tensors(
            list(ours.state_dict().values()), list(theirs.state_dict().values()), rtol, atol, f"step {step} state"
        )
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=rtol, atol=atol)


def assert_compiled_lockstep(compiled, model, theirs, shapes, num_classes, in_channels=3, seed=None):
    """torch.compile over several batch sizes: for each (batch, height, width) of ``shapes``, one float64 training
    step of ``compiled`` (compiled from ``model``) in lockstep with ``theirs``, then eval (``assert_lockstep``),
    both back in train mode for the next.  With a ``seed``, the i-th shape's step starts from seed + i."""
    for i, (batch, height, width) in enumerate(shapes):
        x = torch.randn(batch, in_channels, height, width, dtype=torch.float64)
        target = torch.randint(num_classes, (batch,))
        step_seed = None if seed is None else seed + i
        assert_lockstep(compiled, theirs, x, target, steps=1, rtol=1e-9, atol=1e-9, seed=step_seed)
        model.train(), theirs.train()


def assert_as_accurate_as_torchvision(make, autocast=None, seeds=(0, 1, 2, 3, 4)):
    """Judged against the float64 truth: for every quantity of a training step, the median over ``seeds`` of our
    error must stay within ``ROUNDING_SPREAD`` of torchvision's own error in the same precision.

    ``make(seed)`` returns (ours, theirs, x, loss_fn), both models float32 with the same weights; both run under
    ``autocast`` (torch.autocast's keyword arguments) if given.
    """
    runs = [errors_against_float64(*make(seed), autocast) for seed in seeds]
    for what in runs[0]:
        ours_error = statistics.median(run[what][0] for run in runs)
        theirs_error = statistics.median(run[what][1] for run in runs)
        assert ours_error <= ROUNDING_SPREAD * theirs_error, (
            f"{what}: ours {ours_error:.2e}, torchvision {theirs_error:.2e} ({autocast or 'float32'})"
        )


def assert_float32_as_accurate_as_torchvision(make, seeds=(0, 1, 2, 3, 4)):
    """``assert_as_accurate_as_torchvision`` in plain float32."""
    assert_as_accurate_as_torchvision(make, seeds=seeds)


# ---- Tiny configurations shared by the test files (each a few milliseconds a step on CPU) ----

# Two blocks (2 and 3 layers): the default small DenseNet of the suite.
TINY = dict(growth_rate=6, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5)
# Two blocks of two layers, growth 4: fewer ops, for what compiles or repeats the model many times.
TINY_2X2 = dict(TINY, growth_rate=4, block_config=(2, 2))
# MONAI's DenseNet keywords (init_features, no num_classes) for the same small network.
MONAI_TINY = dict(init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2)


# ---------------------------------------------------------------------------------------------------
# Kernel problems: the inputs of the fused primitives, as the block hands them to the kernels.  The dtype and
# layout rules below restate the package's (``ops.layout``) on purpose: the tests check the package against them.

OPS = {op.name: op for primitive in PRIMITIVES.values() for op in primitive.ops.values()}  # every public op by name
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
MARGIN = 0.05  # every pre-ReLU value stays this far from the kink, where rounding would flip a gradient
EXTRA = 5  # channels of the buffer beyond x: x is a channel prefix of a larger buffer, as in the block


def acc(dtype: torch.dtype) -> torch.dtype:
    """The statistics' and BatchNorm parameters' dtype for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` [N, C, *spatial] with channels innermost when ``layout`` is channels_last (any spatial rank:
    channels_last for 2-D, channels_last_3d for 3-D)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "channels_last" else t.contiguous()


def layout_of(x: torch.Tensor) -> str:
    return "channels_last" if x.dim() >= 3 and x.stride(1) == 1 and x[0, 0].numel() > 1 else "contiguous"


def random_in_layout(like: torch.Tensor, channels: int, seed: int, spatial=None) -> torch.Tensor:
    """Random [N, channels, *spatial] in the dtype, device and layout of ``like`` (gradients come this way)."""
    generator = torch.Generator().manual_seed(seed)
    spatial = like.shape[2:] if spatial is None else spatial
    t = torch.randn(like.size(0), channels, *spatial, generator=generator, dtype=torch.float64)
    return in_layout(t, layout_of(like)).to(like.device, like.dtype)


def random_weight(b: int, c: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=generator, dtype=torch.float64) / c**0.5).to(DEVICE, dtype)


def pre_activation(x, mean, invstd, gamma, beta) -> torch.Tensor:
    """gamma * (x - mean) * invstd + beta in float64, for per-channel [C] or per-sample [N, C] statistics."""
    b = _broadcast
    return (x.double() - b(mean, x)) * b(invstd, x) * b(gamma, x) + b(beta, x)


def _broadcast(v, x):
    return v.double().view(*(v.shape if v.dim() == 2 else (1, -1)), *([1] * (x.dim() - 2)))


@dataclass
class KernelProblem:
    """x = buf[:, :C] and what normalizes it: statistics per channel [C] or per sample [N, C], gamma, beta."""

    buf: torch.Tensor
    x: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor

    @property
    def norm(self) -> tuple:
        return self.mean, self.invstd, self.gamma, self.beta


def kernel_problem(n, c, spatial, layout, dtype, per_sample=False, seed=0, extra=EXTRA) -> KernelProblem:
    """A ``KernelProblem`` whose statistics are x's own batch (or instance) statistics, so training mode is the
    real thing.  Channels differ in scale and offset, gamma has both signs, and x is then nudged ``MARGIN``
    away from the ReLU kink (which moves the statistics a little: the kernels take them as given)."""
    generator = torch.Generator().manual_seed(seed)
    buf = torch.randn(n, c + extra, *spatial, generator=generator, dtype=torch.float64)
    scale = 0.5 + 2 * torch.rand(c + extra, generator=generator, dtype=torch.float64)
    buf = in_layout(buf * _broadcast(scale, buf) + _broadcast(torch.randn(c + extra, generator=generator), buf), layout)
    x = buf[:, :c]
    dims = [0, *range(2, x.dim())] if not per_sample else list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    sign = torch.where(torch.rand(c, generator=generator) < 0.3, -1.0, 1.0).double()
    gamma = (0.5 + torch.rand(c, generator=generator, dtype=torch.float64)) * sign
    beta = 0.5 * torch.randn(c, generator=generator, dtype=torch.float64)
    pre = pre_activation(x, mean, invstd, gamma, beta)
    bump = torch.where(pre.abs() < MARGIN, torch.where(pre >= 0, 2 * MARGIN, -2 * MARGIN), 0.0)
    with torch.no_grad():
        x += bump / _broadcast(gamma, x) / _broadcast(invstd, x)
    buf = buf.to(DEVICE, dtype)
    a = acc(dtype)
    problem = KernelProblem(buf, buf[:, :c], *(t.to(DEVICE, a) for t in (mean, invstd, gamma, beta)))
    assert pre_activation(problem.x.cpu(), mean, invstd, gamma, beta).abs().min() > MARGIN / 4, "rounded onto the kink"
    return problem
