"""Swap the dense blocks, dense layers and transitions of an existing torchvision, timm or MONAI DenseNet for fused
ones."""

import copy
import sys
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import densenet as tv

from . import activation
from . import norm as bn
from . import tracing
from .block.modules import _DenseBlock, _DenseLayer, _Transition, layer_types
from .models import DenseNet

_MONAI_DENSENETS = ("DenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264")
_MONAI_LAYER_MODULES = ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every torchvision/timm/MONAI dense block, dense layer and transition replaced by ours.

    Works on a whole torchvision ``DenseNet`` (any configuration) or timm ``DenseNet``, and on any
    architecture built from their blocks.  The fused modules take over the original norm and conv modules
    themselves: same Parameter and buffer objects, same state_dict keys, same train/eval flags, drop rate
    and ``memory_efficient`` setting (timm: ``grad_checkpointing``), so outputs are unchanged and, with
    ``inplace=True``, an optimizer built on ``model`` keeps working.  ``inplace=False`` converts a deep copy.
    A timm DenseNet keeps ``set_grad_checkpointing``, which then switches ``memory_efficient``.

    A MONAI ``DenseNet`` (or ``DenseNet121/169/201/264``) becomes the ``DenseNet`` that ``from_monai_config``
    builds, holding MONAI's modules, with torchvision's state_dict keys (``monai_state_dict`` gives MONAI's);
    MONAI dense blocks and transitions inside other networks are converted in place.  A MONAI layer's
    ``Dropout2d``/``Dropout3d`` becomes the fused layer's ``channel_dropout`` (the same seeded masks).

    Like ``SyncBatchNorm.convert_sync_batchnorm``, a ``model`` that is itself a block is returned as a new
    module.  A module of these types that the fused kernels cannot compute exactly (another activation or
    norm, a conv with bias or another shape, another pooling or dropout), or that has hooks registered
    (they would be lost with it), raises ValueError naming it; nothing is half-converted.
    """
    tracing.register_timm_leaves()
    if not inplace:
        model = copy.deepcopy(model)
    for path, fused in _plan(model, ""):  # _plan checks everything before anything is swapped
        if not path:
            return fused
        parent, _, name = path.rpartition(".")
        model.get_submodule(parent).add_module(name, fused)
    for module in model.modules():
        if _is(module, timm="DenseNet"):
            module.__class__ = _timm_densenet_class()
    return model


def _plan(module: nn.Module, path: str) -> list:
    """[(path, fused replacement)] for the convertible modules in ``module``, outermost first."""
    fused = _fused(module, path or type(module).__name__)
    if fused is not None:
        return [(path, fused)]
    children = module.named_children()
    return [item for name, child in children for item in _plan(child, f"{path}.{name}" if path else name)]


def _peer(module_name: str, class_name: str):
    """The class ``class_name`` of that timm or MONAI module, if the package was imported (a model of it cannot
    exist otherwise, and importing timm or MONAI here would slow every import of ours)."""
    return getattr(sys.modules.get(module_name), class_name, None)


def _is(module: nn.Module, torchvision: type | None = None, timm: str = "", monai: str = "") -> bool:
    """Whether ``module`` is exactly that torchvision class, timm's class ``timm`` or MONAI's class ``monai``."""
    classes = [torchvision, _peer("timm.models.densenet", timm), _peer("monai.networks.nets.densenet", monai)]
    return any(cls is not None and type(module) is cls for cls in classes)


def _fused(module: nn.Module, path: str):
    """The fused replacement of ``module``, or None when it is not a torchvision/timm/MONAI dense module."""
    if _is(module, tv._DenseBlock, timm="DenseBlock", monai="_DenseBlock"):
        return _fused_block(module, path)
    if _is(module, tv._DenseLayer, timm="DenseLayer"):
        return _fused_layer(module, path)
    if _is(module, tv._Transition, timm="DenseTransition", monai="_Transition"):
        return _fused_transition(module, path)
    if _is(module, monai="_DenseLayer"):
        raise ValueError(
            f"{path}: a MONAI dense layer returns its input and its new features together, which a fused layer "
            "does not: convert its dense block or its DenseNet instead"
        )
    if any(_is(module, monai=name) for name in _MONAI_DENSENETS):
        return _fused_monai_densenet(module, path)
    return None


def _fused_block(block: nn.Module, path: str) -> _DenseBlock:
    _check_no_hooks(block, path)
    layers = [_fused_layer(layer, f"{path}.{name}") for name, layer in block.named_children()]
    with torch.device("meta"):
        fused = _DenseBlock(0, 1, 1, 1, 0.0)
    for (name, _), layer in zip(block.named_children(), layers):
        fused.add_module(name, layer)
    fused.training = block.training
    return fused


def _fused_layer(layer: nn.Module, path: str) -> _DenseLayer:
    if _is(layer, tv._DenseLayer, timm="DenseLayer"):
        parts, prefix = layer, path
    elif _is(layer, monai="_DenseLayer"):  # MONAI's runs the nn.Sequential ``layers`` in order
        _check_no_hooks(layer, path)
        parts, prefix = layer.layers, f"{path}.layers"
        if list(parts._modules) != _MONAI_LAYER_MODULES + ["dropout"] * ("dropout" in parts._modules):
            raise ValueError(f"{prefix} holds {list(parts._modules)}, not the modules of MONAI's dense layer")
    else:
        raise ValueError(f"{path}: a dense block holds a {type(layer).__name__}, not a dense layer")
    _check_no_hooks(parts, prefix)
    spatial_dims = _check_conv(parts.conv1, 1, 0, f"{prefix}.conv1")
    if parts is layer:  # torchvision's and timm's: F.dropout of single values
        drop_rate, channel_dropout = layer.drop_rate, False
    else:
        drop_rate, channel_dropout = _monai_dropout(parts, spatial_dims, prefix)
    _check_conv(parts.conv2, 3, 1, f"{prefix}.conv2")
    for name in ("norm1", "norm2"):
        _check_norm(getattr(parts, name), f"{prefix}.{name}")
    for name in ("relu1", "relu2"):  # torchvision's and MONAI's; timm's activation sits inside its norms
        _check_act(parts._modules.get(name), f"{prefix}.{name}")
    memory_efficient = getattr(layer, "memory_efficient", getattr(layer, "grad_checkpointing", True))
    with torch.device("meta"):
        fused = _DenseLayer(1, 1, 1, drop_rate, memory_efficient, spatial_dims, channel_dropout=channel_dropout)
    for name in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
        if name in parts._modules:
            setattr(fused, name, getattr(parts, name))
    fused.training = layer.training
    return fused


_CHANNEL_DROPOUTS = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}


def _monai_dropout(layers: nn.Sequential, spatial_dims: int, path: str) -> tuple[float, bool]:
    """(rate, whether it drops whole channels) of a MONAI dense layer's dropout: ``nn.Dropout`` (MONAI's in
    1-D) drops single values, ``Dropout2d/3d`` (MONAI's in 2-D and 3-D; ``Dropout1d`` too) whole channels."""
    dropout = layers._modules.get("dropout")
    if dropout is None:
        return 0.0, False
    channel = _CHANNEL_DROPOUTS[spatial_dims]
    if type(dropout) not in (nn.Dropout, channel):
        raise ValueError(
            f"{path}.dropout is a {type(dropout).__name__}; fused blocks drop single values (nn.Dropout) or whole "
            f"channels ({channel.__name__})"
        )
    return float(dropout.p), type(dropout) is channel


def _fused_monai_densenet(model: nn.Module, path: str) -> DenseNet:
    """The ``DenseNet.from_monai_config`` network holding a MONAI DenseNet's modules (its blocks fused)."""
    for name, module in (("", model), (".features", model.features), (".class_layers", model.class_layers)):
        _check_no_hooks(module, path + name)
    spatial_dims = model.features.conv0.weight.dim() - 2
    head = model.class_layers  # our DenseNet.forward computes classifier(flatten(avg_pool(relu(features))))
    pool_type = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[spatial_dims - 1]
    plain = list(head._modules) == ["relu", "pool", "flatten", "out"] and type(head.out) is nn.Linear
    plain = plain and type(head.pool) is pool_type and head.pool.output_size in (1, (1,) * spatial_dims)
    if not (plain and type(head.flatten) is nn.Flatten and (head.flatten.start_dim, head.flatten.end_dim) == (1, -1)):
        raise ValueError(f"{path}.class_layers is {head}; the fused DenseNet's head is ReLU, global average, Linear")
    _check_act(head.relu, f"{path}.class_layers.relu")
    features = OrderedDict()
    for name, child in model.features.named_children():
        features[name] = _fused(child, f"{path}.features.{name}") or child
    act = "prelu" if type(head.relu) is nn.PReLU else "relu"  # a PReLU head is our relu5 (a ReLU is F.relu)
    with torch.device("meta"):
        fused = DenseNet(block_config=(), num_init_features=1, num_classes=1, spatial_dims=spatial_dims, act=act)
    fused.features, fused.classifier = nn.Sequential(features), head.out
    if act == "prelu":
        fused.relu5 = head.relu
    fused.training, fused.features.training = model.training, model.features.training
    return fused


def _timm_densenet_class() -> type:
    """timm's DenseNet class whose set_grad_checkpointing switches the fused layers (imported with timm)."""
    from .timm_densenet import DenseNet as TimmDenseNet

    return TimmDenseNet


def _fused_transition(transition: nn.Module, path: str) -> _Transition:
    _check_no_hooks(transition, path)
    spatial_dims = _check_conv(transition.conv, 1, 0, f"{path}.conv")
    _check_norm(transition.norm, f"{path}.norm")
    _check_act(transition._modules.get("relu"), f"{path}.relu")
    pool, pool_type = transition.pool, layer_types(spatial_dims).avg_pool
    twos = [2, (2,) * spatial_dims]
    exact = type(pool) is pool_type and pool.kernel_size in twos and pool.stride in twos and not pool.ceil_mode
    exact = exact and pool.padding in (0, (0,) * spatial_dims) and getattr(pool, "divisor_override", None) is None
    if not exact:
        raise ValueError(f"{path}.pool is {pool}; the fused transition averages windows of 2 with stride 2 (floor)")
    with torch.device("meta"):
        fused = _Transition(1, 1, spatial_dims)
    fused.norm, fused.conv = transition.norm, transition.conv
    if "relu" in transition._modules:
        fused.relu = transition.relu
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


def _check_act(act: nn.Module | None, path: str) -> None:
    """Raise unless ``act`` (None where the norm holds it, as in timm) is a ReLU or a PReLU."""
    if act is not None and type(act) not in activation.FUSED:
        raise ValueError(f"{path} is a {type(act).__name__}; fused blocks apply ReLU and PReLU")


def _check_norm(norm: nn.Module, path: str) -> None:
    """Raise unless ``norm`` is a BatchNorm or an InstanceNorm (timm's BatchNormAct2d only with ReLU and no
    dropout)."""
    if not isinstance(norm, bn.NORMS):
        raise ValueError(f"{path} is a {type(norm).__name__}; the fused kernels implement BatchNorm and InstanceNorm only")
    act, drop = norm._modules.get("act"), norm._modules.get("drop")
    if (act is not None and type(act) is not nn.ReLU) or (drop is not None and type(drop) is not nn.Identity):
        raise ValueError(f"{path} applies {act} and {drop}; fused blocks need ReLU and no dropout after the norm")
