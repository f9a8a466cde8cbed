"""CUDA graphs as a way to train: ``torch.compile(model, mode="reduce-overhead")`` and
``torch.cuda.make_graphed_callables`` train exactly like eager, over several steps: outputs, input and parameter
gradients, and BatchNorm running statistics (``num_batches_tracked`` and ``momentum=None`` included), with
dropout drawing its masks from the graph-safe RNG.

What a CPU can check runs everywhere: no densenet_fused op is one inductor refuses to put in a CUDA graph,
the traced training graphs hold nothing that makes inductor skip CUDA graphs, a training step calls no op
that synchronizes with the host, and reduce-overhead on CPU tensors (where inductor skips the graphs but
compiles the same way) trains like eager. What needs a GPU is marked ``cuda`` (gpu_check.py runs those, and
times the graph-replayed step)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func
from torch.profiler import ProfilerActivity, profile
from helpers import TINY_2X2, randomize_affine

import densenet_fused

CUDA = torch.cuda.is_available()
TINY = dict(TINY_2X2, drop_rate=0.2)
# Ops that wait for the device: reading a value on the host, or producing a shape that depends on the data.
SYNCHRONIZING = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal",
    "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_consecutive",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(dtype=torch.float64, device="cpu", seed=0, memory_efficient=True):
    """TINY with dropout, random affine parameters, and momentum=None (a cumulative average) on every other
    BatchNorm; the rest keep torch's 0.1."""
    torch.manual_seed(seed)
    model = randomize_affine(densenet_fused.DenseNet(**TINY, memory_efficient=memory_efficient))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms[1::2]:
        norm.momentum = None
    return model.to(device, dtype).train()


def assert_trains_like(run, model, eager, x, target, steps=3, rtol=1e-9, atol=1e-9, seed=100):
    """``steps`` SGD steps of ``run`` (the graphed or compiled ``model``) and of ``eager``, each step from the same
    RNG seed (the same dropout masks), comparing output, input grad, parameter grads and the whole state_dict."""
    for step in range(steps):
        results = []
        for call, module in ((run, model), (eager, eager)):
            torch.manual_seed(seed + step)
            module.zero_grad(set_to_none=True)
            inp = x.detach().clone().requires_grad_()
            out = call(inp)
            F.cross_entropy(out, target).backward()
            results.append((out.detach().clone(), inp.grad.clone(), [p.grad.clone() for p in module.parameters()]))
            with torch.no_grad():
                for p in module.parameters():
                    p -= 0.1 * p.grad
        (out, gx, grads), (out_e, gx_e, grads_e) = results
        torch.testing.assert_close(out, out_e, rtol=rtol, atol=atol, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(gx, gx_e, rtol=rtol, atol=atol, msg=lambda m: f"step {step} input grad: {m}")
        for (name, _), g, g_e in zip(model.named_parameters(), grads, grads_e):
            torch.testing.assert_close(g, g_e, rtol=rtol, atol=atol, msg=lambda m: f"step {step} grad {name}: {m}")
        for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"step {step} {name}: {m}")
    tracked = [int(b) for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
    assert tracked and set(tracked) == {steps}, tracked


# ---------------------------------------------------------------------------------------------------
# On any machine


def test_no_op_is_tagged_cudagraph_unsafe():
    """Inductor keeps an op out of CUDA graphs when it carries ``torch.Tag.cudagraph_unsafe`` or is in its list
    of forbidden ops (host syncs such as ``_local_scalar_dense``): none of ours is either."""
    from torch._inductor.utils import FORBIDDEN_CUDAGRAPH_OPS

    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("densenet_fused::")]
    assert {"dense_block", "dense_block_backward", "channel_stats", "bn_relu_pool_conv1x1"} <= set(names), names
    for name in names:
        packet = getattr(torch.ops.densenet_fused, name)
        for overload in packet.overloads():
            op = getattr(packet, overload)
            assert torch.Tag.cudagraph_unsafe not in op.tags, str(op)
            assert str(op) not in FORBIDDEN_CUDAGRAPH_OPS, str(op)


def test_training_graphs_have_no_node_that_keeps_cuda_graphs_off():
    """The forward and backward graphs torch.compile traces for a training step (dropout, momentum=None) hold no
    node for which inductor's own check (``get_first_incompatible_cudagraph_node``) refuses CUDA graphs: no
    unsafe or forbidden op, no data-dependent shape."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    model = tiny_model()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    x, target = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    F.cross_entropy(compiled(x), target).backward()
    assert len(graphs) == 2  # forward, backward
    for gm in graphs:
        assert get_first_incompatible_cudagraph_node(gm) is None, gm.code
        assert "densenet_fused.dense_block" in gm.code


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_training_step_calls_no_synchronizing_op(backend):
    """A training step and an eval forward (the Triton path interpreted on CPU, and the C++ path) call no op that
    reads a device value on the host or has a data-dependent shape: nothing that would synchronize on a GPU or
    break a CUDA-graph capture. (gpu_check.py runs the GPU step under ``set_sync_debug_mode("error")``.)"""
    from densenet_fused.ops._backend import CPP_AVAILABLE

    if backend == "cpp" and not CPP_AVAILABLE:
        pytest.skip("the C++ extension is not built")
    from benchmarks.flags import fused_backend

    model = tiny_model(dtype=torch.float32)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    with fused_backend(backend):
        F.cross_entropy(model(x), target).backward()  # first calls (Triton's interpreter warms up) are not judged
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            model.eval()
            with torch.no_grad():
                model(x)
    names = {event.name for event in prof.events()}
    assert "densenet_fused::dense_block" in names
    assert not names & SYNCHRONIZING, sorted(names & SYNCHRONIZING)


def reduce_overhead(model):
    """``torch.compile(model, mode="reduce-overhead")``, each call marked as a new step (its CUDA graphs replay)."""
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)

    def run(inp):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(inp)

    return run


def test_reduce_overhead_on_cpu_trains_like_eager():
    """torch.compile(mode="reduce-overhead") compiles with inductor and would replay CUDA graphs; on CPU tensors
    inductor skips the graphs (and counts the skip) but compiles the same way: three steps match eager exactly,
    dropout included (``fallback_random``: inductor draws the masks with eager's RNG ops)."""
    model = tiny_model()
    eager = copy.deepcopy(model)
    x, target = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        assert_trains_like(reduce_overhead(model), model, eager, x, target)
    assert counters["inductor"]["cudagraph_skips"] >= 1  # CPU tensors: no CUDA graphs


# ---------------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_make_graphed_callables_trains_like_eager(memory_efficient, ieee_fp32):
    """The model's forward and backward captured by ``torch.cuda.make_graphed_callables``: the same kernels as
    eager, so the same numbers."""
    model = tiny_model(dtype=torch.float32, device="cuda", memory_efficient=memory_efficient)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    target = torch.tensor([1, 3], device="cuda")
    state = copy.deepcopy(model.state_dict())
    graphed = torch.cuda.make_graphed_callables(model, (x.clone().requires_grad_(),))
    # Its warm-up steps, before the capture, updated the running statistics: start both from the same state.
    model.load_state_dict(state)
    assert_trains_like(graphed, model, eager, x, target, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_reduce_overhead_trains_like_eager_with_cuda_graphs(ieee_fp32):
    """reduce-overhead on CUDA tensors: inductor replays the forward and backward from CUDA graphs (no skip)
    and four steps match eager (inductor's fused code for the ops around our blocks rounds a little
    differently)."""
    model = tiny_model(dtype=torch.float32, device="cuda")
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    target = torch.tensor([1, 3], device="cuda")
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        assert_trains_like(reduce_overhead(model), model, eager, x, target, steps=4, rtol=1e-4, atol=1e-5)
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor did not use CUDA graphs"
