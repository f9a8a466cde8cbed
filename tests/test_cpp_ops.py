"""The C++ CPU kernels (torch.ops.densenet_fused.*_cpp) against their pure-PyTorch references.

The test suite runs after the build, so a missing extension fails these tests (it does not skip them).

Tolerances:
* float64: 1e-10 relative (plus 1e-10 x the largest magnitude): only summation order differs.
* float32, bfloat16, float16: the kernels are compared with the reference run in the same dtype on the
  same inputs, so both round at the same points and only accumulation order differs.  float32 sums of
  up to a few thousand terms drift by ~1e-6 relative; 2e-5 (relative, and absolute x the largest
  magnitude, for values that cancel) is a comfortable bound that a real bug breaks.  bfloat16 outputs
  are rounded to 8 significant bits, so one flipped rounding is 2^-8..2^-7 relative and the in-place
  accumulation rounds twice: 2^-6 (x the largest magnitude for cancelling values); float16 (11 bits):
  2^-9.  Statistics, grad_gamma and grad_beta stay in float32 and get the float32 bound.
* The test data keeps every pre-ReLU value at least 0.05 away from 0: at the kink the ReLU's derivative
  jumps, so a rounding-level difference there would legitimately flip a whole gradient element.
"""

import pytest
import torch
import torchvision

from densenet_fused.ops._backend import config
import densenet_fused
from densenet_fused.ops import PRIMITIVES, _backend
from densenet_fused.ops.layout import broadcast, is_channels_last
from densenet_fused.ops.bn_relu import bn_relu_backward_reference, bn_relu_reference
from densenet_fused.ops.bn_relu_conv1x1 import bn_relu_conv1x1_backward_reference, bn_relu_conv1x1_reference
from densenet_fused.ops.bn_relu_pool_conv1x1 import (
    bn_relu_pool_conv1x1_backward_reference,
    bn_relu_pool_conv1x1_reference,
)
from densenet_fused.ops.channel_stats import channel_stats_reference

# every op of every primitive has a C++ kernel, ``<op>_cpp``
OPS = [op for primitive in PRIMITIVES.values() for op in primitive.ops.values()]
CPP_OPS = [f"{op.name}_cpp" for op in OPS]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]
EXTRA = 5  # channels of the buffer beyond x (x is a channel prefix of a larger buffer)
MARGIN = 0.05

# (N, C, spatial): odd sizes, 1x1 spatial, channel counts that are no multiple of anything, tiles
# spanning several samples, several tiles per sample, spatial rank 1 and 3.  (The kernels cut the N*HW
# pixels into tiles of ~1 MiB of activations, at least one per thread.)
SHAPES = [
    (2, 7, (5, 3)),
    (2, 13, (1, 1)),
    (3, 33, (9, 11)),
    (4, 301, (6, 7)),
    (2, 203, (33, 37)),
    (3, 40, (63, 65)),  # tiles that start and end mid-sample
    (2, 6, (17,)),
    (2, 5, (3, 4, 5)),
]
POOL_SHAPES = [(2, 7, (5, 3)), (3, 33, (9, 11)), (4, 301, (6, 7)), (2, 2, (2, 2)), (2, 6, (17,)), (2, 5, (3, 4, 5))]


def ops():
    return torch.ops.densenet_fused


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerance(dtype, reduced_output=True):
    """(rtol, atol scale): see the module docstring."""
    if dtype == torch.float64:
        return 1e-10, 1e-10
    if dtype == torch.bfloat16 and reduced_output:
        return 2**-6, 2**-6
    if dtype == torch.float16 and reduced_output:
        return 2**-9, 2**-9
    return 2e-5, 2e-5


def assert_matches(actual, expected, dtype, what, reduced_output=None):
    """Compare with the reference; reduced_output says whether the value is in x's 16-bit dtype."""
    if reduced_output is None:
        reduced_output = actual.dtype in (torch.bfloat16, torch.float16)
    rtol, scale = tolerance(dtype, reduced_output)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = scale * max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def buffer(n, channels, spatial, layout, generator):
    """A float64 [n, channels, *spatial] tensor in the given layout (channels innermost for channels_last)."""
    if layout == "channels_last":
        return torch.randn(n, *spatial, channels, generator=generator, dtype=torch.float64).movedim(-1, 1)
    return torch.randn(n, channels, *spatial, generator=generator, dtype=torch.float64)


def problem(n, c, spatial, layout, dtype, seed=0, extra=EXTRA):
    """x = buf[:, :c] (a prefix view of a larger buffer) and BN parameters in the accumulation dtype.

    mean/invstd are x's batch statistics (so training mode is the real thing; x is then nudged away from
    the ReLU kink, which moves them a little), x has a random scale and shift per channel so that
    channels differ, and gamma has both signs.
    """
    g = torch.Generator().manual_seed(seed)
    buf = buffer(n, c + extra, spatial, layout, g)
    scale = 0.5 + 2 * torch.rand(c + extra, generator=g, dtype=torch.float64)
    shift = torch.randn(c + extra, generator=g, dtype=torch.float64)
    with torch.no_grad():
        buf.mul_(broadcast(scale, buf)).add_(broadcast(shift, buf))
    x = buf[:, :c]
    mean, var = channel_stats_reference(x)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = (0.5 + torch.rand(c, generator=g, dtype=torch.float64)) * torch.where(
        torch.rand(c, generator=g) < 0.3, -1.0, 1.0
    ).double()
    beta = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    # away from the kink: shift x where the pre-ReLU value is within MARGIN of 0
    pre = bn_pre(x, mean, invstd, gamma, beta)
    bump = torch.where(pre.abs() < MARGIN, torch.where(pre >= 0, 2 * MARGIN, -2 * MARGIN), 0.0)
    with torch.no_grad():
        x += bump / broadcast(gamma * invstd, x)
    buf = buf.to(dtype)
    x = buf[:, :c]
    assert bn_pre(x, mean, invstd, gamma, beta).abs().min() > MARGIN / 4 if x.numel() else True
    a = acc(dtype)
    return buf, x, mean.to(a), invstd.to(a), gamma.to(a), beta.to(a)


def bn_pre(x, mean, invstd, gamma, beta):
    b = broadcast
    return (x.double() - b(mean, x)) * b(invstd, x) * b(gamma, x) + b(beta, x)


def random_like_layout(x, channels, dtype, seed, spatial=None):
    """Random [N, channels, *spatial] in x's layout (what the block's autograd hands the kernels)."""
    g = torch.Generator().manual_seed(seed)
    spatial = x.shape[2:] if spatial is None else spatial
    layout = "channels_last" if is_channels_last(x) else "contiguous"
    return buffer(x.size(0), channels, spatial, layout, g).to(dtype)


def random_weight(b, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64) / c**0.5).to(dtype)


def assert_same_layout(out, x):
    assert is_channels_last(out) == is_channels_last(x), "output layout differs from x's"


def shape_id(shape):
    n, c, spatial = shape
    return f"{n}x{c}x" + "x".join(map(str, spatial))


# ---------------------------------------------------------------------------------------------------


def test_extension_built_and_selected():
    assert _backend.CPP_AVAILABLE, f"densenet_fused._C is not built: {_backend.BUILD_COMMAND}"
    for name in CPP_OPS:
        assert hasattr(ops(), name), f"torch.ops.densenet_fused.{name} is not registered"
    assert all("cpp" in op.kernels for op in OPS)
    x = torch.randn(2, 3, 4, 4)
    assert _backend.backend_for(x) == "cpp"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_channel_stats(shape, layout, dtype):
    n, c, spatial = shape
    buf, x, *_ = problem(n, c, spatial, layout, dtype)
    # a slice in the middle of the buffer, not only a prefix
    for view in (x, buf[:, 2 : c + 3]):
        mean, var = ops().channel_stats_cpp(view)
        ref_mean, ref_var = channel_stats_reference(view)
        assert_matches(mean, ref_mean, dtype, "mean", reduced_output=False)
        assert_matches(var, ref_var, dtype, "var", reduced_output=False)


def test_channel_stats_is_stable_and_deterministic():
    # a large common offset: a one-pass E[x^2] - E[x]^2 in float64 would lose ~8 digits here
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(4, 64, 65, 33, generator=g, dtype=torch.float64))
    for layout_x in (x, x.to(memory_format=torch.channels_last)):
        mean, var = ops().channel_stats_cpp(layout_x)
        ref_mean, ref_var = channel_stats_reference(layout_x)
        torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=0)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-14, atol=0)
    # the summation order depends on the shape only: bit-identical results for any thread count
    threads = torch.get_num_threads()
    for xf in (x.float()[:, 3:40], x.float().to(memory_format=torch.channels_last)[:, 3:40]):
        try:
            results = []
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                results.append(ops().channel_stats_cpp(xf))
        finally:
            torch.set_num_threads(threads)
        for other in results[1:]:
            assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[5:], ids=shape_id)
def test_bn_relu(shape, layout, dtype):
    n, c, spatial = shape
    buf, x, mean, invstd, gamma, beta = problem(n, c, spatial, layout, dtype)
    z = ops().bn_relu_cpp(x, mean, invstd, gamma, beta)
    assert_same_layout(z, x)
    assert_matches(z, bn_relu_reference(x, mean, invstd, gamma, beta), dtype, "z")
    grad_z = random_like_layout(x, c, dtype, seed=1)
    for training in (True, False):
        got = ops().bn_relu_backward_cpp(grad_z, x, mean, invstd, gamma, beta, training)
        ref = bn_relu_backward_reference(grad_z, x, mean, invstd, gamma, beta, training)
        assert_same_layout(got[0], x)
        for name, a, e in zip(("grad_x", "grad_gamma", "grad_beta"), got, ref):
            assert_matches(a, e, dtype, f"{name} (training={training})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bn_relu_conv1x1(shape, layout, dtype):
    n, c, spatial = shape
    buf, x, mean, invstd, gamma, beta = problem(n, c, spatial, layout, dtype)
    b = 11 if c < 100 else 67
    weight = random_weight(b, c, dtype, seed=2)
    y = ops().bn_relu_conv1x1_cpp(x, mean, invstd, gamma, beta, weight)
    assert_same_layout(y, x)
    assert_matches(y, bn_relu_conv1x1_reference(x, mean, invstd, gamma, beta, weight), dtype, "y")

    grad_y = random_like_layout(x, b, dtype, seed=3)
    for training in (True, False):
        # the whole block's gradient buffer, already holding the gradients of later layers
        grad_buffer = random_like_layout(buf, buf.size(1), dtype, seed=4)
        expected_buffer = grad_buffer.clone()
        before = grad_buffer.clone()
        ref = bn_relu_conv1x1_backward_reference(
            grad_y, x, mean, invstd, gamma, beta, weight, expected_buffer, training
        )
        got = ops().bn_relu_conv1x1_backward_cpp(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training)
        for name, a, e in zip(("grad_weight", "grad_gamma", "grad_beta"), got, ref):
            assert_matches(a, e, dtype, f"{name} (training={training})")
        # added (not written) into grad_buffer[:, :c]; the channels beyond c untouched, bit for bit
        assert_matches(grad_buffer[:, :c], expected_buffer[:, :c], dtype, f"grad_buffer[:, :C] (training={training})")
        assert torch.equal(grad_buffer[:, c:], before[:, c:]), "grad_buffer[:, C:] was modified"
        assert_same_layout(grad_buffer, buf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=shape_id)
def test_bn_relu_pool_conv1x1(shape, layout, dtype):
    n, c, spatial = shape
    buf, x, mean, invstd, gamma, beta = problem(n, c, spatial, layout, dtype)
    b = max(1, c // 2)
    weight = random_weight(b, c, dtype, seed=2)
    y = ops().bn_relu_pool_conv1x1_cpp(x, mean, invstd, gamma, beta, weight)
    ref_y = _pool_reference(bn_relu_pool_conv1x1_reference, x, mean, invstd, gamma, beta, weight)
    # x's layout (channels-last only if the output has more than one pixel: is_channels_last's rule)
    assert is_channels_last(y) == (is_channels_last(x) and y[0, 0].numel() > 1)
    assert_matches(y, ref_y, dtype, "y")
    grad_y = random_like_layout(x, b, dtype, seed=3, spatial=ref_y.shape[2:])
    for training in (True, False):
        got = ops().bn_relu_pool_conv1x1_backward_cpp(grad_y, x, mean, invstd, gamma, beta, weight, training)
        ref = _pool_reference(
            bn_relu_pool_conv1x1_backward_reference, grad_y, x, mean, invstd, gamma, beta, weight, training
        )
        assert_same_layout(got[0], x)
        for name, a, e in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), got, ref):
            assert_matches(a, e, dtype, f"{name} (training={training})")


def _pool_reference(fn, *args):
    """The reference; where torch lacks a 16-bit CPU kernel (avg_pool3d), run it in float32 and round
    the x-dtype results back (one rounding fewer than the reference would do: within the 16-bit bound)."""
    try:
        return fn(*args)
    except (NotImplementedError, RuntimeError) as error:
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16))
        if "not implemented" not in str(error):
            raise
        up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a for a in args]
        out = fn(*up)
        if isinstance(out, torch.Tensor):
            return out.to(dtype)
        return (out[0].to(dtype), out[1].to(dtype), *out[2:])


def test_unusual_strides_and_layouts():
    """A spatially strided x, gradients in the other layout, a grad_buffer in the other layout."""
    buf, x, mean, invstd, gamma, beta = problem(2, 9, (7, 12), "contiguous", torch.float64)
    xs = x[:, :, :, ::2]  # spatial dims not flattenable: the kernels copy
    torch.testing.assert_close(ops().channel_stats_cpp(xs), channel_stats_reference(xs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ops().bn_relu_cpp(xs, mean, invstd, gamma, beta), bn_relu_reference(xs, mean, invstd, gamma, beta)
    )
    weight = random_weight(4, 9, torch.float64, seed=1)
    grad_y = random_like_layout(x, 4, torch.float64, seed=2).to(memory_format=torch.channels_last)
    grad_buffer = random_like_layout(buf, buf.size(1), torch.float64, seed=3).to(memory_format=torch.channels_last)
    expected = grad_buffer.clone()
    ref = bn_relu_conv1x1_backward_reference(grad_y, x, mean, invstd, gamma, beta, weight, expected, True)
    got = ops().bn_relu_conv1x1_backward_cpp(grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_buffer, expected, rtol=1e-10, atol=1e-10)


def test_clear_errors():
    x = torch.randn(2, 4, 3, 3)
    v = torch.zeros(4)
    w = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        ops().channel_stats_cpp(x.int())
    with pytest.raises(RuntimeError, match="per-channel vector of 4"):
        ops().bn_relu_cpp(x, torch.zeros(3), v, v, v)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        ops().bn_relu_cpp(x, v.double(), v, v, v)
    with pytest.raises(RuntimeError, match=r"weight must be \[B, C\]"):
        ops().bn_relu_conv1x1_cpp(x, v, v, v, v, torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="weight dtype"):
        ops().bn_relu_conv1x1_cpp(x, v, v, v, v, w.double())
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        ops().bn_relu_conv1x1_backward_cpp(torch.randn(2, 5, 3, 4), x, v, v, v, v, w, torch.zeros(2, 6, 3, 3), True)
    with pytest.raises(RuntimeError, match="grad_buffer must be"):
        ops().bn_relu_conv1x1_backward_cpp(torch.randn(2, 5, 3, 3), x, v, v, v, v, w, torch.zeros(2, 3, 3, 3), True)
    with pytest.raises(RuntimeError, match="1, 2 or 3 spatial dims"):
        ops().bn_relu_pool_conv1x1_cpp(torch.randn(2, 4), v, v, v, v, w)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CPU tensors"):
            ops().bn_relu_cpp(x.cuda(), v, v, v, v)


# ---------------------------------------------------------------------------------------------------
# opcheck: schemas, fake (meta) implementations, mutation annotations.


OPCHECK_SPATIAL = [(5, 4), (17,), (3, 4, 6)]


def _opcheck_cases(layout, spatial):
    buf, x, mean, invstd, gamma, beta = problem(2, 6, spatial, layout, torch.float32)
    weight = random_weight(3, 6, torch.float32, seed=1)
    grad_y = random_like_layout(x, 3, torch.float32, seed=2)
    grad_z = random_like_layout(x, 6, torch.float32, seed=3)
    grad_pool = random_like_layout(x, 3, torch.float32, seed=4, spatial=[s // 2 for s in spatial])
    grad_buffer = random_like_layout(buf, buf.size(1), torch.float32, seed=5)
    bn = (mean, invstd, gamma, beta)
    return {
        "channel_stats": (x,),
        "bn_relu": (x, *bn),
        "bn_relu_backward": (grad_z, x, *bn, True),
        "bn_relu_conv1x1": (x, *bn, weight),
        "bn_relu_conv1x1_backward": (grad_y, x, *bn, weight, grad_buffer, True),
        "bn_relu_pool_conv1x1": (x, *bn, weight),
        "bn_relu_pool_conv1x1_backward": (grad_pool, x, *bn, weight, True),
    }


@pytest.mark.parametrize("spatial", OPCHECK_SPATIAL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_cpp_ops(layout, spatial):
    cases = _opcheck_cases(layout, spatial)
    assert set(cases) == {op.name for op in OPS}, "every registered op needs an opcheck case"
    for name, args in cases.items():
        torch.library.opcheck(getattr(ops(), f"{name}_cpp"), args)


@pytest.mark.parametrize("spatial", OPCHECK_SPATIAL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_public_ops_on_cpp_backend(layout, spatial, monkeypatch):
    monkeypatch.setattr(config, "backend", "cpp")
    cases = _opcheck_cases(layout, spatial)
    for op in OPS:
        # the public custom op takes the kernel's arguments, then the ones only autograd reads (``training``)
        extra = op.custom_op._opoverload._schema.arguments[len(cases[op.name]) :]
        assert all(a.name == "training" for a in extra), extra
        torch.library.opcheck(getattr(ops(), op.name), (*cases[op.name], *[True] * len(extra)))


# ---------------------------------------------------------------------------------------------------
# The whole model through the C++ path, against torchvision.


def _train_steps(model, x, target, steps):
    results = []
    for _ in range(steps):
        inp = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        out = model(inp)
        torch.nn.functional.cross_entropy(out, target).backward()
        results.append((out.detach(), inp.grad, [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return results


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_matches_torchvision_float64(memory_efficient, layout, monkeypatch):
    monkeypatch.setattr(config, "backend", "cpp")
    arch = dict(growth_rate=6, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5)
    torch.manual_seed(0)
    ours = densenet_fused.DenseNet(**arch, memory_efficient=memory_efficient).double()
    theirs = torchvision.models.DenseNet(**arch).double()
    theirs.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, theirs = ours.to(memory_format=fmt), theirs.to(memory_format=fmt)
    x = torch.randn(3, 3, 35, 39, dtype=torch.float64).to(memory_format=fmt)
    target = torch.tensor([0, 3, 4])
    for step, (a, e) in enumerate(zip(_train_steps(ours, x, target, 3), _train_steps(theirs, x, target, 3))):
        torch.testing.assert_close(a[0], e[0], rtol=1e-9, atol=1e-9, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(a[1], e[1], rtol=1e-9, atol=1e-9, msg=lambda m: f"step {step} input grad: {m}")
        for (name, _), ga, ge in zip(ours.named_parameters(), a[2], e[2]):
            torch.testing.assert_close(ga, ge, rtol=1e-9, atol=1e-9, msg=lambda m: f"step {step} {name}.grad: {m}")
    for (name, a), e in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)
