"""What the Triton path adds beyond the kernel matrix (tests/test_kernels.py): dispatch through the public ops,
strides, empty batches, the TF32 rule, the autotune spaces, a package without triton, and a tiny block and
model on the Triton path against torchvision.

On a CUDA machine everything runs on the GPU; without one, on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).  Tests parametrized over ``backend``
are guarded by conftest.py: a launcher that quietly ran the reference fails them, and ``kernel_spy`` says
which kernels ran.
"""

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from helpers import CUDA, DEVICE, OPS, kernel_problem, random_in_layout, random_weight

import densenet_fused
from densenet_fused.ops import _triton as tr

conv_kernels = importlib.import_module("densenet_fused.ops._conv1x1_triton")

LAYOUTS = ["nchw", "channels_last"]

pytestmark = [
    pytest.mark.skipif(
        not tr.TRITON_AVAILABLE or not (CUDA or tr.interpreting()),
        reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 (set by conftest.py before triton is imported)",
    ),
    pytest.mark.usefixtures("ieee_fp32"),
]


def assert_close(actual, expected, tol=2e-5, what=""):
    """float32 within ``tol`` relative to the largest magnitude of ``expected`` (tests/test_kernels.py's rule)."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", ["triton"])
def test_transposed_spatial_strides(backend):
    """Any strides work: a spatially transposed view is addressed through its own strides."""
    p = kernel_problem(2, 9, (6, 5), "contiguous", torch.float32)
    x = p.x.transpose(2, 3)
    weight = random_weight(6, 9, torch.float32, seed=3)
    for name in ("bn_relu", "bn_relu_conv1x1", "bn_relu_pool_conv1x1"):
        args = (x, *p.norm) if name == "bn_relu" else (x, *p.norm, weight)
        assert_close(OPS[name].runner(backend)(*args), OPS[name].reference(*args), what=name)


@pytest.mark.parametrize("backend", ["triton"])
def test_custom_ops_dispatch_to_triton_and_autograd(backend, kernel_spy):
    """The public custom ops, with autograd, run the Triton launchers when the backend says so."""
    p = kernel_problem(2, 7, (5, 6), "contiguous", torch.float32)
    x = p.x.detach().requires_grad_()
    gamma, beta = p.gamma.requires_grad_(), p.beta.requires_grad_()
    weight = random_weight(4, 7, torch.float32, seed=3).requires_grad_()
    out = densenet_fused.ops.bn_relu_conv1x1(x, p.mean, p.invstd, gamma, beta, weight, False)
    grad = random_in_layout(out, 4, seed=1)
    grads = torch.autograd.grad(out, (x, gamma, beta, weight), grad)
    assert kernel_spy.ops["triton"] == ["bn_relu_conv1x1", "bn_relu_conv1x1_backward"]
    reference = OPS["bn_relu_conv1x1"].reference
    expected = torch.func.vjp(lambda *a: reference(a[0], p.mean, p.invstd, a[1], a[2], a[3]), x, gamma, beta, weight)
    assert_close(out, expected[0], what="output")
    for name, g, w in zip(("x", "gamma", "beta", "weight"), grads, expected[1](grad)):
        assert_close(g, w, what=f"grad {name}")


def test_empty_batches_give_the_references_outputs_for_every_op():
    """A batch of zero launches nothing: every op's Triton entry returns the reference's outputs (shapes, dtypes
    and values; statistics of nothing are NaN, as torch's)."""
    x = torch.randn(0, 3, 4, 6, device=DEVICE)
    norm = [torch.rand(3, device=DEVICE) + 0.5 for _ in range(4)]
    weight = torch.randn(2, 3, device=DEVICE)
    args = {
        "channel_stats": (x,),
        "bn_relu": (x, *norm),
        "bn_relu_backward": (torch.randn(0, 3, 4, 6, device=DEVICE), x, *norm, True),
        "bn_relu_conv1x1": (x, *norm, weight),
        "bn_relu_conv1x1_backward": (torch.randn(0, 2, 4, 6, device=DEVICE), x, *norm, weight,
                                     torch.zeros(0, 5, 4, 6, device=DEVICE), True),  # fmt: skip
        "bn_relu_pool_conv1x1": (x, *norm, weight),
        "bn_relu_pool_conv1x1_backward": (torch.randn(0, 2, 2, 3, device=DEVICE), x, *norm, weight, True),
    }
    assert set(args) == set(OPS)
    for name, op in OPS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own warning for a variance over zero values
            got, want = op.kernels["triton"](*args[name]), op.reference(*args[name])
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["triton"])
def test_tf32_follows_torch_convolution_precision(backend):
    """float32 1x1 convs use TF32 exactly where torch's cuDNN convolutions would (conv.fp32_precision, deferring
    to cudnn's and torch's own when "none"; the legacy allow_tf32 maps onto them); other dtypes never."""
    levels = (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends)
    saved = [level.fp32_precision for level in levels]
    try:
        torch.backends.cudnn.allow_tf32 = True  # the legacy flag, torch's default (the ieee_fp32 fixture clears it)
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
        p = kernel_problem(2, 37, (5, 7), "contiguous", torch.float32)
        weight = random_weight(8, 37, torch.float32, seed=3)
        op = OPS["bn_relu_conv1x1"]
        out, want = op.runner(backend)(p.x, *p.norm, weight), op.reference(p.x, *p.norm, weight)
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


def _assert_state_matches(ours, theirs):
    """Parameter gradients (1e-4) and buffers (1e-5) of two models with the same structure."""
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, 1e-4, name)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        assert_close(b.float(), c.float(), 1e-5, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton"])
def test_dense_block_matches_torchvision(backend, layout, kernel_spy):
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
    assert_close(out_ours, out_theirs, 1e-5, "block output")
    grad = torch.randn_like(out_theirs)
    out_ours.backward(grad), out_theirs.backward(grad)
    assert_close(x_ours.grad, x_theirs.grad, 1e-4, "input grad")
    _assert_state_matches(ours, theirs)
    assert not kernel_spy.ops["triton"]  # the block launches its kernels itself, never through the primitive ops
    assert set(kernel_spy.launched) == {
        "_stats_pass_kernel", "finalize_stats_kernel", "_conv1x1_forward_kernel", "_bn_relu_kernel",
        "_bn_relu_backward_kernel", "_conv1x1_weight_grad_kernel", "_conv1x1_input_grad_kernel",
    }  # fmt: skip


@pytest.mark.parametrize("backend", ["triton"])
def test_densenet_matches_torchvision(backend, kernel_spy):
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
    assert_close(outputs[0][0], outputs[1][0], 1e-4, "logits")
    assert_close(outputs[0][1], outputs[1][1], 1e-4, "input grad")
    _assert_state_matches(ours, theirs)
    assert {"bn_relu_pool_conv1x1", "bn_relu_pool_conv1x1_backward"} <= set(kernel_spy.ops["triton"])

    with torch.no_grad():
        for model in (ours, theirs):
            for p in model.parameters():
                p -= 0.1 * p.grad
        ours.eval(), theirs.eval()
        assert_close(ours(x), theirs(x), 1e-4, "eval logits after a step")
