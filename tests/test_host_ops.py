"""The host-op budget per dense layer of the GPU code path (issue 17), counted by ``benchmarks/host_ops.py``.

A training step (forward + cross-entropy, backward) of the Triton path, interpreted on CPU without a GPU, is
counted by the benchmark's counter in a subprocess (the backend and TRITON_INTERPRET are set there before
anything is imported), per dense layer by difference between DenseNets of 1 and 2 layers per block.  "Host
ops" are the aten ops that launch kernels plus the Triton launches.

torchvision's backward count per layer grows with the layer's depth in its block (one more gradient add per
later layer that read its features), so it is taken where the issue sets the target, at DenseNet-121's depth:
its average per layer over a net with blocks (6, 12, 24, 16) (cheap: no interpreter).
"""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the GPU code path needs triton")

FORWARD_BUDGET = 8  # host ops per dense layer, forward
BACKWARD_BUDGET = 12  # host ops per dense layer, backward, the recompute included
# A PReLU layer (act="prelu", two calls of each ReLU kernel: ops/prelu.py), as measured on 2026-12-05: 12 and 30.5
PRELU_BUDGET = {"forward": 12, "backward": 30.5}
PHASES = ("forward", "backward")


def _load_benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "host_ops.py"
    spec = importlib.util.spec_from_file_location("host_ops_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def counts():
    """{"fused": {...}, "fused_prelu": {...}, "torchvision": {...}} as the benchmark's ``count_impls`` returns
    them."""
    # Nets of 1 and 2 layers per block: the same per-layer counts as the benchmark's 2 and 3, in less time.
    benchmark = _load_benchmark()
    impls = ("fused", "fused_prelu", "torchvision")
    return benchmark.count_in_subprocess(impls, layers=(1, 2), densenet121=("torchvision",))["results"]


def test_counter_sees_the_step(counts):
    """The counting itself works: Triton launches, aten ops inside our custom ops, torchvision's ops."""
    fused, tv = counts["fused"], counts["torchvision"]
    step = fused["small_step"]
    assert sum(step[p]["triton_launches"] for p in PHASES) > 0
    assert step["forward"]["inside_custom_ops"] > 0
    assert step["forward"]["block_ops"] == 4  # one dense_block per block
    for p in PHASES:
        assert fused["per_layer"][p]["block_ops"] == 0  # per block: cancels in the difference
        for section in ("per_layer", "densenet121_per_layer"):
            assert tv[section][p]["host_ops"] > 0
            assert tv[section][p]["triton_launches"] == tv[section][p]["layer_ops"] == 0


def test_per_layer_budget(counts):
    """Issue 17's budget: per dense layer, <= 8 host ops forward and <= 12 backward (recompute included), no
    per-layer custom-op dispatch, and no more host ops than torchvision's eager step, forward and backward."""
    mine, tv = counts["fused"]["per_layer"], counts["torchvision"]["densenet121_per_layer"]
    summary = {
        p: {"fused": mine[p]["host_ops"], "torchvision": tv[p]["host_ops"], "fused custom ops": mine[p]["layer_ops"]}
        for p in PHASES
    }
    assert mine["forward"]["host_ops"] <= FORWARD_BUDGET, summary
    assert mine["backward"]["host_ops"] <= BACKWARD_BUDGET, summary
    for p in PHASES:
        assert mine[p]["layer_ops"] == 0, summary
        assert mine[p]["host_ops"] <= tv[p]["host_ops"], summary


def test_prelu_per_layer_budget(counts):
    """A PReLU layer stays within what it was measured at (``PRELU_BUDGET``), with no per-layer custom-op
    dispatch: a regression in its glue ops breaks this."""
    mine = counts["fused_prelu"]["per_layer"]
    summary = {p: mine[p]["host_ops"] for p in PHASES}
    for p in PHASES:
        assert mine[p]["host_ops"] <= PRELU_BUDGET[p], summary
        assert mine[p]["layer_ops"] == 0, summary
