"""The pure-PyTorch reference primitives (the oracle) against plain torch ops and autograd, in float64.

Their opcheck runs in the kernel matrix (tests/test_kernels.py, backend "reference").
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.densenet import _Transition as TorchvisionTransition

from densenet_fused import ops
from densenet_fused.ops.bn_relu import bn_relu_backward_reference, bn_relu_reference
from densenet_fused.ops.bn_relu_conv1x1 import bn_relu_conv1x1_backward_reference, bn_relu_conv1x1_reference
from densenet_fused.ops.bn_relu_pool_conv1x1 import (
    bn_relu_pool_conv1x1_backward_reference,
    bn_relu_pool_conv1x1_reference,
)
from densenet_fused.ops.channel_stats import channel_stats_reference

SHAPES = [(2, 5, 4, 3), (3, 7, 1, 1), (2, 4, 5, 7, 3), (2, 3, 9)]  # 2-D, 1x1, 3-D, 1-D


def _inputs(shape, channels_last=False, seed=0):
    torch.manual_seed(seed)
    c = shape[1]
    buf = torch.randn(shape[0], c + 3, *shape[2:], dtype=torch.float64) * 2 + 0.5
    if channels_last:
        buf = buf.movedim(1, -1).contiguous().movedim(-1, 1)
    x = buf[:, :c]  # a prefix view of a larger buffer, as in the block
    gamma = torch.rand(c, dtype=torch.float64) + 0.5
    beta = torch.randn(c, dtype=torch.float64)
    return x, gamma, beta


def _batch_norm_relu(x, gamma, beta, training, running_mean, running_var):
    return torch.relu(F.batch_norm(x, running_mean, running_var, gamma, beta, training, 0.0, 1e-5))


def _stats(x, training, eps=1e-5):
    if training:
        mean, var = channel_stats_reference(x)
    else:
        mean, var = torch.rand(x.size(1), dtype=torch.float64), torch.rand(x.size(1), dtype=torch.float64) + 0.5
    return mean, var, torch.rsqrt(var + eps)


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats(shape):
    x, _, _ = _inputs(shape)
    mean, var = channel_stats_reference(x)
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(mean, x.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(dims, correction=0), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ops.channel_stats, (x.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_against_batch_norm(shape, training):
    x, gamma, beta = _inputs(shape)
    mean, var, invstd = _stats(x, training)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    expected = _batch_norm_relu(*leaves, training, None if training else mean, None if training else var)
    torch.testing.assert_close(bn_relu_reference(x, mean, invstd, gamma, beta), expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    grads = bn_relu_backward_reference(grad, x, mean, invstd, gamma, beta, training)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,channels_last", [(s, False) for s in SHAPES] + [(SHAPES[0], True), (SHAPES[1], True)])
@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_conv1x1_against_conv(shape, training, channels_last):
    x, gamma, beta = _inputs(shape, channels_last)
    mean, var, invstd = _stats(x, training)
    weight = torch.randn(6, x.size(1), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta, weight)]
    z = _batch_norm_relu(*leaves[:3], training, None if training else mean, None if training else var)
    expected = torch.einsum("bc,nc...->nb...", leaves[3], z)
    out = bn_relu_conv1x1_reference(x, mean, invstd, gamma, beta, weight)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(expected)
    gx, ggamma, gbeta, gweight = torch.autograd.grad(expected, leaves, grad)
    grad_buffer = torch.randn(x.size(0), x.size(1) + 2, *x.shape[2:], dtype=torch.float64)
    before = grad_buffer.clone()
    grads = bn_relu_conv1x1_backward_reference(grad, x, mean, invstd, gamma, beta, weight, grad_buffer, training)
    torch.testing.assert_close(grad_buffer[:, : x.size(1)] - before[:, : x.size(1)], gx, rtol=1e-10, atol=1e-10)
    assert torch.equal(grad_buffer[:, x.size(1) :], before[:, x.size(1) :])
    for g, e in zip(grads, (gweight, ggamma, gbeta)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [(6, 8), (7, 5), (2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_transition_against_torchvision(size, training):
    torch.manual_seed(0)
    theirs = TorchvisionTransition(5, 3).double().train(training)
    torch.nn.init.uniform_(theirs.norm.weight, 0.5, 1.5)
    torch.nn.init.uniform_(theirs.norm.bias, -0.5, 0.5)
    x, _, _ = _inputs((2, 5, *size))
    if not training:
        theirs.norm.running_mean.uniform_(-1, 1), theirs.norm.running_var.uniform_(0.5, 2)
    mean, var, invstd = _stats(x, True)
    if not training:
        mean, var = theirs.norm.running_mean, theirs.norm.running_var
        invstd = torch.rsqrt(var + 1e-5)
    gamma, beta, weight = theirs.norm.weight.detach(), theirs.norm.bias.detach(), theirs.conv.weight.detach().flatten(1)
    leaf = x.clone().requires_grad_()
    expected = theirs(leaf)
    out = bn_relu_pool_conv1x1_reference(x, mean, invstd, gamma, beta, weight)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [leaf, theirs.conv.weight, theirs.norm.weight, theirs.norm.bias], grad)
    grads = bn_relu_pool_conv1x1_backward_reference(grad, x, mean, invstd, gamma, beta, weight, training)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e.reshape(g.shape), rtol=1e-10, atol=1e-10)


def test_missing_extension_warns_once_and_falls_back_to_reference():
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'densenet_fused._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, densenet_fused\n"
        "    from densenet_fused.ops import _backend\n"
        "    model = densenet_fused.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)\n"
        "    model(torch.randn(2, 3, 32, 32)).sum().backward()\n"
        "    model(torch.randn(2, 3, 32, 32)).sum().backward()\n"
        "messages = [str(w.message) for w in caught if '_C is not built' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "assert 'pip install -e . --no-build-isolation' in messages[0]\n"
        "assert not _backend.CPP_AVAILABLE and _backend.backend_for(torch.ones(1)) == 'reference'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DENSENET_FUSED_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
