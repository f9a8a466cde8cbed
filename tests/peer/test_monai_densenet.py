"""MONAI's DenseNet tests, run on ``densenet_fused.monai``'s classes: only the constructor changes.

Source: Project-MONAI/MONAI, tests/networks/nets/test_densenet.py, commit 40a08725c582e3b7a5136b2c47ff9e38c541dd8f.

Adapted: MONAI's DenseNet121/Densenet169/densenet201/DenseNet264 are imported from ``densenet_fused.monai``
(the same names, signatures and ``pretrained`` semantics); parameterized.expand becomes
pytest.mark.parametrize, so each case can carry its mark; MONAI's test_script_save helper is written out below.
Marked cases:
- test_script: TorchScript is not supported, so scripting must raise the TorchScript error at once (the
  test keeps MONAI's body inside ``pytest.raises``);
- pretrained cases: torch.hub reads torchvision's densenet121 file from a temporary ``TORCH_HOME`` holding a
  generated checkpoint (tests/hub_cache.py, the ``torch_home`` fixture) instead of downloading it.
  test_pretrain_consistency stays skipped: it asserts float32 features bit for bit equal to torchvision's
  (``torch.all(result == expected_result)``), and the fused kernels sum in another order (a few float32
  roundings apart); tests/test_pretrained.py checks the same in float64, with a tolerance.
MONAI is imported through ``pytest.importorskip``, so the file skips where MONAI is not installed.
"""

import os
import tempfile

import pytest
import torch
from peer_utils import TORCHSCRIPT_ERROR

from densenet_fused.monai import DenseNet121, Densenet169, DenseNet264, densenet201

# Without MONAI (e.g. on a lent GPU machine) the whole file skips, so the rest of the suite still collects.
eval_mode = pytest.importorskip("monai.networks").eval_mode

device = "cuda" if torch.cuda.is_available() else "cpu"

BIT_FOR_BIT = pytest.mark.skip(
    reason="asserts float32 features bit for bit equal to torchvision's; the fused kernels sum in another order "
    "(a few float32 roundings apart): tests/test_pretrained.py checks it in float64"
)


def test_script_save(net, *inputs, device=None, rtol=1e-4, atol=0.0):
    """MONAI's tests.test_utils.test_script_save: script ``net``, save and load it, and compare the outputs."""
    scripted = torch.jit.script(net.cpu().eval())
    with tempfile.TemporaryDirectory() as tempdir:
        path = os.path.join(tempdir, "model.ts")
        torch.jit.save(scripted, path)
        loaded = torch.jit.load(path)
    with torch.no_grad():
        expected = net(*inputs)
        for outputs in (scripted(*inputs), loaded(*inputs)):
            torch.testing.assert_close(outputs, expected, rtol=rtol, atol=atol)


test_script_save.__test__ = False  # a helper, as in MONAI's test_utils

TEST_CASE_1 = [  # 4-channel 3D, batch 2
    {"pretrained": False, "spatial_dims": 3, "in_channels": 2, "out_channels": 3, "norm": ("instance", {"eps": 1e-5})},
    (2, 2, 32, 64, 48),
    (2, 3),
]

TEST_CASE_2 = [  # 4-channel 2D, batch 2
    {"pretrained": False, "spatial_dims": 2, "in_channels": 2, "out_channels": 3, "act": "PRELU"},
    (2, 2, 32, 64),
    (2, 3),
]

TEST_CASE_3 = [  # 4-channel 1D, batch 1
    {"pretrained": False, "spatial_dims": 1, "in_channels": 2, "out_channels": 3},
    (1, 2, 32),
    (1, 3),
]

TEST_CASES = []
for case in [TEST_CASE_1, TEST_CASE_2, TEST_CASE_3]:
    for model in [DenseNet121, Densenet169, densenet201, DenseNet264]:
        TEST_CASES.append(pytest.param(model, *case, id=f"{model.__name__}-{case[1]}"))

TEST_SCRIPT_CASES = [pytest.param(model, *TEST_CASE_1, id=model.__name__)
                     for model in [DenseNet121, Densenet169, densenet201, DenseNet264]]  # fmt: skip

TEST_PRETRAINED_2D_CASE_1 = [  # 4-channel 2D, batch 2
    DenseNet121,
    {"pretrained": True, "progress": True, "spatial_dims": 2, "in_channels": 2, "out_channels": 3},
    (1, 2, 32, 64),
    (1, 3),
]

TEST_PRETRAINED_2D_CASE_2 = [  # 4-channel 2D, batch 2
    DenseNet121,
    {"pretrained": True, "progress": False, "spatial_dims": 2, "in_channels": 2, "out_channels": 1},
    (1, 2, 32, 64),
    (1, 1),
]

TEST_PRETRAINED_2D_CASE_3 = [
    DenseNet121,
    {"pretrained": True, "progress": False, "spatial_dims": 2, "in_channels": 3, "out_channels": 1},
    (1, 3, 32, 32),
]


@pytest.mark.usefixtures("torch_home")  # a generated torchvision checkpoint, served by torch.hub's cache
class TestPretrainedDENSENET:
    @pytest.mark.parametrize("model, input_param, input_shape, expected_shape",
                             [TEST_PRETRAINED_2D_CASE_1, TEST_PRETRAINED_2D_CASE_2])  # fmt: skip
    def test_121_2d_shape_pretrain(self, model, input_param, input_shape, expected_shape):
        net = model(**input_param).to(device)
        with eval_mode(net):
            result = net.forward(torch.randn(input_shape).to(device))
            assert result.shape == expected_shape

    @BIT_FOR_BIT
    @pytest.mark.parametrize("model, input_param, input_shape", [TEST_PRETRAINED_2D_CASE_3])
    def test_pretrain_consistency(self, model, input_param, input_shape):
        import torchvision

        example = torch.randn(input_shape).to(device)
        net = model(**input_param).to(device)
        with eval_mode(net):
            result = net.features.forward(example)
        torchvision_net = torchvision.models.densenet121(weights="DEFAULT").to(device)
        with eval_mode(torchvision_net):
            expected_result = torchvision_net.features.forward(example)
        assert torch.all(result == expected_result)


class TestDENSENET:
    @pytest.mark.parametrize("model, input_param, input_shape, expected_shape", TEST_CASES)
    def test_densenet_shape(self, model, input_param, input_shape, expected_shape):
        net = model(**input_param).to(device)
        with eval_mode(net):
            result = net.forward(torch.randn(input_shape).to(device))
            assert result.shape == expected_shape

    @pytest.mark.parametrize("model, input_param, input_shape, expected_shape", TEST_SCRIPT_CASES)
    def test_script(self, model, input_param, input_shape, expected_shape):
        net = model(**input_param)
        test_data = torch.randn(input_shape)
        with pytest.raises(RuntimeError, match=TORCHSCRIPT_ERROR):
            test_script_save(net, test_data)
