"""Instance norm in the fused primitives, blocks and transitions (``norm="instance"``).

Its statistics are per sample and channel ([N, C]).  The references compute them directly; the C++ and
Triton kernels, written for per-channel statistics, run them once per sample (a sample with its own
statistics is a batch of one; the kernel matrix, tests/test_kernels.py, checks them against the reference).
Checked here in float64 against torch's own F.instance_norm composition, on each kernel backend against torch
modules, through torch.compile over several batch sizes, under double backward and for what backward saves.
The whole network is checked against MONAI's instance-norm DenseNet in tests/test_monai.py and
tests/peer/test_monai_densenet.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck
from helpers import TINY_2X2, assert_compiled_lockstep, assert_lockstep, randomize_affine

from densenet_fused.ops._backend import config
import densenet_fused
from densenet_fused import ops
from densenet_fused.ops import _triton as tr
from densenet_fused.ops.channel_stats import instance_stats

EPS = 1e-5
TRITON = tr.TRITON_AVAILABLE and (torch.cuda.is_available() or tr.interpreting())
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs triton (GPU or interpreter)"))]
SPATIAL = [(6, 5), (3, 4, 5), (9,)]


def _truth(name, x, gamma, beta, weight):
    """What the primitive ``name`` computes, written with torch's instance norm."""
    z = F.relu(F.instance_norm(x, weight=gamma, bias=beta, eps=EPS))
    if name == "bn_relu":
        return z
    y = torch.einsum("bc,nc...->nb...", weight, z)
    if name == "bn_relu_pool_conv1x1":
        y = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[y.dim() - 3](y, 2)
    return y


def _problem(name, spatial, layout, dtype, seed=0):
    """x (a channel prefix of a larger buffer), gamma, beta, weight (None for bn_relu), all requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    buf = torch.randn(3, 10, *spatial, generator=generator, dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        buf = buf.movedim(1, -1).contiguous().movedim(-1, 1)
    x = buf[:, :7].to(dtype).requires_grad_()
    gamma = (torch.rand(7, generator=generator, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    beta = torch.randn(7, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    weight = None if name == "bn_relu" else torch.randn(4, 7, generator=generator, dtype=torch.float64).to(dtype)
    return x, gamma, beta, None if weight is None else weight.requires_grad_()


def _run(name, x, gamma, beta, weight, seed=1):
    """(output, grads of x, gamma, beta[, weight]) of the primitive with x's instance statistics."""
    with torch.no_grad():
        mean, var = instance_stats(x)
    params = [gamma, beta] + ([] if weight is None else [weight])
    out = getattr(ops, name)(x, mean, torch.rsqrt(var + EPS), *params, True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return [out, *torch.autograd.grad(out, [x, *params], grad)]


PRIMITIVES = ["bn_relu", "bn_relu_conv1x1", "bn_relu_pool_conv1x1"]


@pytest.mark.parametrize("spatial", SPATIAL, ids=str)
@pytest.mark.parametrize("name", PRIMITIVES)
def test_reference_is_torch_instance_norm(name, spatial, monkeypatch):
    monkeypatch.setattr(config, "backend", "reference")
    x, gamma, beta, weight = _problem(name, spatial, "contiguous", torch.float64)
    ours = _run(name, x, gamma, beta, weight)
    truth = _truth(name, x, gamma, beta, weight)
    params = [gamma, beta] + ([] if weight is None else [weight])
    grad = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = [truth, *torch.autograd.grad(truth, [x, *params], grad)]
    for i, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_on_the_kernels_matches_torch_modules(backend, layout):
    """The network with instance norm, on the C++ or Triton kernels (guarded: no reference fallback), against
    the same network run as torch modules, in float64: two training steps, then eval."""
    torch.manual_seed(0)
    ours = randomize_affine(densenet_fused.DenseNet(**TINY_2X2, norm=("instance", {"affine": True})).double())
    theirs = _torch_twin(ours)
    ours.load_state_dict(theirs.state_dict())
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, theirs = ours.to(memory_format=memory_format), theirs.to(memory_format=memory_format)
    x = torch.randn(2, 3, 32, 33, dtype=torch.float64).to(memory_format=memory_format)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 4]), steps=2, rtol=1e-9, atol=1e-9)


def _torch_twin(model):
    """``model`` with every fused block, layer and transition run as plain torch modules (torchvision's
    layers, which call the norm modules themselves): the truth for any norm."""
    from torchvision.models import densenet as tv

    twin = copy.deepcopy(model)
    for name, module in list(twin.features.named_children()):
        if isinstance(module, densenet_fused.DenseBlock):
            plain = tv._DenseBlock(0, 1, 1, 1, 0.0)
            for layer_name, layer in module.named_children():
                torch_layer = tv._DenseLayer(1, 1, 1, layer.drop_rate)
                for part in ("norm1", "conv1", "norm2", "conv2"):
                    setattr(torch_layer, part, getattr(layer, part))
                plain.add_module(layer_name, torch_layer)
            twin.features.add_module(name, plain)
        elif isinstance(module, densenet_fused.Transition):
            plain = tv._Transition(1, 1)
            plain.norm, plain.conv = module.norm, module.conv
            twin.features.add_module(name, plain)
    return twin.train(model.training)


@pytest.mark.parametrize("norm", [("instance", {}), ("instance", {"affine": True, "track_running_stats": True})])
def test_compiled_training_over_several_batch_sizes_matches_eager(norm):
    """Instance norm works for batch 1 too; every step of the compiled model matches torch's modules."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = randomize_affine(densenet_fused.DenseNet(**TINY_2X2, norm=norm).double())
    theirs = _torch_twin(ours)
    ours.load_state_dict(theirs.state_dict())  # separate tensors for each
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    shapes = [(2, 32, 33), (1, 32, 33), (3, 40, 41), (4, 48, 49)]
    assert_compiled_lockstep(compiled, ours, theirs, shapes, TINY_2X2["num_classes"])
    torch._dynamo.reset()


def test_inductor_instance_norm_model_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = randomize_affine(densenet_fused.DenseNet(**TINY_2X2, norm=("instance", {"affine": True})).double())
    theirs = _torch_twin(ours)
    ours.load_state_dict(theirs.state_dict())
    compiled = torch.compile(ours, backend="inductor", fullgraph=True)
    assert_compiled_lockstep(compiled, ours, theirs, [(2, 32, 33), (3, 32, 33)], TINY_2X2["num_classes"])
    torch._dynamo.reset()


def _functional(module):
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return (lambda x, *values: torch.func.functional_call(module, dict(zip(names, values)), (x,))), params


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_instance_norm_block_and_transition_gradgradcheck(memory_efficient):
    torch.manual_seed(0)
    norm = ("instance", {"affine": True})
    modules = [densenet_fused.DenseBlock(2, 3, 1, 2, 0.0, memory_efficient, norm=norm), densenet_fused.Transition(3, 2, norm=norm)]
    for module in modules:
        run, params = _functional(randomize_affine(module.double()))
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        assert gradgradcheck(run, (x, *params), fast_mode=True), type(module).__name__


def test_instance_norm_block_saves_only_its_buffer():
    """Backward keeps the buffer and the [N, C] statistics, nothing per layer (memory linear in depth)."""
    block = densenet_fused.DenseBlock(6, 16, 4, 8, 0.0, norm="instance")
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    stats = 4 * (2 * 64 + 6 * 2 * 32) * 4  # mean, var of buffer and bottlenecks, per sample, float32, generous
    assert sum(saved.values()) <= out.numel() * out.element_size() + params + stats, saved


def test_single_spatial_element_raises_like_instance_norm():
    model = densenet_fused.DenseNet(**TINY_2X2, norm="instance")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        model(torch.randn(4, 3, 8, 8))  # the second block sees 1x1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.features.denseblock2(torch.randn(1, model.features.denseblock2.denselayer1.norm1.num_features, 2, 1))


@pytest.mark.parametrize("norm", ["group", ("layer", {}), 3])
def test_other_norms_raise(norm):
    with pytest.raises(ValueError, match="norm='batch' and norm='instance'"):
        densenet_fused.DenseNet(**TINY_2X2, norm=norm)
