"""The kernel matrix: every fused primitive's kernels against its pure-PyTorch reference (the oracle).

One test per primitive (``PRIMITIVES``: its forward and backward ops together) over

* backend: cpp (the C++ CPU kernels) and triton (on a GPU, or interpreted on CPU tensors);
* layout: contiguous and channels-last (channels innermost: channels_last in 2-D, channels_last_3d in 3-D);
* spatial rank 1, 2 and 3;
* shape: ``prefix`` (x a channel prefix of a larger buffer, odd sizes), ``spatial1`` (one pixel, two per dim
  for the pooling primitive, which pools it to one), ``multi_tile`` (channels, outputs and pixels over several
  tiles and reduction splits of every Triton kernel), and for C++ ``many_tiles`` (several of its ~1 MiB pixel
  tiles in one thread's chunk: run on one thread, so on any machine);
* statistics: per channel [C] (batch norm) and per sample [N, C] (instance norm, more than one pixel);
* dtype: float32 always, and one of float64, float16, bfloat16 in turn (bfloat16 Triton only on a GPU, where
  those cases are ``cuda``-marked for ``benchmarks/gpu_check.py``: the interpreter's bf16 arithmetic is broken).

Inputs come as the block hands them to the kernels: gradients in x's layout, the shared gradient buffer
already holding later layers' gradients.  Then the block's hot path itself (``test_block_matches_its_modules``:
the kernels as the block launches them, per backend, layout, rank and norm) against the block's own modules,
and ``opcheck`` of every public op under every backend.  ``conftest.py`` guards every case (the references raise, a spy
checks that a kernel of the backend ran, fresh memory is NaN).  The reference runs in the same dtype on the
same inputs, so both round at the same points and the tolerance bounds the rest (``TOLERANCE``).
"""

import copy
import math

import pytest
import torch
from helpers import (
    CUDA,
    OPS,
    acc,
    assert_close_tensors,
    in_layout,
    kernel_problem,
    layout_of,
    random_in_layout,
    random_weight,
    randomize_affine,
)

import densenet_fused
from densenet_fused.ops import PRIMITIVES
from densenet_fused.ops import _triton as tr

TRITON = tr.TRITON_AVAILABLE and (CUDA or tr.interpreting())
BACKEND_MARKS = {"cpp": (), "triton": (pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)"),)}
BACKENDS = [pytest.param(name, marks=marks) for name, marks in BACKEND_MARKS.items()]
LAYOUTS = ["contiguous", "channels_last"]
pytestmark = pytest.mark.usefixtures("ieee_fp32")
# (N, C, outputs B, spatial per rank) for each shape kind
SHAPES = {
    "prefix": (2, 7, 11, {1: (17,), 2: (5, 3), 3: (3, 4, 5)}),
    "spatial1": (3, 5, 3, {1: (1,), 2: (1, 1), 3: (1, 1, 1)}),
    "multi_tile": (3, 70, 40, {1: (67,), 2: (9, 11), 3: (3, 5, 7)}),
    "many_tiles": (3, 256, 32, {1: (4095,), 2: (63, 65), 3: (15, 21, 13)}),
}
KERNEL_SHAPES = {"cpp": list(SHAPES), "triton": [shape for shape in SHAPES if shape != "many_tiles"]}
# Tolerances, relative and absolute x the largest magnitude of the expected value:
# * float64: 1e-10: both accumulate in float64, only summation order differs.
# * float32: 2e-5: summation order and BN folded into x * scale + shift; float32 sums of a few thousand terms
#   drift by ~1e-6.  (Triton's float32 dots are IEEE here: the ``ieee_fp32`` fixture turns TF32 off.)
# * C++ 16-bit outputs: one flipped rounding is 2^-11..2^-10 (float16), 2^-8..2^-7 (bfloat16) relative and the
#   in-place accumulation rounds twice: 2^-9 and 2^-6.  Its float32 outputs (statistics, grad_gamma,
#   grad_beta) are computed from the same rounded values as the reference's: 2e-5.
# * Triton float16 / bfloat16 outputs: the weight-gradient GEMM takes the recomputed activation rounded to 16 bits
#   (tensor cores), where the reference keeps it in float32: a few 16-bit ulps, 4e-3 (float16, eps 4.9e-4) and
#   3e-2 (bfloat16, eps 3.9e-3).  Float32 outputs of float16 inputs (statistics, grad_gamma, grad_beta) are
#   float32 reductions of the same rounded values as the reference's: 2e-5.  bfloat16 runs only on a GPU, where
#   that has not been measured yet: 3e-2 for all its outputs.
TOLERANCE = {
    ("cpp", torch.float64): (1e-10, 1e-10),
    ("cpp", torch.float32): (2e-5, 2e-5),
    ("cpp", torch.float16): (2**-9, 2e-5),
    ("cpp", torch.bfloat16): (2**-6, 2e-5),
    ("triton", torch.float64): (1e-10, 1e-10),
    ("triton", torch.float32): (2e-5, 2e-5),
    ("triton", torch.float16): (4e-3, 2e-5),
    ("triton", torch.bfloat16): (3e-2, 3e-2),
}  # (16-bit outputs, float32 outputs)
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _cases(primitive):
    """The matrix's parameters for one primitive: float32 everywhere, the extra dtype in turn."""
    cases = []
    for i, (name, marks) in enumerate(BACKEND_MARKS.items()):
        extras = [torch.float64, torch.float16] + ([torch.bfloat16] if name == "cpp" or CUDA else [])
        for j, layout in enumerate(LAYOUTS):
            for rank in (1, 2, 3):
                for k, shape in enumerate(KERNEL_SHAPES[name]):
                    for per_sample in _statistics(primitive, shape):
                        extra = extras[(i + j + rank + k + per_sample) % len(extras)]
                        for dtype in (torch.float32, extra):
                            stats = "sample" if per_sample else "channel"
                            ident = f"{name}-{layout}-{rank}d-{shape}-{stats}-{DTYPE_IDS[dtype]}"
                            values = (name, layout, rank, shape, per_sample, dtype)
                            gpu_only = (pytest.mark.cuda,) if name == "triton" and dtype == torch.bfloat16 else ()
                            cases.append(pytest.param(*values, marks=(*marks, *gpu_only), id=ident))
    return cases


def _statistics(primitive, shape):
    """(per_sample, ...): channel_stats has per-channel statistics only; per-sample statistics of one pixel are
    degenerate (var 0: instance norm refuses them); per sample, many_tiles' samples are tiled apart."""
    if primitive == "channel_stats" or shape in ("spatial1", "many_tiles"):
        return (False,)
    return (False, True)


MATRIX = "backend,layout,rank,shape,per_sample,dtype"


@pytest.fixture(autouse=True)
def one_thread_for_many_tiles(request):
    """The C++ kernels give each thread an equal share of the tiles: on one thread every tile of a
    ``many_tiles`` case lands in one chunk, whose partial sums then add up across tiles."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("shape") != "many_tiles":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert set(OPS) == set(cases), "every op needs an opcheck case"
    for op in OPS.values():
        args = cases[op.name]
        extra = op.custom_op._opoverload._schema.arguments[len(args) :]
        assert all(a.name == "training" for a in extra), extra
        torch.library.opcheck(op.custom_op, (*args, *[True] * len(extra)))


# ---------------------------------------------------------------------------------------------------
# The block's hot path: the same kernels launched by the block itself (``backends``: the Triton path launches
# them directly, statistics in the copy and GEMM epilogues; instance norm takes the op tables), with the
# backward the block really runs (every gradient in the buffer's layout), against the block's own modules.


def modules_truth(block, x):
    """The block as torchvision computes it: each layer's modules on the concatenation of all earlier features."""
    features = [x]
    for layer in block.values():
        bottleneck = layer.conv1(layer.relu1(layer.norm1(torch.cat(features, 1))))
        features.append(layer.conv2(layer.relu2(layer.norm2(bottleneck))))
    return torch.cat(features, 1)


@pytest.mark.parametrize("act", ["relu", "prelu"])
@pytest.mark.parametrize("norm", ["batch", ("instance", {"affine": True})], ids=["batch", "instance"])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_matches_its_modules(backend, layout, rank, norm, act):
    """float64, training (forward, input and parameter gradients, running statistics) then eval; a PReLU
    block (``ops.prelu``: two calls of each ReLU kernel) with slopes of both signs."""
    torch.manual_seed(0)
    block = densenet_fused.DenseBlock(3, 5, 2, 3, 0.0, spatial_dims=rank, norm=norm, act=act)
    ours = randomize_affine(block.double())
    theirs = copy.deepcopy(ours)
    x = in_layout(torch.randn(2, 5, *[(9, 7, 5)[i] for i in range(rank)], dtype=torch.float64), layout)
    grad = in_layout(torch.randn(2, 14, *x.shape[2:], dtype=torch.float64), layout)
    results = []
    for run, module in ((ours, ours), (lambda inp: modules_truth(theirs, inp), theirs)):
        inp = x.clone().requires_grad_()
        out = run(inp)
        out.backward(grad)
        results.append((out, inp.grad, [p.grad for p in module.parameters()], list(module.buffers())))
    (out, gx, *ours_rest), (out_t, gx_t, *theirs_rest) = results
    assert layout_of(out) == layout_of(x) and layout_of(gx) == layout_of(x)
    torch.testing.assert_close(out, out_t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx, gx_t, rtol=1e-9, atol=1e-9)
    for what, actual, expected in zip(("parameter grads", "buffers"), ours_rest, theirs_rest):
        assert_close_tensors(actual, expected, 1e-9, 1e-9, what)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), modules_truth(theirs, x), rtol=1e-9, atol=1e-9)
