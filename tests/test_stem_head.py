"""The fused stem (norm0 -> relu0 -> pool0) and head (norm5 -> ReLU -> average), and the block backward that
accumulates into its incoming gradient: exact against torchvision, the memory they save, and where they fall
back to the modules."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd.graph import saved_tensors_hooks
from torchvision.models.densenet import _DenseBlock as TorchvisionBlock
from helpers import TINY, assert_lockstep, randomize_affine, twins

import densenet_fused
from densenet_fused import stem_head
from densenet_fused.ops.channel_stats import channel_stats_reference

SHAPE = (2, 3, 35, 39)


def _twins(norm_kwargs=None, channels_last=False):
    ours, theirs = twins(norm_kwargs=norm_kwargs, **TINY)
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ours.to(memory_format=fmt), theirs.to(memory_format=fmt)


@pytest.mark.parametrize(
    "case", ["default", "channels_last", "momentum_none", "no_running_stats", "eval", "no_affine"]
)
def test_model_trains_like_torchvision_float64(case):
    norm_kwargs = {"momentum_none": dict(momentum=None), "no_running_stats": dict(track_running_stats=False),
                   "no_affine": dict(affine=False)}.get(case)  # fmt: skip
    ours, theirs = _twins(norm_kwargs, channels_last=case == "channels_last")
    assert stem_head.fusable(ours.features, 2) == (True, True)
    torch.manual_seed(1)
    x = torch.randn(SHAPE, dtype=torch.float64)
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if case == "eval":  # non-trivial running statistics, then frozen BatchNorm
        with torch.no_grad():
            ours(x * 2 + 1), theirs(x * 2 + 1)
        ours.eval(), theirs.eval()
    assert_lockstep(ours, theirs, x, torch.tensor([1, 4]), steps=2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spatial_dims,shape", [(1, (2, 3, 41)), (3, (2, 3, 15, 17, 13))])
def test_1d_and_3d_match_the_modules(spatial_dims, shape):
    torch.manual_seed(0)
    fused = randomize_affine(densenet_fused.DenseNet(**TINY, spatial_dims=spatial_dims).double())
    plain = copy.deepcopy(fused)
    plain.features.register_forward_hook(lambda *args: None)  # a hook on features: the modules run
    assert stem_head.fusable(fused.features, spatial_dims) == (True, True)
    assert stem_head.fusable(plain.features, spatial_dims) == (False, False)
    x = torch.randn(shape, dtype=torch.float64)
    for step in range(2):
        results = []
        for model in (fused, plain):
            model.zero_grad()
            inp = x.clone().requires_grad_()
            out = model(inp)
            out.square().sum().backward()
            results.append([out, inp.grad, *[p.grad for p in model.parameters()], *model.buffers()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _stem_modules(channels=8):
    return randomize_affine(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_stem_and_head_under_autocast_match_the_modules(channels_last):
    """bf16 input (conv0's output, the last block's buffer) and fp32 statistics, as BatchNorm gets them under CPU
    autocast: the same dtypes, values within bf16 rounding, the same fp32 running stats."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 17, 19).to(torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for fused_fn, modules in (
        (stem_head.norm_relu_max_pool, _stem_modules()),
        (stem_head.norm_relu_mean, randomize_affine(nn.Sequential(nn.BatchNorm2d(8)))),
    ):
        twin = copy.deepcopy(modules)
        x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = fused_fn(x_fused, modules[0])
            plain = twin(x_plain)
            if fused_fn is stem_head.norm_relu_mean:
                plain = torch.flatten(F.adaptive_avg_pool2d(F.relu(plain), 1), 1)
        assert fused.dtype == plain.dtype == torch.bfloat16
        torch.testing.assert_close(fused, plain, rtol=2**-7, atol=2**-7)
        weights = torch.randn(fused.shape)
        (fused.float() * weights).sum().backward()
        (plain.float() * weights).sum().backward()
        assert x_fused.grad.dtype == torch.bfloat16 and x_fused.grad.stride() == x.stride()
        torch.testing.assert_close(x_fused.grad, x_plain.grad, rtol=2**-6, atol=2**-6)
        for p, q in zip(modules.parameters(), twin.parameters()):
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, q.grad, rtol=2**-6, atol=2**-6)
        for a, b in zip(modules.buffers(), twin.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _saved(fn, *args):
    """(output, the tensors autograd saves while ``fn(*args)`` runs)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def _large(saved, channels):
    """The saved tensors larger than a per-channel vector."""
    return [t for t in saved if t.numel() > channels]


@pytest.mark.parametrize("train", [True, False])
def test_stem_and_head_save_only_their_input(train):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 17, 19, dtype=torch.float64, requires_grad=True)
    stem, norm5 = _stem_modules().double().train(train), nn.BatchNorm2d(8).double().train(train)
    for fn, plain in ((lambda x: stem_head.norm_relu_max_pool(x, stem[0]), stem),
                      (lambda x: stem_head.norm_relu_mean(x, norm5), lambda x: F.relu(norm5(x)).mean((2, 3)))):  # fmt: skip
        _, fused_saved = _saved(fn, x)
        large = _large(fused_saved, 8)
        assert len(large) == 1 and large[0].data_ptr() == x.data_ptr()
        assert sum(t.nbytes for t in fused_saved) <= x.nbytes + 4 * 8 * x.element_size()
        _, plain_saved = _saved(plain, x)  # the modules keep norm's output (and the pool's indices) too
        assert sum(t.nbytes for t in _large(plain_saved, 8)) > x.nbytes


def test_model_saves_conv0_output_and_last_buffer_for_its_ends():
    """Nothing of the stem's or the head's shape is saved but conv0's output and the last block's buffer: not
    norm0's, relu0's or norm5's output, and no max-pool indices."""
    model, _ = _twins()
    kept = {}
    model.features.conv0.register_forward_hook(lambda m, args, out: kept.update(conv0=out))
    model.features.denseblock2.register_forward_hook(lambda m, args, out: kept.update(buffer=out))
    assert stem_head.fusable(model.features, 2) == (True, True)  # hooks elsewhere keep the ends fused
    _, saved = _saved(model, torch.randn(SHAPE, dtype=torch.float64))
    assert not any(t.dtype == torch.int64 for t in saved)
    for name in ("conv0", "buffer"):
        same_shape = [t for t in saved if t.shape == kept[name].shape]
        storage = kept[name].untyped_storage().data_ptr()
        assert same_shape and all(t.untyped_storage().data_ptr() == storage for t in same_shape), name


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["bn_relu_max_pool", "bn_relu_mean"])
def test_ops_gradcheck_gradgradcheck_and_opcheck(name, training):
    op = getattr(stem_head, name)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fixed_mean, fixed_var = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def run(x, gamma, beta):
        with torch.no_grad():
            mean, var = channel_stats_reference(x) if training else (fixed_mean, fixed_var)
        return op(x, mean, torch.rsqrt(var + 1e-5), gamma, beta, training)

    assert gradcheck(run, (x, gamma, beta), fast_mode=True)
    assert gradgradcheck(run, (x, gamma, beta), fast_mode=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        args = (x.detach().to(memory_format=layout).requires_grad_(), fixed_mean, fixed_var, gamma, beta, training)
        torch.library.opcheck(op, args)


def test_unfusable_ends_run_the_modules():
    """Hooks, another norm or activation, edited features: those modules run, with the same results."""
    reference, _ = _twins()
    x = torch.randn(SHAPE, dtype=torch.float64)
    expected = reference(x)
    calls = []

    def hooked(model):
        model.features.norm0.register_forward_hook(lambda *args: calls.append("norm0"))
        model.features.norm5.register_forward_pre_hook(lambda *args: calls.append("norm5"))

    def appended(model):
        model.features.add_module("identity", nn.Identity())

    def group_norm(model):
        model.features.norm0 = nn.GroupNorm(2, 8).double()
        model.features.norm5 = nn.GroupNorm(2, model.features.norm5.num_features).double()

    for edit, fused in ((hooked, (False, False)), (appended, (True, False)), (group_norm, (False, False))):
        model = copy.deepcopy(reference)
        edit(model)
        assert stem_head.fusable(model.features, 2) == fused, edit.__name__
        out = model(x)
        if edit is not group_norm:
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert calls == ["norm0", "norm5"]
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert stem_head.fusable(reference.features, 2) == (False, False)
    finally:
        handle.remove()
    model = copy.deepcopy(reference)
    model.features.relu0 = nn.ReLU6()
    assert stem_head.fusable(model.features, 2) == (False, True)
    traced = {node.target for node in torch.fx.symbolic_trace(reference).graph.nodes if node.op == "call_module"}
    assert {"features.norm0", "features.relu0", "features.pool0", "features.norm5"} <= traced  # fx: the modules


def test_compiled_training_over_several_batch_sizes_matches_torchvision():
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    ours, theirs = _twins()
    compiled = torch.compile(ours, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    for batch, size in [(2, 32), (3, 35), (5, 40)]:
        x = torch.randn(batch, 3, size, size + 1, dtype=torch.float64)
        assert_lockstep(compiled, theirs, x, torch.randint(5, (batch,)), steps=1, rtol=1e-9, atol=1e-9)
        ours.train(), theirs.train()
    assert "densenet_fused.bn_relu_max_pool.default" in graphs[0] and "densenet_fused.bn_relu_mean.default" in graphs[0]
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# The block accumulates into its incoming gradient only where nothing else can see that tensor.


def _block_twins(channels_last=False):
    """A fused block and torchvision's, with the same weights, and an input."""
    torch.manual_seed(0)
    ours = randomize_affine(densenet_fused.DenseBlock(2, 8, 2, 4, 0.0).double())
    theirs = TorchvisionBlock(2, 8, 2, 4, 0.0).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    if channels_last:
        ours, theirs, x = (t.to(memory_format=torch.channels_last) for t in (ours, theirs, x))
    return ours, theirs, x


def _assert_block_grads_match(ours, theirs, x, backward):
    """``backward(block(input))`` for both: the input and parameter gradients must agree."""
    grads = []
    for block in (ours, theirs):
        block.zero_grad()
        inp = x.clone().requires_grad_()
        backward(block(inp))
        grads.append([inp.grad, *[p.grad for p in block.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_block_reuses_a_gradient_no_one_else_holds(channels_last):
    ours, theirs, x = _block_twins(channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    weights = torch.randn(2, 16, 5, 6, dtype=torch.float64).to(memory_format=fmt)  # a gradient in the buffer's layout
    pointers = {}
    inp = x.clone().requires_grad_()
    inp.register_hook(lambda g: pointers.update(input=g.data_ptr()))
    out = ours(inp)
    out.register_hook(lambda g: pointers.update(output=g.data_ptr()))
    (out * weights).sum().backward()
    assert pointers["input"] == pointers["output"]  # the input channels' gradient is a slice of it: no copy
    _assert_block_grads_match(ours, theirs, x, lambda out: (out * weights).sum().backward())


def test_block_never_writes_into_a_gradient_others_can_see():
    ours, theirs, x = _block_twins()
    torch.manual_seed(1)
    grad = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    kept = grad.clone()
    # the caller's own gradient, which it keeps
    _assert_block_grads_match(ours, theirs, x, lambda out: out.backward(grad))
    _assert_block_grads_match(ours, theirs, x, lambda out: torch.autograd.backward([out], [grad]))
    assert torch.equal(grad, kept)
    # an expanded (stride-0) gradient, and one in another layout
    _assert_block_grads_match(ours, theirs, x, lambda out: out.sum().backward())

    def channels_last(out):
        out.register_hook(lambda g: g.contiguous(memory_format=torch.channels_last))
        (out * kept).sum().backward()

    _assert_block_grads_match(ours, theirs, x, channels_last)
    # a gradient a hook keeps, or keeps the memory of
    for keep in (lambda g: g, lambda g: g.detach()):
        stash = []

        def stashed(out):
            out.register_hook(lambda g: stash.append((keep(g), g.clone())))
            (out * kept).sum().backward()

        _assert_block_grads_match(ours, theirs, x, stashed)
        assert len(stash) == 2 and all(torch.equal(g, copy) for g, copy in stash)
    # a weak reference to it, followed once the block's node has run
    for block in (ours, theirs):
        seen = []
        out = block(x.clone().requires_grad_())
        out.register_hook(lambda g: seen.append((weakref.ref(g), g.clone())))
        out.grad_fn.register_hook(lambda *grads: seen.append(seen[0][0]()))
        (out * kept).sum().backward()
        assert seen[1] is None or torch.equal(seen[1], seen[0][1])
    # a gradient autograd also hands to another node, which runs after the block's
    other = torch.randn(2, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    for block in (ours, theirs):
        other.grad = None
        z = other.sin()  # recorded before the block, so the block's node runs first
        ((block(x) + z) * kept).sum().backward()
        torch.testing.assert_close(other.grad, other.detach().cos() * kept, rtol=1e-12, atol=1e-12)


def test_eager_forward_with_compiled_autograd_backward():
    """Compiled autograd cannot run the in-place block backward (boxed gradients): a forward that runs while it is
    on uses the copying one, so torch's compiled-autograd backward of an eager forward still works."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    ours, theirs, x = _block_twins()
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        _assert_block_grads_match(ours, theirs, x, lambda out: (out * out).sum().backward())
    torch._dynamo.reset()


@pytest.mark.parametrize("spatial_dims,shape", [(2, (3, 3, 37, 35)), (3, (2, 3, 19, 18, 21))])
@pytest.mark.parametrize("norm", [("instance", {}), ("instance", {"affine": True, "track_running_stats": True})])
def test_instance_norm_ends_are_fused_and_match_the_modules(norm, spatial_dims, shape):
    """Instance-norm stem and head (MONAI's 3-D networks) run fused, with per-sample statistics, exactly as the
    modules do: two training steps, then eval."""
    torch.manual_seed(0)
    ours = randomize_affine(densenet_fused.DenseNet(**TINY, norm=norm, spatial_dims=spatial_dims).double())
    assert stem_head.fusable(ours.features, spatial_dims) == (True, True)
    modules = copy.deepcopy(ours)
    modules.features.norm0.register_forward_hook(lambda *args: None)  # hooks: the module path
    modules.features.norm5.register_forward_hook(lambda *args: None)
    assert stem_head.fusable(modules.features, spatial_dims) == (False, False)
    x = torch.randn(shape, dtype=torch.float64)
    assert_lockstep(ours, modules, x, torch.randint(TINY["num_classes"], (shape[0],)), steps=2, rtol=1e-10, atol=1e-10)
