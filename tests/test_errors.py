"""Bad input gets a clear error before any work, and the model stays usable afterwards."""

import pytest
import torch
from helpers import TINY, twins

import densenet_fused


def _running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _assert_untouched(model, before):
    for key, value in _running_stats(model).items():
        assert torch.equal(value, before[key]), f"{key} changed by a rejected input"


BAD_INPUTS = {
    "wrong_channels": (torch.randn(2, 4, 32, 32), ValueError, "expects 3 input channels, got 4"),
    "wrong_rank": (torch.randn(3, 32, 32), ValueError, "4-D input"),
    "integer_dtype": (torch.ones(2, 3, 32, 32, dtype=torch.int64), TypeError, "floating-point input, got torch.int64"),
    "other_device": (torch.randn(2, 3, 32, 32, device="meta"), RuntimeError, "input is on meta but the parameters are on cpu"),
    "too_small_to_pool": (torch.randn(2, 3, 4, 4), ValueError, "too small: transition1 sees 1x1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_model_rejects_bad_input_before_any_work(case):
    x, error, message = BAD_INPUTS[case]
    model = densenet_fused.DenseNet(**TINY)
    before = _running_stats(model)
    with pytest.raises(error, match=message):
        model(x)
    _assert_untouched(model, before)
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # still usable


BLOCK_BAD_INPUTS = {
    "wrong_channels": (torch.randn(2, 5, 6, 6), ValueError, "expects 4 input channels, got 5"),
    "wrong_rank": (torch.randn(2, 4, 6), ValueError, "4-D input"),
    "integer_dtype": (torch.ones(2, 4, 6, 6, dtype=torch.int32), TypeError, "floating-point input"),
    "other_device": (torch.randn(2, 4, 6, 6, device="meta"), RuntimeError, "input is on meta"),
    "dtype_mismatch": (torch.randn(2, 4, 6, 6, dtype=torch.float64), TypeError, "does not match the parameters' torch.float32"),
}


@pytest.mark.parametrize("case", BLOCK_BAD_INPUTS)
def test_block_and_transition_reject_bad_input(case):
    x, error, message = BLOCK_BAD_INPUTS[case]
    block = densenet_fused.DenseBlock(2, 4, 2, 3, 0.0)
    before = _running_stats(block)
    with pytest.raises(error, match=message):
        block(x)
    _assert_untouched(block, before)
    transition = densenet_fused.Transition(4, 2)
    with pytest.raises(error, match=message):
        transition(x)


def test_single_value_per_channel_raises_like_torch_batchnorm():
    """Batch 1 at 8x8 reaches 1x1 in the last block: torchvision raises there, we raise before any work."""
    ours, theirs = twins(dtype=torch.float32, **TINY)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError) as expected:
        theirs(x)
    before = _running_stats(ours)
    with pytest.raises(ValueError) as raised:
        ours(x)
    assert str(raised.value) == str(expected.value)
    assert "Expected more than 1 value per channel when training" in str(raised.value)
    _assert_untouched(ours, before)
    ours.eval()
    ours(x)  # eval mode uses running statistics: batch 1 is fine
    ours.train()
    ours(torch.randn(2, 3, 32, 32)).sum().backward()


def test_block_single_value_per_channel():
    block = densenet_fused.DenseBlock(2, 4, 2, 3, 0.0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got input size"):
        block(torch.randn(1, 4, 1, 1))
    assert int(block.denselayer1.norm1.num_batches_tracked) == 0
    block.eval()
    assert block(torch.randn(1, 4, 1, 1)).shape == (1, 10, 1, 1)


def test_forced_backend_errors(monkeypatch):
    from densenet_fused.ops import channel_stats

    from densenet_fused.ops._backend import config

    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setenv("DENSENET_FUSED_BACKEND", "cuda")
    with pytest.raises(ValueError, match="must be one of"):
        config.reload()
    monkeypatch.setattr(config, "backend", "triton")
    monkeypatch.setattr(config, "interpret", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        channel_stats(x)

