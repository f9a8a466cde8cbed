"""torch.autocast: bf16 buffer and convolutions, fp32 statistics and parameters, within bf16 error of torchvision.

bf16 keeps 8 bits of mantissa, so neither implementation is close to the float64 result; each check
asks that ours is no further from float64 than about torchvision under the same autocast is.
"""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.densenet import _DenseBlock as TorchvisionBlock
from torchvision.models.densenet import _Transition as TorchvisionTransition
from helpers import errors_against_float64, randomize_affine, twins

import densenet_fused

TINY = dict(growth_rate=6, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5)
AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _assert_as_close_as_torchvision(ours, theirs, x, loss_fn):
    """ours and theirs (float32) under bf16 autocast, torchvision in float64 without: compare the errors."""
    for what, (ours_error, theirs_error) in errors_against_float64(ours, theirs, x, loss_fn, AUTOCAST).items():
        assert ours_error <= 2 * theirs_error + 1e-3, f"{what}: ours {ours_error:.2e}, torchvision {theirs_error:.2e}"
    # fp32 params, fp32 grads and running stats; the buffer is bf16 (torchvision's torch.cat promotes a
    # standalone block's output to the input's fp32)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
    assert all(b.dtype == torch.float32 for name, b in ours.named_buffers() if "running" in name)
    x = x.clone().requires_grad_()
    with torch.autocast(**AUTOCAST):
        out = ours(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == x.dtype


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_model_under_autocast_is_as_accurate_as_torchvision(memory_format):
    ours, theirs = twins(dtype=torch.float32, **TINY)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 35, 39).to(memory_format=memory_format)
    target = torch.tensor([0, 3, 1, 4])
    _assert_as_close_as_torchvision(ours, theirs, x, lambda out: F.cross_entropy(out, target))


@pytest.mark.parametrize("kind", ["block", "transition"])
def test_standalone_modules_cast_fp32_input_under_autocast(kind):
    """Fed float32 under autocast (no stem conv before them), they compute in bf16 like torchvision does."""
    torch.manual_seed(0)
    if kind == "block":
        ours, theirs = densenet_fused.DenseBlock(3, 8, 2, 4, 0.0), TorchvisionBlock(3, 8, 2, 4, 0.0)
    else:
        ours, theirs = densenet_fused.Transition(8, 5), TorchvisionTransition(8, 5)
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 8, 12, 13)
    weights = torch.randn((4, 20, 12, 13) if kind == "block" else (4, 5, 6, 6))
    _assert_as_close_as_torchvision(ours, theirs, x, lambda out: (out * weights.double()).sum())


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
