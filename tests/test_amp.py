"""torch.autocast: bf16 buffer and convolutions, fp32 statistics and parameters, within bf16 error of torchvision.

bf16 keeps 8 bits of mantissa, so neither implementation is close to the float64 result; the accuracy checks judge
bf16 as the suite judges float32 (helpers.assert_as_accurate_as_torchvision): per quantity, the median over 5
seeds of our error against float64 within ROUNDING_SPREAD (1.5x) of torchvision's own under the same autocast.
"""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.densenet import _DenseBlock as TorchvisionBlock
from torchvision.models.densenet import _Transition as TorchvisionTransition
from helpers import TINY, assert_as_accurate_as_torchvision, randomize_affine, twins

import densenet_fused

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _assert_fp32_params_and_stats_bf16_output(ours, x):
    """fp32 params, fp32 grads and running stats; the output is bf16 (torchvision's torch.cat promotes a
    standalone block's output to the input's fp32), the input grad has the input's dtype."""
    x = x.clone().requires_grad_()
    with torch.autocast(**AUTOCAST):
        out = ours(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == x.dtype
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
    assert all(b.dtype == torch.float32 for name, b in ours.named_buffers() if "running" in name)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_model_under_autocast_is_as_accurate_as_torchvision(memory_format):
    """Median over 5 seeds, per quantity, within ROUNDING_SPREAD (1.5x) of torchvision's own bf16 error.

    Measured (9 seeds, both memory formats): ours/torchvision medians 7.3e-3/7.2e-3 (output), 0.29/0.30 (input
    grad), 0.20/0.21 (param grads), 3.0e-4/3.1e-4 (running stats): ratios 0.98-1.01 on 5 seeds, 1.00-1.08 on 9.
    """

    def make(seed):
        ours, theirs = twins(dtype=torch.float32, seed=seed, **TINY)
        randomize_affine(ours)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(4, 3, 35, 39).to(memory_format=memory_format)
        target = torch.randint(TINY["num_classes"], (4,))
        return ours, theirs, x, lambda out: F.cross_entropy(out, target)

    assert_as_accurate_as_torchvision(make, AUTOCAST)
    ours, _, x, _ = make(0)
    _assert_fp32_params_and_stats_bf16_output(ours, x)


@pytest.mark.parametrize("kind", ["block", "transition"])
def test_standalone_modules_cast_fp32_input_under_autocast(kind):
    """Fed float32 under autocast (no stem conv before them), they compute in bf16 as torchvision does: judged
    as the model is (median over 5 seeds within 1.5x of torchvision's bf16 error).

    Measured ours/torchvision medians: block 3.1e-3/2.4e-3 (output: torchvision's keeps the fp32 input
    channels, our bf16 buffer rounds them), 4.0e-2/4.2e-2 (input grad), 5.8e-2/5.5e-2 (param grads),
    3.9e-5/3.6e-5 (running stats); transition 3.3e-3/2.9e-3, 3.0e-3/2.9e-3, 2.5e-3/2.6e-3, 3.1e-8/3.1e-8 (its
    statistics are the fp32 input's, as torchvision's norm takes them).
    """

    def make(seed):
        torch.manual_seed(seed)
        if kind == "block":
            ours, theirs = densenet_fused.DenseBlock(3, 8, 2, 4, 0.0), TorchvisionBlock(3, 8, 2, 4, 0.0)
        else:
            ours, theirs = densenet_fused.Transition(8, 5), TorchvisionTransition(8, 5)
        randomize_affine(ours)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(4, 8, 12, 13)
        weights = torch.randn((4, 20, 12, 13) if kind == "block" else (4, 5, 6, 6), dtype=torch.float64)
        return ours, theirs, x, lambda out: (out * weights).sum()

    assert_as_accurate_as_torchvision(make, AUTOCAST)
    ours, _, x, _ = make(0)
    _assert_fp32_params_and_stats_bf16_output(ours, x)


def test_block_casts_every_input_piece_and_returns_fp32_gradients():
    block = randomize_affine(densenet_fused.DenseBlock(2, 7, 2, 3, 0.0))
    pieces = [torch.randn(2, c, 6, 6, requires_grad=True) for c in (4, 3)]
    with torch.autocast(**AUTOCAST):
        buf = block(pieces)
        expected = block(torch.cat(pieces, 1))
    assert buf.dtype == torch.bfloat16
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    buf.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in pieces)


def test_autocast_leaves_float64_alone():
    """torch.autocast never casts float64: a float64 block runs in float64; float64 input to fp32 params fails."""
    block = randomize_affine(densenet_fused.DenseBlock(2, 4, 2, 3, 0.0)).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = block(x)
    with torch.autocast(**AUTOCAST):
        out = block(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    block.float()
    with torch.autocast(**AUTOCAST), pytest.raises(TypeError, match="input dtype torch.float64 does not match"):
        block(x)
    with torch.autocast(**AUTOCAST), torch.autocast(**AUTOCAST, enabled=False):
        with pytest.raises(TypeError, match="input dtype torch.bfloat16 does not match"):
            block(x.bfloat16())  # autocast disabled inside: no cast, the dtype mismatch is an error again


def test_devices_without_autocast_still_run():
    """The autocast query must not fail where autocast does not exist: a meta-device model infers shapes."""
    with torch.device("meta"):
        model = densenet_fused.DenseNet(**TINY)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
