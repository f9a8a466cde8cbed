"""When the fused block, layer and transition run as their modules instead, with torchvision's forwards.

The fused block reads its layers' norms and convs for their parameters but calls none of them: hooks on them
would never fire, and hook-based utilities (``torch.nn.utils.prune``, the old ``weight_norm``, which recompute
``conv.weight`` in a forward pre-hook) would read a stale weight.  Calling the hooks from inside the fused
kernels could not give them torchvision's tensors (the fused path never builds the concatenation or the norm and
ReLU outputs they receive, nor the autograd nodes backward hooks attach to).  So a block, layer or transition
with hooks on a module inside it, or with global module hooks registered, runs as its modules, as torchvision's
does, and warns once: its fused path and memory saving are off while the hooks are there.  Hooks on the block,
layer or transition itself fire around its fused forward and keep it fused.  The network's stem and head follow
the same rule (``stem_head.fusable``).

``memory_efficient`` layers checkpoint their norm1 -> relu1 -> conv1 as torchvision's do (hooks there fire again
when backward recomputes it), except that the recomputation replays the forward from the buffers it started from:
torchvision's moves norm1's running statistics (and an old-style spectral_norm's vectors) a second time, the fused
path and torchvision without checkpointing do not.

Empty batches and torch.func transforms (vmap, grad, jacrev: the fused ops have no batching rule) take the same
path without a warning; there the layers do not checkpoint, which torch.func cannot differentiate.
Parametrizations (``torch.nn.utils.parametrize``) are no hooks: the fused path reads ``conv.weight``, which
computes them, so they stay fused.
"""

import contextlib
import threading
import warnings
import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import activation

_hooks = nn.modules.module
_warned = weakref.WeakSet()
_state = threading.local()  # .layers: an unfused block is calling its layers


def runs_plain(m: nn.Module) -> bool:
    """Whether calling module ``m`` runs its forward and nothing else: no hooks of its own, no global ones."""
    return not (
        _global_hooks() or m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
    )


def _global_hooks() -> bool:
    return bool(
        _hooks._global_forward_pre_hooks or _hooks._global_forward_hooks
        or _hooks._global_backward_pre_hooks or _hooks._global_backward_hooks
    )  # fmt: skip


def _hooks_inside(module: nn.Module) -> bool:
    """Whether a module inside ``module`` (not itself) has hooks of its own (``runs_plain``'s test, inlined: this
    reads every module of every block in every forward)."""
    for m in module._modules.values():
        if m is not None and (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks):
            return True
        if m is not None and m._modules and _hooks_inside(m):
            return True
    return False


def fusable_input(input) -> bool:
    """Whether the fused path may take ``input`` (a tensor or a list of tensors): not an empty batch, no
    torch.func transform active, and not the layers of a block running unfused."""
    x = input[0] if isinstance(input, (list, tuple)) and input else input
    empty = isinstance(x, Tensor) and x.dim() > 0 and x.size(0) == 0
    return not (empty or torch._C._are_functorch_transforms_active() or getattr(_state, "layers", False))


def runs_fused(module: nn.Module, input) -> bool:
    """Whether a dense block, layer or transition runs fused on ``input``; warns once if hooks, or an activation
    the fused path does not apply, keep it from it."""
    if not fusable_input(input):
        return False
    if _global_hooks() or _hooks_inside(module):
        why = _HOOKS
    elif not _activations_fused(module):
        why = "while an activation inside it is neither nn.ReLU nor nn.PReLU, the two its fused path applies"
    else:
        return True
    warn_once(module, f"{type(module).__module__}.{type(module).__qualname__}", why)
    return False


def _activations_fused(module: nn.Module) -> bool:
    """Whether the activations (relu, relu1, relu2) of a transition, a layer or a block's layers are all ones the
    fused path applies (``activation.FUSED``)."""
    for m in (module, *module._modules.values()):
        for name in ("relu", "relu1", "relu2"):
            act = m._modules.get(name) if m is not None else None
            if act is not None and type(act) not in activation.FUSED:
                return False
    return True


_HOOKS = "while module hooks are registered on modules inside it (or globally), which its fused path would not call"


def warn_once(module: nn.Module, name: str, why: str = _HOOKS) -> None:
    """Say, once per module, that ``why`` makes ``module`` (called ``name``) run unfused."""
    if module in _warned:
        return
    _warned.add(module)
    warnings.warn(
        f"{name} runs as its modules, as torchvision's does, {why}: its fused path and memory saving are off until "
        "that changes"
    )


def dense_block(block: nn.Module, init_features: Tensor | list[Tensor]) -> Tensor:
    """torchvision's _DenseBlock.forward; a list of tensors is taken concatenated, as by the fused block."""
    features = [init_features] if isinstance(init_features, Tensor) else list(init_features)
    inside = getattr(_state, "layers", False)
    _state.layers = True
    try:
        for layer in block.values():
            features.append(layer(features))
    finally:
        _state.layers = inside
    return torch.cat(features, 1)


def dense_layer(layer: nn.Module, input: Tensor | list[Tensor]) -> Tensor:
    """torchvision's _DenseLayer.forward: the new features of a tensor or a list of tensors (concatenated);
    a ``channel_dropout`` layer drops channels as MONAI's does (F.dropout1d/2d/3d)."""
    inputs = [input] if isinstance(input, Tensor) else input
    recompute = layer.memory_efficient and any(x.requires_grad for x in inputs)
    if recompute and not torch._C._are_functorch_transforms_active():
        contexts = partial(_replay, (layer.norm1, layer.relu1, layer.conv1))
        bottleneck = checkpoint(partial(_bottleneck, layer), *inputs, use_reentrant=False, context_fn=contexts)
    else:
        bottleneck = _bottleneck(layer, *inputs)
    new_features = layer.conv2(layer.relu2(layer.norm2(bottleneck)))
    if layer.drop_rate > 0:
        dropout = _CHANNEL_DROPOUT[new_features.dim() - 2] if getattr(layer, "channel_dropout", False) else F.dropout
        new_features = dropout(new_features, p=layer.drop_rate, training=layer.training)
    return new_features


# A layer's channel dropout per spatial rank: MONAI's Dropout2d/3d (and Dropout1d)
_CHANNEL_DROPOUT = {1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}


def _bottleneck(layer: nn.Module, *inputs: Tensor) -> Tensor:
    return layer.conv1(layer.relu1(layer.norm1(torch.cat(inputs, 1))))


def _replay(modules: tuple) -> tuple:
    """checkpoint's (forward, recomputation) contexts for ``modules``: the recomputation starts from the buffers the
    forward started from (norm1's running statistics, an old-style spectral_norm's vectors) and leaves them as the
    forward left them, so it computes the same and moves nothing a second time (torchvision's moves them again)."""
    buffers = [buffer for module in modules for buffer in module.buffers()]
    before, after = [], []
    return _snapshots(buffers, before, after), _replayed(buffers, before, after)


@contextlib.contextmanager
def _snapshots(buffers: list, before: list, after: list):
    before += [buffer.clone() for buffer in buffers]
    yield
    after += [buffer.clone() for buffer in buffers]


@contextlib.contextmanager
def _replayed(buffers: list, before: list, after: list):
    _copy(buffers, before)
    try:
        yield
    finally:  # also when checkpoint stops the recomputation early
        _copy(buffers, after)


@torch.no_grad()
def _copy(buffers: list, values: list) -> None:
    for buffer, value in zip(buffers, values):
        buffer.copy_(value)


def transition(module: nn.Sequential, input: Tensor) -> Tensor:
    """torchvision's _Transition.forward (nn.Sequential's): norm, relu, conv, pool."""
    return nn.Sequential.forward(module, input)
