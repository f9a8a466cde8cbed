"""Drop-in conformance: what users do around torchvision's DenseNet gives torchvision's results on ours, in float64.

Module hooks (their calls and the tensors they see), hook-based utilities (torch.nn.utils.prune, weight_norm),
parametrizations, empty batches and torch.func, each against torchvision (MONAI for 1-D/3-D and instance norm)
with the same weights: outputs, gradients and running statistics, or the same error.  Blocks, layers and
transitions with hooks inside run as their modules (``block.unfused``); parametrizations and a plain
functional_call stay on the fused path (``fused_only``).
"""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrizations as parametrizations
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
import torchvision
from torch import nn
from torch.func import functional_call, grad, jacrev, replace_all_batch_norm_modules_, vmap
from torchvision.models import densenet as tv
from helpers import TINY_2X2, assert_close_tensors, assert_lockstep, randomize_affine

import densenet_fused
from densenet_fused.block import unfused

TINY = dict(TINY_2X2, num_classes=3)
TOL = dict(rtol=1e-10, atol=1e-12)
UNFUSED = "runs as its modules"


def _pair(memory_efficient=True, theirs_memory_efficient=False, **config):
    """(ours, torchvision's) with the same weights and non-trivial norm affines."""
    torch.manual_seed(0)
    config = {**TINY, **config}
    ours = randomize_affine(densenet_fused.DenseNet(**config, memory_efficient=memory_efficient)).double()
    theirs = torchvision.models.DenseNet(**config, memory_efficient=theirs_memory_efficient).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _x(*shape):
    return torch.randn(*(shape or (3, 3, 16, 16)), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture
def fused_only(monkeypatch):
    """Fail if any block, layer or transition runs as its modules."""

    def fail(*args):
        raise AssertionError("ran as modules, not fused")

    for name in ("dense_block", "dense_layer", "transition"):
        monkeypatch.setattr(unfused, name, fail)


def _unfused_warnings(record) -> list[str]:
    return [str(w.message) for w in record if UNFUSED in str(w.message)]


def _tensors(value) -> list:
    """The tensors in a hook's arguments (nested tuples and lists), cloned; None kept."""
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return [value.detach().clone() if isinstance(value, torch.Tensor) else value]


def _assert_same_log(ours: list, theirs: list):
    assert [entry[:2] for entry in ours] == [entry[:2] for entry in theirs]
    for (name, kind, mine), (_, _, peer) in zip(ours, theirs):
        assert [t is None for t in mine] == [t is None for t in peer], (name, kind)
        assert_close_tensors([t for t in mine if t is not None], [t for t in peer if t is not None], what=f"{name} {kind}", **TOL)


def _step(model, x, target=None):
    """Forward and backward of a cross-entropy loss (a sum for other outputs): (output, input grad, param grads)."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, target) if target is not None else (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss.backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


def _assert_same_step(ours, theirs, *args):
    (out, gx, grads), (out_t, gx_t, grads_t) = _step(ours, *args), _step(theirs, *args)
    torch.testing.assert_close(out, out_t, **TOL)
    torch.testing.assert_close(gx, gx_t, **TOL)
    assert [g is None for g in grads] == [g is None for g in grads_t]
    assert_close_tensors([g for g in grads if g is not None], [g for g in grads_t if g is not None], what="grads", **TOL)


def _assert_same_state(ours, theirs):
    mine, peer = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(peer)
    assert_close_tensors(list(mine.values()), list(peer.values()), what="state", **TOL)


# ---------------------------------------------------------------------------------------------- module hooks

LAYER = "features.denseblock1.denselayer2"
# module: (whether the model stays fused: hooks on a block or transition itself fire around it, backward hooks).
# A norm's output is modified in place by the ReLU after it, which full backward hooks forbid (in torchvision too).
HOOKED = {
    LAYER: (False, "full"),
    f"{LAYER}.conv1": (False, "full"),
    f"{LAYER}.conv2": (False, "full"),
    f"{LAYER}.norm2": (False, None),
    "features.denseblock2.denselayer1.norm1": (False, None),
    "features.transition1.conv": (False, "full"),
    "features.transition1.pool": (False, "full"),
    "features.norm0": (False, None),
    "features.norm5": (False, None),
    "features.denseblock1": (True, "full"),
    "features.transition1": (True, "full"),
}


def _register_hooks(model, name, log, backward="full"):
    """Forward-pre and forward hooks, and backward ones ("full": full backward and backward-pre hooks; "old":
    register_backward_hook; None) on one module, each logging (name, kind, the tensors it sees)."""
    module = model.get_submodule(name)
    handles = [
        module.register_forward_pre_hook(lambda m, args: log.append((name, "pre", _tensors(args)))),
        module.register_forward_hook(lambda m, args, out: log.append((name, "forward", _tensors((args, out))))),
    ]
    if backward == "old":
        handles.append(module.register_backward_hook(lambda m, gin, gout: log.append((name, "old", _tensors((gin, gout))))))
    elif backward == "full":
        handles += [
            module.register_full_backward_pre_hook(lambda m, gout: log.append((name, "backward_pre", _tensors(gout)))),
            module.register_full_backward_hook(lambda m, gin, gout: log.append((name, "backward", _tensors((gin, gout))))),
        ]
    return handles


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("name", HOOKED)
def test_module_hooks_fire_as_on_torchvision(name, memory_efficient, recwarn):
    """Same hook calls with the same tensors, same outputs and gradients (checkpointed layers against torchvision's
    checkpointed ones: their hooks fire again in backward); one warning per unfused module; without the hooks
    the model is fused again."""
    stays_fused, backward = HOOKED[name]
    ours, theirs = _pair(memory_efficient, memory_efficient)
    logs, handles = ([], []), []
    for model, log in zip((ours, theirs), logs):
        handles += _register_hooks(model, name, log, backward)
    x, target = _x(), torch.tensor([0, 1, 2])
    for _ in range(2):
        _assert_same_step(ours, theirs, x, target)
    _assert_same_log(*logs)
    assert {kind for _, kind, _ in logs[0]} == {"pre", "forward", *(["backward_pre", "backward"] if backward else [])}
    warned = _unfused_warnings(recwarn)
    assert len(warned) == (0 if stays_fused else 1), warned  # once, for the enclosing block, transition or ends
    for handle in handles:
        handle.remove()
    assert unfused.runs_fused(ours.features.denseblock1, x) and densenet_fused.stem_head.fusable(ours.features, 2) == (True, True)


@pytest.mark.parametrize("name", [f"{LAYER}.conv1", f"{LAYER}.conv2", "features.transition1.conv"])
def test_old_style_backward_hooks_fire_as_on_torchvision(name):
    ours, theirs = _pair(False)
    logs = ([], [])
    for model, log in zip((ours, theirs), logs):
        _register_hooks(model, name, log, backward="old")
    with pytest.warns(UserWarning, match=UNFUSED):
        _assert_same_step(ours, theirs, _x(), torch.tensor([0, 1, 2]))
    _assert_same_log(*logs)


@pytest.mark.parametrize("case", ["model_forward", "model_backward", "block_backward"])
def test_global_hooks_fire_as_on_torchvision(case):
    """Global module hooks see every module of ours called as torchvision calls them, with the same tensors.
    Global full backward hooks make any in-place ReLU raise, in torchvision's model too (the same error); a
    block whose ReLUs are not in place runs with them."""
    if case == "block_backward":
        ours, theirs = _public_pair("block")
        for relu in [m for m in [*ours.modules(), *theirs.modules()] if isinstance(m, nn.ReLU)]:
            relu.inplace = False
        args = (_x(2, 6, 6, 6),)
    else:
        ours, theirs = _pair(False)
        args = (_x(), torch.tensor([0, 1, 2]))
    log, current = {True: [], False: []}, []

    def record(kind):
        return lambda module, *args: log[current[0]].append((type(module).__name__, kind, _tensors(args)))

    hooks = nn.modules.module
    handles = [hooks.register_module_forward_pre_hook(record("pre")), hooks.register_module_forward_hook(record("forward"))]
    if case != "model_forward":
        handles += [
            hooks.register_module_full_backward_pre_hook(record("backward_pre")),
            hooks.register_module_full_backward_hook(record("backward")),
        ]
    try:
        outcomes = []
        for model in (ours, theirs):
            current[:] = [model is ours]
            outcomes.append(_outcome(lambda: _step(model, *args)))
    finally:
        for handle in handles:
            handle.remove()
    _assert_same_outcome(*outcomes)
    _assert_same_log(log[True], log[False])
    assert outcomes[0][0] == ("raised" if case == "model_backward" else "ok")
    assert len(log[True]) > (5 if case == "model_backward" else 30)


# ------------------------------------------------------------------------------ public blocks with inner hooks


def _public_pair(kind, memory_efficient=True, theirs_memory_efficient=None):
    torch.manual_seed(0)
    theirs_memory_efficient = memory_efficient if theirs_memory_efficient is None else theirs_memory_efficient
    if kind == "layer":
        ours, theirs = densenet_fused.DenseLayer(6, 3, 2, 0.0, memory_efficient), tv._DenseLayer(6, 3, 2, 0.0, theirs_memory_efficient)
    elif kind == "block":
        ours = densenet_fused.DenseBlock(2, 6, 2, 3, 0.0, memory_efficient)
        theirs = tv._DenseBlock(2, 6, 2, 3, 0.0, theirs_memory_efficient)
    else:
        ours, theirs = densenet_fused.Transition(6, 3), tv._Transition(6, 3)
    ours = randomize_affine(ours).double()
    theirs.double().load_state_dict(ours.state_dict())
    return ours, theirs


INNER = {"layer": "conv1", "block": "denselayer2.conv2", "transition": "conv"}


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("kind", INNER)
def test_public_blocks_with_inner_hooks_run_as_torchvision(kind, memory_efficient):
    """DenseLayer, DenseBlock (also fed a list, as the fused block takes it) and Transition with a hooked module
    inside: torchvision's calls, tensors, outputs and gradients, one warning naming the class; the running
    statistics of torchvision without checkpointing."""
    ours, theirs = _public_pair(kind, memory_efficient)
    logs = ([], [])
    for model, log in zip((ours, theirs), logs):
        _register_hooks(model, INNER[kind], log)
    x = _x(2, 6, 6, 6)
    with pytest.warns(UserWarning, match=f"densenet_fused.block.modules.{type(ours).__qualname__}"):
        _assert_same_step(ours, theirs, x)
    _assert_same_log(*logs)
    unchecked = _public_pair(kind, memory_efficient, theirs_memory_efficient=False)[1]
    _step(unchecked, x)  # torchvision's checkpoint moves norm1's running statistics twice, ours once
    _assert_same_state(ours, unchecked)
    if kind == "block":  # a list of tensors: as concatenated along channels
        x1, x2 = x[:, :2].clone().requires_grad_(), x[:, 2:].clone().requires_grad_()
        torch.testing.assert_close(ours([x1, x2]), theirs(torch.cat([x1, x2], 1)), **TOL)


# ------------------------------------------------------------------------------------ hook-based utilities

CONVS = ["features.denseblock1.denselayer1.conv1", "features.denseblock2.denselayer2.conv2", "features.transition1.conv"]


class EveryOther(prune.BasePruningMethod):
    """A custom pruning method: zero every other weight."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


PRUNINGS = {
    "l1_unstructured": lambda conv: prune.l1_unstructured(conv, "weight", amount=0.5),
    "random_unstructured": lambda conv: prune.random_unstructured(conv, "weight", amount=0.3),
    "ln_structured": lambda conv: prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0),
    "random_structured": lambda conv: prune.random_structured(conv, "weight", amount=0.5, dim=1),
    "identity": lambda conv: prune.identity(conv, "weight"),
    "custom_from_mask": lambda conv: prune.custom_from_mask(conv, "weight", torch.rand_like(conv.weight) > 0.5),
    "custom_method": lambda conv: EveryOther.apply(conv, "weight"),
    "weight_norm": lambda conv: torch.nn.utils.weight_norm(conv),
    "spectral_norm_hook": lambda conv: torch.nn.utils.spectral_norm(conv),
}


def _apply(model, prepare, seed=3):
    torch.manual_seed(seed)  # the same random masks for both
    for name in CONVS:
        prepare(model.get_submodule(name))


@pytest.mark.filterwarnings("ignore:.*weight_norm:FutureWarning")
@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("method", [*PRUNINGS, "global_unstructured", "remove"])
def test_hook_based_utilities_train_like_torchvision(method, memory_efficient):
    """Three SGD steps with a pruned (weight-normed) conv in each block and transition: the same outputs,
    gradients, weights, masks and running statistics as torchvision's (checkpointing or not)."""
    ours, theirs = _pair(memory_efficient)
    x, target = _x(), torch.tensor([0, 1, 2])
    for model in (ours, theirs):
        if method == "global_unstructured":
            pairs = [(model.get_submodule(name), "weight") for name in CONVS]
            prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=0.4)
        else:
            _apply(model, PRUNINGS.get(method, PRUNINGS["l1_unstructured"]))
    with pytest.warns(UserWarning, match=UNFUSED):
        assert_lockstep(ours, theirs, x, target, steps=3, rtol=1e-10, atol=1e-12)
    if method == "remove":  # prune.remove makes the pruning permanent and takes the hook away: fused again
        for model in (ours.train(), theirs.train()):
            for name in CONVS:
                prune.remove(model.get_submodule(name), "weight")
        assert unfused.runs_fused(ours.features.denseblock1, x)
        assert_lockstep(ours, theirs, x, target, steps=2, rtol=1e-10, atol=1e-12)


PARAMETRIZATIONS = {
    "weight_norm": lambda conv: parametrizations.weight_norm(conv),
    "spectral_norm": lambda conv: parametrizations.spectral_norm(conv),
    "orthogonal": lambda conv: parametrizations.orthogonal(conv),
    "custom": lambda conv: parametrize.register_parametrization(conv, "weight", Softsign()),
}


class Softsign(nn.Module):
    def forward(self, weight):
        return F.softsign(weight)


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("kind", PARAMETRIZATIONS)
def test_parametrizations_stay_fused_and_train_like_torchvision(kind, memory_efficient, fused_only, recwarn):
    """Parametrizations are no hooks: the fused path reads conv.weight, which computes them, exactly."""
    ours, theirs = _pair(memory_efficient)
    for model in (ours, theirs):
        _apply(model, PARAMETRIZATIONS[kind])
    assert_lockstep(ours, theirs, _x(), torch.tensor([0, 1, 2]), steps=3, rtol=1e-10, atol=1e-12)
    assert not _unfused_warnings(recwarn)


# ------------------------------------------------------------------------------------------- empty batches


def _outcome(run):
    """("ok", result) or ("raised", exception type, message)."""
    try:
        return ("ok", run())
    except Exception as error:  # noqa: BLE001 - the outcome is compared with torchvision's
        return ("raised", type(error), str(error))


def _assert_same_outcome(ours, theirs):
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "raised":
        assert ours[1:] == theirs[1:]


def _empty_step(model, x):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.sum().backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


def _assert_same_empty_run(ours, theirs, x, state=None):
    """Train then eval on an empty batch: the same outcome, output, gradients and state (``state(model)``)."""
    state = state or (lambda model: model.state_dict())
    for train in (True, False):
        ours.train(train), theirs.train(train)
        mine, peer = _outcome(lambda: _empty_step(ours, x)), _outcome(lambda: _empty_step(theirs, x))
        _assert_same_outcome(mine, peer)
        if mine[0] == "ok":
            (out, gx, grads), (out_t, gx_t, grads_t) = mine[1], peer[1]
            assert out.shape == out_t.shape and out.numel() == 0 and gx.shape == gx_t.shape
            assert [g is None for g in grads] == [g is None for g in grads_t]
            assert_close_tensors([g for g in grads if g is not None], [g for g in grads_t if g is not None], 0, 0, "grads")
        mine, peer = state(ours), state(theirs)
        assert list(mine) == list(peer)
        assert_close_tensors(list(mine.values()), list(peer.values()), what=f"state, train={train}", **TOL)


def _torchvision_small_inputs(ours, config):
    """torchvision's DenseNet with ours' small_inputs stem (a 3x3 conv0 alone)."""
    theirs = torchvision.models.DenseNet(**config).double()
    conv0 = nn.Conv2d(3, config["num_init_features"], 3, padding=1, bias=False)
    modules = [("conv0", conv0), *list(theirs.features.named_children())[4:]]
    theirs.features = nn.Sequential(OrderedDict(modules)).double()
    theirs.load_state_dict(ours.state_dict())
    return theirs


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("model", ["densenet", "densenet_momentum_none", "densenet_bc"])
def test_empty_batch_like_torchvision(model, memory_efficient, recwarn):
    if model == "densenet_bc":
        config = dict(growth_rate=4, block_config=(1, 1, 1), num_init_features=8, num_classes=10, bn_size=4)
        torch.manual_seed(0)
        ours = randomize_affine(densenet_fused.densenet_bc(10, 4, memory_efficient=memory_efficient)).double()
        theirs = _torchvision_small_inputs(ours, config)
        x = _x(0, 3, 8, 8)
    else:
        ours, theirs = _pair(memory_efficient)
        if model == "densenet_momentum_none":
            for norm in [*ours.modules(), *theirs.modules()]:
                if isinstance(norm, nn.BatchNorm2d):
                    norm.momentum = None
        x = _x(0, 3, 16, 16)
    with torch.no_grad():  # running statistics away from their initial values
        ours(_x(4, 3, 16, 16)), theirs(_x(4, 3, 16, 16))
    _assert_same_empty_run(ours, theirs, x)
    assert not _unfused_warnings(recwarn)


monai_nets = pytest.importorskip("monai.networks.nets")
MONAI_NORMS = {
    "batch": "batch",
    "instance": ("instance", {}),
    "instance_affine_running": ("instance", {"affine": True, "track_running_stats": True}),
}


@pytest.mark.parametrize("norm", MONAI_NORMS)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_empty_batch_like_monai(spatial_dims, norm):
    config = dict(init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2, norm=MONAI_NORMS[norm])
    torch.manual_seed(0)
    theirs = randomize_affine(monai_nets.DenseNet(spatial_dims=spatial_dims, in_channels=2, out_channels=3, **config).double())
    ours = densenet_fused.DenseNet.from_monai_config(spatial_dims, 2, 3, **config).double()
    densenet_fused.load_monai_state_dict(ours, theirs.state_dict())
    shape = [16] * spatial_dims
    with torch.no_grad():
        ours(_x(2, 2, *shape)), theirs(_x(2, 2, *shape))
    _assert_same_empty_run(ours, theirs, _x(0, 2, *shape), state=lambda m: densenet_fused.monai_state_dict(m) if m is ours else m.state_dict())


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("kind", INNER)
def test_public_blocks_take_empty_batches_like_torchvision(kind, memory_efficient):
    ours, theirs = _public_pair(kind, memory_efficient, theirs_memory_efficient=False)
    with torch.no_grad():
        ours(_x(2, 6, 6, 6)), theirs(_x(2, 6, 6, 6))
    _assert_same_empty_run(ours, theirs, _x(0, 6, 6, 6))


# ----------------------------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_torch_func_on_an_eval_model_like_torchvision(memory_efficient):
    """vmap of a per-sample forward, grad and jacrev with respect to the input and the parameters."""
    ours, theirs = _pair(memory_efficient)
    with torch.no_grad():
        ours(_x()), theirs(_x())
    ours.eval(), theirs.eval()
    x = _x()
    results = []
    for model in (ours, theirs):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(params, x, model=model):
            return functional_call(model, params, (x,)).square().sum()

        per_sample = vmap(lambda xi: model(xi[None]))(x)
        per_sample_grads = vmap(grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
        grads = grad(loss, argnums=(0, 1))(params, x)
        jacobian_x = jacrev(model)(x[:2])
        jacobian_params = jacrev(lambda p: functional_call(model, p, (x[:1],)))(params)
        results.append([per_sample, *per_sample_grads.values(), *grads[0].values(), grads[1], jacobian_x, *jacobian_params.values()])
    assert_close_tensors(*results, what="torch.func", **TOL)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_functional_call_stays_fused(memory_efficient, fused_only):
    """functional_call with plain tensors (no transform) runs the fused path: the same as torchvision."""
    ours, theirs = _pair(memory_efficient)
    x = _x()
    results = []
    for model in (ours, theirs):
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        out = functional_call(model, params, (x,))
        out.square().sum().backward()
        results.append([out, *(p.grad for p in params.values()), *model.buffers()])
    assert_close_tensors(*results, what="functional_call", **TOL)


def test_torch_func_in_train_mode_like_torchvision():
    """Batch statistics under vmap or grad: torchvision raises (running statistics cannot be updated in place
    there), so do we, with the same error; with torch.func.replace_all_batch_norm_modules_ both work alike."""
    ours, theirs = _pair()
    x = _x()
    for transform in (lambda m: vmap(lambda xi: m(xi[None].expand(2, -1, -1, -1)))(x), lambda m: grad(lambda x: m(x).sum())(x)):
        _assert_same_outcome(_outcome(lambda: transform(ours)), _outcome(lambda: transform(theirs)))
    for model in (ours, theirs):
        replace_all_batch_norm_modules_(model)
    per_sample = [vmap(lambda xi: m(xi[None].expand(2, -1, -1, -1)))(x) for m in (ours, theirs)]
    torch.testing.assert_close(*per_sample, **TOL)
    input_grads = [grad(lambda x: m(x).square().sum())(x) for m in (ours, theirs)]
    torch.testing.assert_close(*input_grads, **TOL)


def test_replaced_batch_norms_stay_fused_without_transforms(fused_only):
    """replace_all_batch_norm_modules_ (no running statistics) outside torch.func: the fused path, exact."""
    ours, theirs = _pair()
    for model in (ours, theirs):
        replace_all_batch_norm_modules_(model)
    _assert_same_step(ours, theirs, _x(), torch.tensor([0, 1, 2]))
