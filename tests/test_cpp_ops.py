"""What the C++ CPU kernels add beyond the kernel matrix (tests/test_kernels.py): the extension is built and
selected, statistics are stable and bit-identical for any thread count, unusual strides and layouts work,
errors are clear, and the whole model on the C++ path matches torchvision in float64.

The test suite runs after the build, so a missing extension fails these tests (it does not skip them).
"""

import pytest
import torch
import torchvision
from helpers import OPS, TINY, assert_lockstep, kernel_problem, random_in_layout, random_weight

import densenet_fused
from densenet_fused.ops import _backend


def ops():
    return torch.ops.densenet_fused


def test_extension_built_and_selected():
    assert _backend.CPP_AVAILABLE, f"densenet_fused._C is not built: {_backend.BUILD_COMMAND}"
    for name in OPS:  # every op of every primitive has a C++ kernel, ``<op>_cpp``
        assert hasattr(ops(), f"{name}_cpp"), f"torch.ops.densenet_fused.{name}_cpp is not registered"
    assert all("cpp" in op.kernels for op in OPS.values())
    x = torch.randn(2, 3, 4, 4)
    assert _backend.backend_for(x) == "cpp"


def test_channel_stats_is_stable_and_deterministic():
    # a large common offset: a one-pass E[x^2] - E[x]^2 in float64 would lose ~8 digits here
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(4, 64, 65, 33, generator=g, dtype=torch.float64))
    for layout_x in (x, x.to(memory_format=torch.channels_last)):
        mean, var = ops().channel_stats_cpp(layout_x)
        ref_mean, ref_var = OPS["channel_stats"].reference(layout_x)
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


def test_unusual_strides_and_layouts():
    """A spatially strided x, gradients in the other layout, a grad_buffer in the other layout."""
    p = kernel_problem(2, 9, (7, 12), "contiguous", torch.float64)
    buf, x, (mean, invstd, gamma, beta) = p.buf, p.x, p.norm
    xs = x[:, :, :, ::2]  # spatial dims not flattenable: the kernels copy
    torch.testing.assert_close(ops().channel_stats_cpp(xs), OPS["channel_stats"].reference(xs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ops().bn_relu_cpp(xs, mean, invstd, gamma, beta), OPS["bn_relu"].reference(xs, mean, invstd, gamma, beta)
    )
    weight = random_weight(4, 9, torch.float64, seed=1)
    grad_y = random_in_layout(x, 4, seed=2).to(memory_format=torch.channels_last)
    grad_buffer = random_in_layout(buf, buf.size(1), seed=3).to(memory_format=torch.channels_last)
    expected = grad_buffer.clone()
    ref = OPS["bn_relu_conv1x1_backward"].reference(grad_y, x, mean, invstd, gamma, beta, weight, expected, True)
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
# The whole model through the C++ path, against torchvision.


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["cpp"])
def test_model_matches_torchvision_float64(backend, memory_efficient, layout):
    """Three training steps in lockstep (outputs, gradients, parameters and running statistics), then eval."""
    torch.manual_seed(0)
    ours = densenet_fused.DenseNet(**TINY, memory_efficient=memory_efficient).double()
    theirs = torchvision.models.DenseNet(**TINY).double()
    theirs.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, theirs = ours.to(memory_format=fmt), theirs.to(memory_format=fmt)
    x = torch.randn(3, 3, 35, 39, dtype=torch.float64).to(memory_format=fmt)
    assert_lockstep(ours, theirs, x, torch.tensor([0, 3, 4]), steps=3, rtol=1e-9, atol=1e-9)
