"""Swap the dense blocks, dense layers and transitions of an existing torchvision or timm DenseNet for fused ones."""

import copy
import sys

import torch
from torch import nn
from torchvision.models import densenet as tv

from . import tracing
from .block import _DenseBlock, _DenseLayer, _Transition, layer_types


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every torchvision/timm dense block, dense layer and transition replaced by ours.

    Works on a whole torchvision ``DenseNet`` (any configuration) or timm ``DenseNet``, and on any
    architecture built from their blocks.  The fused modules take over the original norm and conv modules
    themselves: same Parameter and buffer objects, same state_dict keys, same train/eval flags, drop rate
    and ``memory_efficient`` setting (timm: ``grad_checkpointing``), so outputs are unchanged and, with
    ``inplace=True``, an optimizer built on ``model`` keeps working.  ``inplace=False`` converts a deep copy.
    Like ``SyncBatchNorm.convert_sync_batchnorm``, a ``model`` that is itself a block is returned as a new
    module.  A module of these types that the fused kernels cannot compute exactly (another activation, a
    conv with bias or another shape, another pooling), or that has hooks registered (they would be lost with
    it), raises ValueError naming it; nothing is half-converted.
    """
    tracing.register_timm_leaves()
    if not inplace:
        model = copy.deepcopy(model)
    for path, fused in _plan(model, ""):  # _plan checks everything before anything is swapped
        if not path:
            return fused
        parent, _, name = path.rpartition(".")
        model.get_submodule(parent).add_module(name, fused)
    return model


def _plan(module: nn.Module, path: str) -> list:
    """[(path, fused replacement)] for the convertible modules in ``module``, outermost first."""
    fused = _fused(module, path or type(module).__name__)
    if fused is not None:
        return [(path, fused)]
    children = module.named_children()
    return [item for name, child in children for item in _plan(child, f"{path}.{name}" if path else name)]


def _is(module: nn.Module, torchvision_class: type, timm_name: str) -> bool:
    """Whether ``module`` is exactly that torchvision class or timm's ``timm_name`` (if timm was imported:
    a timm model cannot exist otherwise, and importing timm here would slow every import of ours)."""
    timm_class = getattr(sys.modules.get("timm.models.densenet"), timm_name, None)
    return type(module) is torchvision_class or (timm_class is not None and type(module) is timm_class)


def _fused(module: nn.Module, path: str):
    """The fused replacement of ``module``, or None when it is not a torchvision/timm dense module."""
    if _is(module, tv._DenseBlock, "DenseBlock"):
        _check_no_hooks(module, path)
        layers = [_fused_layer(layer, f"{path}.{name}") for name, layer in module.named_children()]
        with torch.device("meta"):
            fused = _DenseBlock(0, 1, 1, 1, 0.0)
        for (name, _), layer in zip(module.named_children(), layers):
            fused.add_module(name, layer)
        fused.training = module.training
        return fused
    if _is(module, tv._DenseLayer, "DenseLayer"):
        return _fused_layer(module, path)
    if _is(module, tv._Transition, "DenseTransition"):
        return _fused_transition(module, path)
    return None


def _fused_layer(layer: nn.Module, path: str) -> _DenseLayer:
    if not _is(layer, tv._DenseLayer, "DenseLayer"):
        raise ValueError(f"{path}: a dense block holds a {type(layer).__name__}, not a dense layer")
    _check_no_hooks(layer, path)
    spatial_dims = _check_conv(layer.conv1, 1, 0, f"{path}.conv1")
    _check_conv(layer.conv2, 3, 1, f"{path}.conv2")
    for name in ("norm1", "norm2"):
        _check_norm(getattr(layer, name), f"{path}.{name}")
    for name in ("relu1", "relu2"):  # torchvision's; timm's activation sits inside its norms
        if name in layer._modules and type(layer._modules[name]) is not nn.ReLU:
            raise ValueError(f"{path}.{name} is a {type(layer._modules[name]).__name__}; fused blocks apply ReLU")
    memory_efficient = getattr(layer, "memory_efficient", getattr(layer, "grad_checkpointing", True))
    with torch.device("meta"):
        fused = _DenseLayer(1, 1, 1, layer.drop_rate, memory_efficient, spatial_dims)
    for name in ("norm1", "conv1", "norm2", "conv2"):
        setattr(fused, name, getattr(layer, name))
    fused.training = layer.training
    return fused


def _fused_transition(transition: nn.Module, path: str) -> _Transition:
    _check_no_hooks(transition, path)
    spatial_dims = _check_conv(transition.conv, 1, 0, f"{path}.conv")
    _check_norm(transition.norm, f"{path}.norm")
    relu = transition._modules.get("relu")
    if relu is not None and type(relu) is not nn.ReLU:
        raise ValueError(f"{path}.relu is a {type(relu).__name__}; the fused transition applies ReLU")
    pool, pool_type = transition.pool, layer_types(spatial_dims).avg_pool
    twos = [2, (2,) * spatial_dims]
    exact = type(pool) is pool_type and pool.kernel_size in twos and pool.stride in twos and not pool.ceil_mode
    exact = exact and pool.padding in (0, (0,) * spatial_dims) and getattr(pool, "divisor_override", None) is None
    if not exact:
        raise ValueError(f"{path}.pool is {pool}; the fused transition averages windows of 2 with stride 2 (floor)")
    with torch.device("meta"):
        fused = _Transition(1, 1, spatial_dims)
    fused.norm, fused.conv = transition.norm, transition.conv
    fused.training = transition.training
    return fused


def _check_no_hooks(module: nn.Module, path: str) -> None:
    hooks = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    if any(getattr(module, name) for name in hooks):
        raise ValueError(f"{path} has hooks registered, which its replacement would not have: convert first")


def _check_conv(conv: nn.Module, kernel: int, padding: int, path: str) -> int:
    """Raise unless ``conv`` is a bias-free, stride-1 ``kernel``-wide convolution; return its spatial rank."""
    if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        raise ValueError(f"{path} is a {type(conv).__name__}, not a plain convolution")
    d = conv.weight.dim() - 2
    plain = (
        conv.bias is None
        and conv.kernel_size == (kernel,) * d
        and conv.padding == (padding,) * d
        and conv.stride == conv.dilation == (1,) * d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
    if not plain:
        raise ValueError(f"{path} is {conv}; the fused kernels need a bias-free {kernel}-wide stride-1 convolution")
    return d


def _check_norm(norm: nn.Module, path: str) -> None:
    """Raise unless ``norm`` is a BatchNorm (timm's BatchNormAct2d only with ReLU and no dropout)."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"{path} is a {type(norm).__name__}; the fused kernels implement BatchNorm only")
    act, drop = norm._modules.get("act"), norm._modules.get("drop")
    if (act is not None and type(act) is not nn.ReLU) or (drop is not None and type(drop) is not nn.Identity):
        raise ValueError(f"{path} applies {act} and {drop}; fused blocks need ReLU and no dropout after the norm")
