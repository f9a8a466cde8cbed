"""The kernel matrix: every fused primitive's kernels against its pure-PyTorch reference (the oracle).

One test per primitive (``PRIMITIVES``: its forward and backward ops together) over

* backend: cpp (the C++ CPU kernels) and triton (on a GPU, or interpreted on CPU tensors);
* layout: contiguous and channels-last (channels innermost: channels_last in 2-D, channels_last_3d in 3-D);
* spatial rank 1, 2 and 3;
* shape: ``prefix`` (x a channel prefix of a larger buffer, odd sizes), ``spatial1`` (one pixel, two per dim
  for the pooling primitive, which pools it to one), ``multi_tile`` (channels, outputs and pixels over several
  tiles and reduction splits of every kernel);
* statistics: per channel [C] (batch norm) and per sample [N, C] (instance norm, more than one pixel);
* dtype: float32 always, and one of float64, float16, bfloat16 in turn (bfloat16 Triton only on a GPU: the
  interpreter's bf16 arithmetic is broken).

Inputs come as the block hands them to the kernels: gradients in x's layout, the shared gradient buffer
already holding later layers' gradients.  ``conftest.py`` guards every case (the references raise, a spy
checks that a kernel of the backend ran, fresh memory is NaN).  The reference runs in the same dtype on the
same inputs, so both round at the same points and the tolerance bounds the rest (``TOLERANCE``).
"""

import math

import pytest
import torch
from helpers import CUDA, acc, kernel_problem, layout_of, random_in_layout, random_weight

from densenet_fused.ops import PRIMITIVES
from densenet_fused.ops import _triton as tr

TRITON = tr.TRITON_AVAILABLE and (CUDA or tr.interpreting())
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)"))]
LAYOUTS = ["contiguous", "channels_last"]
# (N, C, outputs B, spatial per rank) for each shape kind
SHAPES = {
    "prefix": (2, 7, 11, {1: (17,), 2: (5, 3), 3: (3, 4, 5)}),
    "spatial1": (3, 5, 3, {1: (1,), 2: (1, 1), 3: (1, 1, 1)}),
    "multi_tile": (3, 70, 40, {1: (67,), 2: (9, 11), 3: (3, 5, 7)}),
}
# Tolerances, relative and absolute x the largest magnitude of the expected value:
# * float64: 1e-10: both accumulate in float64, only summation order differs.
# * float32: 2e-5: summation order and BN folded into x * scale + shift; float32 sums of a few thousand terms
#   drift by ~1e-6.  (Triton's float32 dots are IEEE here: the ``ieee_fp32`` fixture turns TF32 off.)
# * C++ 16-bit outputs: one flipped rounding is 2^-11..2^-10 (float16), 2^-8..2^-7 (bfloat16) relative and the
#   in-place accumulation rounds twice: 2^-9 and 2^-6.  Its float32 outputs (statistics, grad_gamma,
#   grad_beta) are computed from the same rounded values as the reference's: 2e-5.
# * Triton float16 / bfloat16: the weight-gradient GEMM takes the recomputed activation rounded to 16 bits
#   (tensor cores), where the reference keeps it in float32, and every output depends on it through
#   grad_gamma/grad_beta: a few 16-bit ulps, 4e-3 (float16, eps 4.9e-4) and 3e-2 (bfloat16, eps 3.9e-3).
TOLERANCE = {
    ("cpp", torch.float64): (1e-10, 1e-10),
    ("cpp", torch.float32): (2e-5, 2e-5),
    ("cpp", torch.float16): (2**-9, 2e-5),
    ("cpp", torch.bfloat16): (2**-6, 2e-5),
    ("triton", torch.float64): (1e-10, 1e-10),
    ("triton", torch.float32): (2e-5, 2e-5),
    ("triton", torch.float16): (4e-3, 4e-3),
    ("triton", torch.bfloat16): (3e-2, 3e-2),
}  # (16-bit outputs, float32 outputs)
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _cases(primitive):
    """The matrix's parameters for one primitive: float32 everywhere, the extra dtype in turn."""
    cases = []
    for i, backend in enumerate(BACKENDS):
        name = backend.values[0] if hasattr(backend, "values") else backend
        marks = backend.marks if hasattr(backend, "marks") else ()
        extras = [torch.float64, torch.float16] + ([torch.bfloat16] if name == "cpp" or CUDA else [])
        for j, layout in enumerate(LAYOUTS):
            for rank in (1, 2, 3):
                for k, shape in enumerate(SHAPES):
                    # per-sample statistics of one pixel are degenerate (var 0): instance norm refuses them
                    per_samples = (False,) if primitive == "channel_stats" or shape == "spatial1" else (False, True)
                    for per_sample in per_samples:
                        extra = extras[(i + j + rank + k + per_sample) % len(extras)]
                        for dtype in (torch.float32, extra):
                            stats = "sample" if per_sample else "channel"
                            ident = f"{name}-{layout}-{rank}d-{shape}-{stats}-{DTYPE_IDS[dtype]}"
                            cases.append(pytest.param(name, layout, rank, shape, per_sample, dtype, marks=marks, id=ident))
    return cases


MATRIX = "backend,layout,rank,shape,per_sample,dtype"


@pytest.fixture(autouse=True)
def ieee_fp32():
    """On a GPU, keep float32 matmuls and 1x1 convolutions (ours and the references') off TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_matches(actual, expected, backend, dtype, what):
    """Equal to the reference within ``TOLERANCE``, with the reference's dtype and shape."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    reduced, full = TOLERANCE[backend, dtype]
    tol = reduced if actual.dtype in (torch.float16, torch.bfloat16) else full
    atol = tol * max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_layout_follows(out, x, what):
    """Outputs with more than one pixel are laid out as x is."""
    if math.prod(out.shape[2:]) > 1:
        assert layout_of(out) == layout_of(x), f"{what} is {layout_of(out)}, x is {layout_of(x)}"


def reference(op, *args):
    """The reference in the kernels' dtype; where torch has no 16-bit CPU kernel (avg_pool3d) it runs in
    float32 and the 16-bit results are rounded back (one rounding fewer than the reference: within bound)."""
    try:
        return op.reference(*args)
    except (NotImplementedError, RuntimeError) as error:
        if "not implemented" not in str(error):
            raise
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16))
    out = op.reference(*[a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a for a in args])
    return tuple(t.to(dtype) if t.dim() >= 2 else t for t in out) if isinstance(out, tuple) else out.to(dtype)


def problem(layout, rank, shape, per_sample, dtype, pool=False):
    n, c, b, spatial = SHAPES[shape]
    spatial = tuple(2 if pool and shape == "spatial1" else s for s in spatial[rank])
    p = kernel_problem(n, c, spatial, layout, dtype, per_sample=per_sample)
    if layout == "channels_last" and rank > 1 and shape != "spatial1":
        memory_format = torch.channels_last if rank == 2 else torch.channels_last_3d
        assert p.buf.is_contiguous(memory_format=memory_format)
    return p, random_weight(b, c, dtype, seed=2)


def ops(primitive):
    """The primitive's forward op, then its backward op (if any)."""
    table = PRIMITIVES[primitive].ops
    return [table[primitive], *([table[f"{primitive}_backward"]] if f"{primitive}_backward" in table else [])]


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(MATRIX, _cases("channel_stats"))
def test_channel_stats(backend, layout, rank, shape, per_sample, dtype):
    """Mean and biased variance of x and of a slice in the middle of the buffer, in the accumulation dtype."""
    (op,) = ops("channel_stats")
    p, _ = problem(layout, rank, shape, per_sample, dtype)
    offset = p.buf + 3.0  # a common offset: a one-pass E[x^2] - E[x]^2 would lose digits
    for view in (p.x, p.buf[:, 2:-1], offset[:, : p.x.size(1)]):
        mean, var = op.runner(backend)(view)
        ref_mean, ref_var = reference(op, view)
        assert mean.dtype == var.dtype == acc(dtype)
        assert_matches(mean, ref_mean, backend, dtype, "mean")
        assert_matches(var, ref_var, backend, dtype, "var")


@pytest.mark.parametrize(MATRIX, _cases("bn_relu"))
def test_bn_relu(backend, layout, rank, shape, per_sample, dtype):
    forward, backward = ops("bn_relu")
    p, _ = problem(layout, rank, shape, per_sample, dtype)
    z = forward.runner(backend)(p.x, *p.norm)
    assert_matches(z, reference(forward, p.x, *p.norm), backend, dtype, "z")
    assert_layout_follows(z, p.x, "z")
    grad_z = random_in_layout(p.x, p.x.size(1), seed=1)
    for training in (True, False):
        got = backward.runner(backend)(grad_z, p.x, *p.norm, training)
        want = reference(backward, grad_z, p.x, *p.norm, training)
        for name, a, e in zip(("grad_x", "grad_gamma", "grad_beta"), got, want):
            assert_matches(a, e, backend, dtype, f"{name} (training={training})")
        assert_layout_follows(got[0], p.x, "grad_x")


@pytest.mark.parametrize(MATRIX, _cases("bn_relu_conv1x1"))
def test_bn_relu_conv1x1(backend, layout, rank, shape, per_sample, dtype):
    """Forward; backward adds grad_x into the shared gradient buffer's first C channels in place (the buffer
    already holds later layers' gradients) and leaves the others bit for bit."""
    forward, backward = ops("bn_relu_conv1x1")
    p, weight = problem(layout, rank, shape, per_sample, dtype)
    y = forward.runner(backend)(p.x, *p.norm, weight)
    assert_matches(y, reference(forward, p.x, *p.norm, weight), backend, dtype, "y")
    assert_layout_follows(y, p.x, "y")
    grad_y = random_in_layout(p.x, weight.size(0), seed=3)
    c = p.x.size(1)
    for training in (True, False):
        grad_buffer = random_in_layout(p.buf, p.buf.size(1), seed=4)
        expected_buffer, before, data_ptr = grad_buffer.clone(), grad_buffer.clone(), grad_buffer.data_ptr()
        got = backward.runner(backend)(grad_y, p.x, *p.norm, weight, grad_buffer, training)
        want = reference(backward, grad_y, p.x, *p.norm, weight, expected_buffer, training)
        for name, a, e in zip(("grad_weight", "grad_gamma", "grad_beta"), got, want):
            assert_matches(a, e, backend, dtype, f"{name} (training={training})")
        assert grad_buffer.data_ptr() == data_ptr
        assert_matches(grad_buffer[:, :c], expected_buffer[:, :c], backend, dtype, f"grad_buffer[:, :C] ({training=})")
        assert torch.equal(grad_buffer[:, c:], before[:, c:]), "grad_buffer[:, C:] was modified"


@pytest.mark.parametrize(MATRIX, _cases("bn_relu_pool_conv1x1"))
def test_bn_relu_pool_conv1x1(backend, layout, rank, shape, per_sample, dtype):
    """The transition: BN, ReLU, 2^d average pooling (floor: odd sizes cut the last pixel) and the 1x1 conv."""
    forward, backward = ops("bn_relu_pool_conv1x1")
    p, weight = problem(layout, rank, shape, per_sample, dtype, pool=True)
    y = forward.runner(backend)(p.x, *p.norm, weight)
    want_y = reference(forward, p.x, *p.norm, weight)
    assert_matches(y, want_y, backend, dtype, "y")
    assert_layout_follows(y, p.x, "y")
    grad_y = random_in_layout(p.x, weight.size(0), seed=3, spatial=want_y.shape[2:])
    for training in (True, False):
        got = backward.runner(backend)(grad_y, p.x, *p.norm, weight, training)
        want = reference(backward, grad_y, p.x, *p.norm, weight, training)
        for name, a, e in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), got, want):
            assert_matches(a, e, backend, dtype, f"{name} (training={training})")
        assert_layout_follows(got[0], p.x, "grad_x")


# ---------------------------------------------------------------------------------------------------
# opcheck: schemas, fakes (their strides included), mutation annotations, autograd registration, under each
# backend (``reference`` too: the fakes must agree with every implementation).


def _opcheck_args(layout, rank):
    p, weight = problem(layout, rank, "prefix", False, torch.float32, pool=True)
    x = p.x.detach().requires_grad_()
    grad_pool = random_in_layout(x, weight.size(0), seed=4, spatial=[s // 2 for s in x.shape[2:]])
    return {
        "channel_stats": (x,),
        "bn_relu": (x, *p.norm),
        "bn_relu_backward": (random_in_layout(x, x.size(1), seed=3), p.x, *p.norm),
        "bn_relu_conv1x1": (x, *p.norm, weight),
        "bn_relu_conv1x1_backward": (random_in_layout(x, weight.size(0), seed=2), p.x, *p.norm, weight,
                                     random_in_layout(p.buf, p.buf.size(1), seed=5)),  # fmt: skip
        "bn_relu_pool_conv1x1": (x, *p.norm, weight),
        "bn_relu_pool_conv1x1_backward": (grad_pool, p.x, *p.norm, weight),
    }


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_opcheck_public_ops(backend, layout, rank):
    """Every public op, with its arguments up to ``training`` (True: a batch-statistics case for autograd)."""
    cases = _opcheck_args(layout, rank)
    all_ops = [op for primitive in PRIMITIVES.values() for op in primitive.ops.values()]
    assert {op.name for op in all_ops} == set(cases), "every op needs an opcheck case"
    for op in all_ops:
        args = cases[op.name]
        extra = op.custom_op._opoverload._schema.arguments[len(args) :]
        assert all(a.name == "training" for a in extra), extra
        torch.library.opcheck(op.custom_op, (*args, *[True] * len(extra)))
