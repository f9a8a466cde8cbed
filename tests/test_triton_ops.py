"""The Triton kernels of every fused primitive against the pure-PyTorch references, and a tiny block and
model run through the Triton path against torchvision.

On a CUDA machine everything runs on the GPU; without one, on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).  bfloat16 only runs on a GPU
(the interpreter's bf16 arithmetic is broken).  Shapes are small and odd on purpose: channel counts
that are not multiples of the blocks, a spatial size of 1, odd sizes the transition's pooling cuts,
inputs that are channel prefixes of a larger NCHW or channels-last buffer, and enough pixels to split
the reductions across several programs.

Tolerances: float32 dots are IEEE (TF32 off), so fp32 differs from the reference only by summation
order and by folding BN into x * scale + shift: 2e-5 relative to the largest value.  float16 rounds
the output (and, in the weight-gradient GEMM, the recomputed activation) to fp16, eps 2^-11 ~ 4.9e-4,
where the reference keeps fp32 activations in backward: 4e-3 relative to the largest value, i.e. a
few fp16 ulps.  bfloat16 (eps 2^-8 ~ 3.9e-3): 3e-2.  float64 accumulates in float64: 1e-10.

Every kernel test runs with ``no_fallback`` (conftest.py), so a launcher that quietly ran the reference would fail.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from densenet_fused.ops._backend import config
import densenet_fused
from densenet_fused.ops import PRIMITIVES
from densenet_fused.ops import _triton as tr
from densenet_fused.ops.layout import acc_dtype

bn_relu_mod = importlib.import_module("densenet_fused.ops.bn_relu")
conv_mod = importlib.import_module("densenet_fused.ops.bn_relu_conv1x1")
conv_kernels = importlib.import_module("densenet_fused.ops._conv1x1_triton")
pool_mod = importlib.import_module("densenet_fused.ops.bn_relu_pool_conv1x1")
stats_mod = importlib.import_module("densenet_fused.ops.channel_stats")

OPS = [op for primitive in PRIMITIVES.values() for op in primitive.ops.values()]
# The references by op name, kept before any test patches them (see ``no_fallback``).
REF = {op.name: op.reference for op in OPS}

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

pytestmark = pytest.mark.skipif(
    not tr.TRITON_AVAILABLE or not (CUDA or tr.interpreting()),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 (set by conftest.py before triton is imported)",
)

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(
        torch.bfloat16,
        marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="bf16 is broken in Triton's interpreter")],
        id="bf16",
    ),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LAYOUTS = ["nchw", "channels_last"]


@pytest.fixture(autouse=True)
def ieee_fp32():
    """On a GPU, keep torch's own fp32 matmuls and convolutions (references, torchvision) off TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_close(actual, expected, dtype, what=""):
    """Equal up to ``TOLERANCE[dtype]`` relative to the largest magnitude of ``expected``."""
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def feature_buffer(shape, channels, layout, dtype, seed=0, offset=0.0):
    """(buffer, x): a random [N, C_total, *spatial] buffer and its channel prefix x = buffer[:, :channels]."""
    generator = torch.Generator().manual_seed(seed)
    buf = (torch.randn(shape, generator=generator) + offset).to(dtype)
    if layout == "channels_last":
        buf = buf.to(memory_format=torch.channels_last if buf.dim() == 4 else torch.channels_last_3d)
    buf = buf.to(DEVICE)
    return buf, buf[:, :channels]


def bn_params(channels, seed=1, positive_beta=False, dtype=torch.float32):
    """(mean, invstd, gamma, beta) in the accumulation dtype of ``dtype``, with negative gammas."""
    generator = torch.Generator().manual_seed(seed)
    mean = 0.2 * torch.randn(channels, generator=generator)
    invstd = 0.5 + torch.rand(channels, generator=generator)
    gamma = torch.randn(channels, generator=generator)
    beta = torch.rand(channels, generator=generator) + 0.25 if positive_beta else torch.randn(channels, generator=generator)
    return [t.to(DEVICE, acc_dtype(dtype)) for t in (mean, invstd, gamma, beta)]


def random_like(t, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=generator).to(dtype=t.dtype, device=t.device)


def expect_layout(t, layout):
    if layout == "channels_last" and t.dim() == 4 and t.shape[2] * t.shape[3] > 1:
        assert t.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------- channel_stats


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape,channels",
    [((2, 45, 9, 11), 37), ((3, 5, 1, 1), 5), ((2, 70, 3, 4), 70)],
    ids=["prefix-odd-split", "spatial1", "c70"],
)
def test_channel_stats(dtype, layout, shape, channels):
    _, x = feature_buffer(shape, channels, layout, dtype, offset=3.0)  # an offset tests the shifted merge
    mean, var = stats_mod.channel_stats_triton(x)
    ref_mean, ref_var = REF["channel_stats"](x)
    assert mean.dtype == var.dtype == acc_dtype(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean, ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(var, ref_var, rtol=tol, atol=tol / 10)


@pytest.mark.usefixtures("no_fallback")
def test_channel_stats_new_channels_slice():
    """The block computes stats of each layer's newly written channels buf[:, c:c+k] only."""
    buf, _ = feature_buffer((2, 20, 5, 6), 20, "channels_last", torch.float32)
    new = buf[:, 13:17]
    for got, want in zip(stats_mod.channel_stats_triton(new), REF["channel_stats"](new)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- bn_relu


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,channels", [((2, 45, 9, 11), 37), ((3, 5, 1, 1), 5)], ids=["prefix-odd", "spatial1"])
def test_bn_relu(dtype, layout, shape, channels):
    _, x = feature_buffer(shape, channels, layout, dtype)
    mean, invstd, gamma, beta = bn_params(channels, dtype=dtype)
    out = bn_relu_mod.bn_relu_triton(x, mean, invstd, gamma, beta)
    assert_close(out, REF["bn_relu"](x, mean, invstd, gamma, beta), dtype, "bn_relu")
    expect_layout(out, layout)
    grad_z = random_like(out)
    for training in (True, False):
        got = bn_relu_mod.bn_relu_backward_triton(grad_z, x, mean, invstd, gamma, beta, training)
        want = REF["bn_relu_backward"](grad_z, x, mean, invstd, gamma, beta, training)
        for name, g, w in zip(("grad_x", "grad_gamma", "grad_beta"), got, want):
            assert_close(g, w, dtype, f"{name} training={training}")
        expect_layout(got[0], layout)


# ----------------------------------------------------------------------------------- bn_relu_conv1x1

CONV_SHAPES = [((2, 45, 9, 11), 37, 20), ((3, 7, 1, 1), 5, 3), ((2, 40, 5, 7), 40, 8)]
CONV_IDS = ["prefix-odd-split", "spatial1", "c40"]


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,channels,out_channels", CONV_SHAPES, ids=CONV_IDS)
def test_bn_relu_conv1x1_forward(dtype, layout, shape, channels, out_channels):
    _, x = feature_buffer(shape, channels, layout, dtype)
    # Positive betas: a K tail that were not re-masked after the ReLU would add relu(shift) != 0.
    mean, invstd, gamma, beta = bn_params(channels, positive_beta=True, dtype=dtype)
    weight = random_like(torch.empty(out_channels, channels, dtype=dtype, device=DEVICE), seed=3)
    out = conv_mod.bn_relu_conv1x1_triton(x, mean, invstd, gamma, beta, weight)
    assert_close(out, REF["bn_relu_conv1x1"](x, mean, invstd, gamma, beta, weight), dtype, "forward")
    expect_layout(out, layout)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channels,out_channels", CONV_SHAPES, ids=CONV_IDS)
def test_bn_relu_conv1x1_backward_accumulates_in_place(dtype, layout, training, shape, channels, out_channels):
    buf, x = feature_buffer(shape, channels, layout, dtype)
    mean, invstd, gamma, beta = bn_params(channels, dtype=dtype)
    weight = random_like(torch.empty(out_channels, channels, dtype=dtype, device=DEVICE), seed=3)
    grad_y = random_like(REF["bn_relu_conv1x1"](x, mean, invstd, gamma, beta, weight), seed=4)
    grad_buffer = random_like(buf, seed=5)  # earlier layers' contributions, already there
    expected_buffer = grad_buffer.clone()
    untouched = grad_buffer[:, channels:].clone()
    data_ptr = grad_buffer.data_ptr()

    got = conv_mod.bn_relu_conv1x1_backward_triton(
        grad_y, x, mean, invstd, gamma, beta, weight, grad_buffer, training
    )
    want = REF["bn_relu_conv1x1_backward"](
        grad_y, x, mean, invstd, gamma, beta, weight, expected_buffer, training
    )
    for name, g, w in zip(("grad_weight", "grad_gamma", "grad_beta"), got, want):
        assert_close(g, w, dtype, name)
    assert grad_buffer.data_ptr() == data_ptr
    assert_close(grad_buffer[:, :channels], expected_buffer[:, :channels], dtype, "grad_buffer[:, :C]")
    assert torch.equal(grad_buffer[:, channels:], untouched), "grad_buffer[:, C:] must be left alone"


@pytest.mark.usefixtures("no_fallback")
def test_bn_relu_conv1x1_transposed_spatial_strides():
    """Any strides work: a spatially transposed view is addressed through its own strides."""
    buf, _ = feature_buffer((2, 12, 6, 5), 12, "nchw", torch.float32)
    x = buf.transpose(2, 3)[:, :9]
    mean, invstd, gamma, beta = bn_params(9)
    weight = random_like(torch.empty(6, 9, device=DEVICE), seed=3)
    out = conv_mod.bn_relu_conv1x1_triton(x, mean, invstd, gamma, beta, weight)
    assert_close(out, REF["bn_relu_conv1x1"](x, mean, invstd, gamma, beta, weight), torch.float32)


# ------------------------------------------------------------------------------ bn_relu_pool_conv1x1

POOL_SHAPES = [((2, 45, 9, 11), 37, 20), ((3, 6, 2, 3), 5, 3), ((2, 24, 6, 4), 24, 12)]
POOL_IDS = ["prefix-odd-odd", "to-1x1", "even"]


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,channels,out_channels", POOL_SHAPES, ids=POOL_IDS)
def test_bn_relu_pool_conv1x1(dtype, layout, shape, channels, out_channels):
    _, x = feature_buffer(shape, channels, layout, dtype)
    mean, invstd, gamma, beta = bn_params(channels, positive_beta=True, dtype=dtype)
    weight = random_like(torch.empty(out_channels, channels, dtype=dtype, device=DEVICE), seed=3)
    out = pool_mod.bn_relu_pool_conv1x1_triton(x, mean, invstd, gamma, beta, weight)
    want = REF["bn_relu_pool_conv1x1"](x, mean, invstd, gamma, beta, weight)
    assert_close(out, want, dtype, "forward")
    expect_layout(out, layout)
    grad_y = random_like(out, seed=4)
    for training in (True, False):
        got = pool_mod.bn_relu_pool_conv1x1_backward_triton(grad_y, x, mean, invstd, gamma, beta, weight, training)
        want = REF["bn_relu_pool_conv1x1_backward"](grad_y, x, mean, invstd, gamma, beta, weight, training)
        for name, g, w in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), got, want):
            assert_close(g, w, dtype, f"{name} training={training}")
        expect_layout(got[0], layout)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("shape", [(2, 6, 7), (2, 5, 5, 4, 3)], ids=["1d", "3d"])
def test_bn_relu_pool_conv1x1_other_ranks(shape):
    """The window is 2 (1-D) or 2x2x2 (3-D); the floor's cut-off pixels still get their grad_x."""
    _, x = feature_buffer(shape, 5, "nchw", torch.float32)
    mean, invstd, gamma, beta = bn_params(5)
    weight = random_like(torch.empty(4, 5, device=DEVICE), seed=3)
    out = pool_mod.bn_relu_pool_conv1x1_triton(x, mean, invstd, gamma, beta, weight)
    assert_close(out, REF["bn_relu_pool_conv1x1"](x, mean, invstd, gamma, beta, weight), torch.float32)
    grad_y = random_like(out)
    got = pool_mod.bn_relu_pool_conv1x1_backward_triton(grad_y, x, mean, invstd, gamma, beta, weight, True)
    want = REF["bn_relu_pool_conv1x1_backward"](grad_y, x, mean, invstd, gamma, beta, weight, True)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


# ----------------------------------------------------------------------------- dispatch and fallbacks


@pytest.fixture
def triton_calls(monkeypatch, no_fallback):
    """Force the Triton backend and record which Triton launchers run."""
    monkeypatch.setattr(config, "backend", "triton")
    calls = []
    for op in OPS:
        launcher = op.kernels["triton"]

        def spy(*args, _launcher=launcher, **kwargs):
            calls.append(_launcher.__name__)
            return _launcher(*args, **kwargs)

        monkeypatch.setitem(op.kernels, "triton", spy)
    real_launch = tr.launch

    def launch_spy(kernel, *args, **kwargs):
        function = kernel
        while hasattr(function, "fn"):
            function = function.fn
        calls.append(function.__name__)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(tr, "launch", launch_spy)
    return calls


def test_custom_ops_dispatch_to_triton_and_autograd(triton_calls):
    """The public custom ops, with autograd, run the Triton launchers when the backend says so."""
    buf, x = feature_buffer((2, 10, 5, 6), 7, "nchw", torch.float32)
    x = x.detach().requires_grad_()
    mean, invstd, gamma, beta = bn_params(7)
    gamma.requires_grad_(), beta.requires_grad_()
    weight = random_like(torch.empty(4, 7, device=DEVICE), seed=3).requires_grad_()
    out = densenet_fused.ops.bn_relu_conv1x1(x, mean, invstd, gamma, beta, weight, False)
    grads = torch.autograd.grad(out, (x, gamma, beta, weight), random_like(out))
    launchers = [name for name in triton_calls if name.endswith("_triton")]
    assert launchers == ["bn_relu_conv1x1_triton", "bn_relu_conv1x1_backward_triton"]
    reference = REF["bn_relu_conv1x1"]
    expected = torch.func.vjp(lambda *a: reference(a[0], mean, invstd, a[1], a[2], a[3]), x, gamma, beta, weight)
    assert_close(out, expected[0], torch.float32)
    for g, w in zip(grads, expected[1](random_like(out))):
        assert_close(g, w, torch.float32)


def test_empty_inputs_run_the_reference():
    empty = torch.randn(0, 3, 4, 5, device=DEVICE)
    with pytest.warns(UserWarning):  # torch's own warning for a variance over zero values
        mean, var = stats_mod.channel_stats_triton(empty)
    assert mean.shape == var.shape == (3,)
    out = conv_mod.bn_relu_conv1x1_triton(empty, *bn_params(3), torch.randn(2, 3, device=DEVICE))
    assert out.shape == (0, 2, 4, 5)


@pytest.mark.usefixtures("no_fallback")
def test_tf32_follows_torch_convolution_precision():
    """float32 1x1 convs use TF32 exactly where torch's cuDNN convolutions would (conv.fp32_precision, deferring
    to cudnn's and torch's own when "none"; the legacy allow_tf32 maps onto them); other dtypes never."""
    levels = (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends)
    saved = [level.fp32_precision for level in levels]
    try:
        torch.backends.cudnn.allow_tf32 = True  # the legacy flag, torch's default (this file's fixture clears it)
        assert tr.input_precision(torch.float32) == "tf32"
        torch.backends.cudnn.allow_tf32 = False
        assert tr.input_precision(torch.float32) == "ieee"
        levels[0].fp32_precision = "tf32"
        assert tr.input_precision(torch.float32) == "tf32"
        assert tr.input_precision(torch.float16) == tr.input_precision(torch.float64) == "ieee"
        levels[0].fp32_precision = "ieee"
        assert tr.input_precision(torch.float32) == "ieee"
        levels[0].fp32_precision = "none"  # defers to cudnn's, then torch's ("none" throughout: IEEE)
        assert tr.input_precision(torch.float32) == "ieee"
        levels[1].fp32_precision = "tf32"
        assert tr.input_precision(torch.float32) == "tf32"
        _, x = feature_buffer((2, 40, 5, 7), 37, "nchw", torch.float32)
        mean, invstd, gamma, beta = bn_params(37)
        weight = random_like(torch.empty(8, 37, device=DEVICE), seed=3)
        out = conv_mod.bn_relu_conv1x1_triton(x, mean, invstd, gamma, beta, weight)
        want = REF["bn_relu_conv1x1"](x, mean, invstd, gamma, beta, weight)
        torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)  # TF32 keeps a 10-bit mantissa
    finally:
        for level, value in zip(reversed(levels), reversed(saved)):
            level.fp32_precision = value


def test_autotune_spaces_per_family():
    """Under the interpreter the autotuners hold exactly one config; on a GPU each launch is pruned to
    its family: tensor-core tiles for fp16/bf16/TF32, BLOCK_K=16 FMA tiles for IEEE fp32, fp64 tiles,
    minus the configs that spill registers when the transition pools."""
    if tr.interpreting():
        assert len(conv_kernels._FORWARD_CONFIGS) == len(conv_kernels._WEIGHT_GRAD_CONFIGS) == 1
    x = {dtype: torch.empty(1, dtype=dtype) for dtype in (torch.float16, torch.float32, torch.float64)}
    for configs, prune, k_name in (
        (conv_kernels._FORWARD_GPU_CONFIGS, conv_kernels._prune_forward, "BLOCK_K"),
        (conv_kernels._WEIGHT_GRAD_GPU_CONFIGS, conv_kernels._prune_weight_grad, "BLOCK_Q"),
    ):
        def pick(dtype, prec="ieee", pw=1, b=128, c=512):
            return prune(configs, {"x_ptr": x[dtype], "B": b, "C": c}, PREC=prec, PW=pw)

        tags = conv_kernels._CONFIG_TAGS
        assert {tags[id(c)][0] for c in pick(torch.float16)} == {"mma"}
        assert {tags[id(c)][0] for c in pick(torch.float32, "tf32")} == {"mma"}
        assert {tags[id(c)][0] for c in pick(torch.float32)} == {"fma32"}
        assert all(c.kwargs[k_name] == 16 for c in pick(torch.float32) if k_name == "BLOCK_K")
        assert {tags[id(c)][0] for c in pick(torch.float64)} == {"fp64"}
        pooled = pick(torch.float16, pw=2)
        assert pooled and all(tags[id(c)][1] for c in pooled) and len(pooled) < len(pick(torch.float16))
        assert all(c.kwargs["BLOCK_B"] <= 64 for c in pick(torch.float16, b=64))
        narrowest = min(c.kwargs["BLOCK_B"] for c in configs if tags[id(c)][0] == "mma")
        assert {c.kwargs["BLOCK_B"] for c in pick(torch.float16, b=20)} == {narrowest}


def test_package_imports_without_triton():
    """Where triton is absent the package imports and the primitives have no Triton backend."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib.util, densenet_fused\n"
        "from densenet_fused.ops import _backend\n"
        "assert not _backend.TRITON_AVAILABLE\n"
        "from densenet_fused.ops import PRIMITIVES\n"
        "kernels = [op.kernels for p in PRIMITIVES.values() for op in p.ops.values()]\n"
        "assert kernels and not any('triton' in k for k in kernels)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    blocker = (
        "import importlib.util as u; _find = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name == 'triton' else _find(name, *a, **k)\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker + code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- block and whole model


def _randomize_norms(model, seed=7):
    """Non-trivial BatchNorm affine parameters and running statistics (copied to the twin afterwards)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator))
                module.bias.copy_(0.3 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))


def _compare(ours, theirs, tol, what):
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * max(1.0, theirs.abs().max().item()), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense_block_matches_torchvision(triton_calls, layout):
    from torchvision.models.densenet import _DenseBlock as TorchvisionBlock

    torch.manual_seed(0)
    kwargs = dict(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3, drop_rate=0.0)
    theirs = TorchvisionBlock(**kwargs, memory_efficient=False)
    _randomize_norms(theirs)
    ours = densenet_fused.DenseBlock(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, theirs = ours.to(DEVICE, memory_format=memory_format), theirs.to(DEVICE, memory_format=memory_format)
    x = torch.randn(2, 5, 6, 7).to(DEVICE, memory_format=memory_format)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    _compare(out_ours, out_theirs, 1e-5, "block output")
    grad = torch.randn_like(out_theirs)
    out_ours.backward(grad), out_theirs.backward(grad)
    _compare(x_ours.grad, x_theirs.grad, 1e-4, "input grad")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        _compare(p.grad, q.grad, 1e-4, name)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        _compare(b.float(), c.float(), 1e-5, name)
    assert set(triton_calls) == {  # the block launches its kernels itself, never through the primitive ops
        "_stats_pass_kernel", "finalize_stats_kernel", "_conv1x1_forward_kernel", "_bn_relu_kernel",
        "_bn_relu_backward_kernel", "_conv1x1_weight_grad_kernel", "_conv1x1_input_grad_kernel",
    }  # fmt: skip


def test_densenet_matches_torchvision(triton_calls):
    """Forward, input and parameter grads, running stats after a training step, then eval forward."""
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    torch.manual_seed(0)
    ours = densenet_fused.DenseNet(**config)
    _randomize_norms(ours)
    theirs = torchvision.models.DenseNet(**config, memory_efficient=False)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    x = torch.randn(2, 3, 19, 21, device=DEVICE)  # last block at 2x3 (batch 2 at 1x1 is ill-conditioned BN)
    target = torch.tensor([0, 2], device=DEVICE)

    outputs = []
    for model in (ours, theirs):
        inp = x.clone().requires_grad_()
        out = model(inp)
        torch.nn.functional.cross_entropy(out, target).backward()
        outputs.append((out.detach(), inp.grad))
    _compare(outputs[0][0], outputs[1][0], 1e-4, "logits")
    _compare(outputs[0][1], outputs[1][1], 1e-4, "input grad")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        _compare(p.grad, q.grad, 1e-4, name)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        _compare(b.float(), c.float(), 1e-5, name)
    assert {"bn_relu_pool_conv1x1_triton", "bn_relu_pool_conv1x1_backward_triton"} <= set(triton_calls)

    with torch.no_grad():
        for model in (ours, theirs):
            for p in model.parameters():
                p -= 0.1 * p.grad
        ours.eval(), theirs.eval()
        _compare(ours(x), theirs(x), 1e-4, "eval logits after a step")
