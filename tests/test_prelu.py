"""PReLU (MONAI's ``act="prelu"``) in the fused blocks, transitions, stem and head: two calls of the ReLU kernels
each (``ops.prelu``), checked in float64 against MONAI's network and against the modules, with gradcheck and
gradgradcheck, compiled, and for its memory.  The kernel matrix's block test (tests/test_kernels.py) runs the
PReLU block on every backend, layout and rank; tests/test_double_backward.py its gradgradcheck."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from helpers import (
    MONAI_TINY,
    assert_as_accurate_as_torchvision,
    assert_compiled_lockstep,
    assert_lockstep,
    randomize_affine,
)

import densenet_fused
from densenet_fused import stem_head
from densenet_fused.block import unfused
from densenet_fused.ops.channel_stats import channel_stats_reference

monai_nets = pytest.importorskip("monai.networks.nets")

SHAPES = {1: (2, 2, 67), 2: (2, 2, 35, 39), 3: (2, 2, 19, 21, 18)}
PRELU = ("prelu", {"num_parameters": 1, "init": 0.25})  # MONAI's own test's spec
NORMS = {"batch": "batch", "instance": ("instance", {"affine": True})}


def _monai(spatial_dims, cls=None, **config):
    torch.manual_seed(0)
    cls = cls or monai_nets.DenseNet
    net = cls(spatial_dims=spatial_dims, in_channels=2, out_channels=3, **{**MONAI_TINY, "act": PRELU, **config})
    return randomize_affine(net.double())  # slopes of both signs


def _ours(theirs, spatial_dims, **config):
    ours = densenet_fused.DenseNet.from_monai_config(spatial_dims, 2, 3, **{**MONAI_TINY, "act": PRELU, **config})
    ours = ours.double()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # MONAI's keys, relu*.weight and class_layers.relu too
    return ours


def _assert_all_fused(model, x):
    """Every block and transition, the stem and the head take their fused paths on x."""
    assert stem_head.fusable(model.features, model.spatial_dims, model.relu5) == (True, True)
    modules = [m for m in model.modules() if isinstance(m, (densenet_fused.DenseBlock, densenet_fused.Transition))]
    assert modules and all(unfused.runs_fused(m, x) for m in modules)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_prelu_network_trains_like_monai(spatial_dims, norm):
    """MONAI's PReLU DenseNet and ours with its state_dict: outputs, gradients (the slopes' included) and state
    over two training steps, then eval."""
    theirs = _monai(spatial_dims, norm=NORMS[norm])
    ours = _ours(theirs, spatial_dims, norm=NORMS[norm])
    x = torch.randn(SHAPES[spatial_dims], dtype=torch.float64)
    _assert_all_fused(ours, x)
    assert_lockstep(ours, theirs, x, torch.tensor([1, 2]), steps=2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", ["DenseNet", "DenseNet121"])
def test_prelu_networks_convert_and_checkpoints_go_both_ways(cls):
    """convert() keeps MONAI's PReLU modules (the head's becomes ``relu5``) and trains like MONAI; our state_dict
    loads into MONAI's network strictly, with MONAI's keys in MONAI's order."""
    theirs = _monai(2, getattr(monai_nets, cls))
    converted = densenet_fused.convert(copy.deepcopy(theirs))
    assert type(converted) is densenet_fused.DenseNet and type(converted.relu5) is nn.PReLU
    expected = densenet_fused.DenseNet.from_monai_config(2, 2, 3, **MONAI_TINY, act=PRELU)
    assert [(n, type(m)) for n, m in converted.named_modules()] == [(n, type(m)) for n, m in expected.named_modules()]
    state = densenet_fused.monai_state_dict(converted)
    assert list(state) == list(theirs.state_dict())
    back = _monai(2, getattr(monai_nets, cls))
    back.load_state_dict(state, strict=True)
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    assert_lockstep(converted, theirs, x, torch.tensor([0, 2]), steps=2, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), _monai(2, getattr(monai_nets, cls)).eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [None, dict(device_type="cpu", dtype=torch.bfloat16)], ids=["float32", "bf16"])
def test_prelu_network_is_as_accurate_as_monai(autocast):
    """float32, and bf16 under autocast: per quantity, the median over 5 seeds of our error against the float64
    truth within ROUNDING_SPREAD of MONAI's own in the same precision."""

    def make(seed):
        torch.manual_seed(seed)
        theirs = monai_nets.DenseNet(spatial_dims=2, in_channels=2, out_channels=3, **MONAI_TINY, act=PRELU)
        theirs = randomize_affine(theirs)
        ours = densenet_fused.DenseNet.from_monai_config(2, 2, 3, **MONAI_TINY, act=PRELU)
        ours.load_state_dict(theirs.state_dict())
        x, target = torch.randn(4, 2, 35, 39), torch.randint(3, (4,))
        return ours, theirs, x, lambda out: F.cross_entropy(out, target)

    assert_as_accurate_as_torchvision(make, autocast)


def test_compiled_prelu_network_matches_eager_over_batch_sizes():
    torch._dynamo.reset()
    try:
        theirs = _monai(2)
        eager = _ours(theirs, 2)
        model = copy.deepcopy(eager)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_compiled_lockstep(compiled, model, eager, [(2, 20, 18), (3, 20, 18), (2, 20, 18)], 3, in_channels=2)
    finally:
        torch._dynamo.reset()


def _per_channel(module):
    """``module`` with each activation a PReLU of one random slope per channel (``num_parameters``)."""
    for m in [module, *module.children()]:
        for name, norm in (("relu", "norm"), ("relu1", "norm1"), ("relu2", "norm2")):
            if name in m._modules:
                setattr(m, name, nn.PReLU(getattr(m, norm).num_features))
    return randomize_affine(module.double())


def _functional(module):
    """``module`` as a function of (input, *parameters), and its parameters, for gradcheck."""
    names = [name for name, _ in module.named_parameters()]

    def run(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))

    return run, [p.detach().clone().requires_grad_() for p in module.parameters()]


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_per_channel_slopes_match_the_modules(train, memory_efficient):
    """A block and a transition with a slope per channel, fused against their modules (``block.unfused``), and
    gradcheck of their first-order (kernel) backward."""
    torch.manual_seed(0)
    block = _per_channel(densenet_fused.DenseBlock(3, 4, 2, 3, 0.0, memory_efficient))
    transition = _per_channel(densenet_fused.Transition(13, 6))
    for module, modules in ((block, unfused.dense_block), (transition, unfused.transition)):
        module.train(train)
        reference = copy.deepcopy(module)
        x = torch.randn(3, module.norm.num_features if module is transition else 4, 6, 7, dtype=torch.float64)
        results = []
        for run, params in ((module, module), (lambda inp: modules(reference, inp), reference)):
            inp = x.clone().requires_grad_()
            out = run(inp)
            grads = torch.autograd.grad(out, [inp, *params.parameters()], torch.cos(out))
            results.append([out, *grads, *params.buffers()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        run, params = _functional(module.eval())
        assert gradcheck(run, (x.clone().requires_grad_(), *params), fast_mode=True), type(module).__name__


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("slopes", [1, 3])
def test_stem_op_gradcheck_gradgradcheck_and_opcheck(slopes, training):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    slope = (torch.rand(slopes, dtype=torch.float64) * 2 - 1).requires_grad_()
    fixed_mean, fixed_var = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def run(x, gamma, beta, slope):
        with torch.no_grad():
            mean, var = channel_stats_reference(x) if training else (fixed_mean, fixed_var)
        return stem_head.bn_prelu_max_pool(x, mean, torch.rsqrt(var + 1e-5), gamma, beta, slope, training)

    assert gradcheck(run, (x, gamma, beta, slope), fast_mode=True)
    assert gradgradcheck(run, (x, gamma, beta, slope), fast_mode=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        inp = x.detach().to(memory_format=layout).requires_grad_()
        torch.library.opcheck(stem_head.bn_prelu_max_pool, (inp, fixed_mean, fixed_var, gamma, beta, slope, training))


class _End(nn.Module):
    """A norm and a PReLU with a slope per channel, run by one of the network's fused ends."""

    def __init__(self, end):
        super().__init__()
        self.norm, self.act, self.end = nn.BatchNorm2d(3), nn.PReLU(3), end

    def forward(self, x):
        return self.end(x, self.norm, self.act)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("end", [stem_head.norm_relu_max_pool, stem_head.norm_relu_mean], ids=["stem", "head"])
def test_fused_ends_gradcheck_and_gradgradcheck(end, train):
    """The stem's norm0 -> PReLU -> max pool and the head's norm5 -> PReLU -> average, as the network runs them."""
    torch.manual_seed(0)
    module = randomize_affine(_End(end).double())
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    if not train:
        module.norm(x.detach())  # running statistics
    run, params = _functional(module.train(train))
    assert gradcheck(run, (x, *params), fast_mode=True)
    assert gradgradcheck(run, (x, *params), fast_mode=True)


def test_other_activations_raise_or_run_as_modules():
    """Building with another activation raises ValueError naming the two; one put into a fused module by hand
    runs as its modules (torchvision's semantics), with a warning."""
    builds = [
        lambda: densenet_fused.DenseNet(act="gelu"),
        lambda: densenet_fused.DenseBlock(1, 2, 1, 2, 0.0, act="gelu"),
        lambda: densenet_fused.DenseLayer(2, 2, 1, 0.0, act="gelu"),
        lambda: densenet_fused.Transition(2, 1, act="gelu"),
    ]
    for build in builds:
        with pytest.raises(ValueError, match=r"apply act='relu' and act='prelu' .*got act='gelu'"):
            build()
    torch.manual_seed(0)
    block = randomize_affine(densenet_fused.DenseBlock(2, 3, 2, 2, 0.0, act="prelu").double())
    block.denselayer2.relu2 = nn.ELU()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="neither nn.ReLU nor nn.PReLU"):
        out = block(x)
    torch.testing.assert_close(out, unfused.dense_block(block, x), rtol=0, atol=0)
    assert not torch.equal(out, unfused.dense_block(_per_channel(copy.deepcopy(block)), x))  # ELU is applied


def _saved_storages(module, x) -> dict:
    """{storage pointer: (bytes, shape)} of the tensors autograd saves in one forward of ``module``."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_prelu_block_saves_what_a_relu_block_saves_and_its_slopes(memory_efficient):
    """Memory stays linear in depth: a PReLU block keeps the same buffers as a ReLU block (the activation is
    recomputed in backward), plus each layer's two slopes."""
    layers = 4

    def block(act):
        torch.manual_seed(0)
        return densenet_fused.DenseBlock(layers, 3, 2, 2, 0.0, memory_efficient, act=act).double()

    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    relu, prelu = (sum(size for size, _ in _saved_storages(block(act), x).values()) for act in ("relu", "prelu"))
    assert prelu - relu == layers * 2 * 8


def test_prelu_network_saves_no_activation_a_relu_network_does_not():
    """Across the whole network (stem, blocks, transitions, head): the saved storages of tensors with spatial
    dims are the same as the ReLU network's (each end's two calls save the same input)."""
    x = torch.randn(2, 2, 35, 39, dtype=torch.float64, requires_grad=True)
    spatial = []
    for act in ("relu", PRELU):
        torch.manual_seed(0)
        model = densenet_fused.DenseNet.from_monai_config(2, 2, 3, **MONAI_TINY, act=act).double()
        saved = _saved_storages(model, x).values()
        spatial.append(sorted(shape for _, shape in saved if len(shape) > 2 and shape[0] == x.size(0)))
    assert spatial[0] and spatial[0] == spatial[1]
