"""How the fused modules meet PyTorch's graph capturers.

torch.fx: dense blocks, dense layers and transitions are leaf modules, recorded as one ``call_module`` node
each, for every tracer: plain ``torch.fx.symbolic_trace``, torchvision's feature extraction and timm's (which
also learns them through ``register_notrace_module``).  Their forward runs a custom autograd function, which
no symbolic tracer can look inside, so a forward that receives ``torch.fx.Proxy`` inputs records itself.

TorchScript cannot compile custom autograd functions or custom ops either: ``torch.jit.script`` and
``torch.jit.trace`` raise at once, naming what works instead (torch.compile and torch.export).
"""

import sys

import torch
from torch import fx, nn

TORCHSCRIPT_UNSUPPORTED = (
    "densenet_fused does not support TorchScript (torch.jit.script / torch.jit.trace): its fused blocks are "
    "custom autograd functions and custom ops, which TorchScript cannot capture. Use torch.compile(model) to "
    "compile it, or torch.export.export(model, (x,)) to export it."
)


def is_fx_traced(input) -> bool:
    """Whether torch.fx traces ``input`` (a tensor or a list of tensors) symbolically; call at the top of a
    forward.  Under torch.jit.trace it raises the TorchScript error instead."""
    if torch.jit.is_tracing():
        raise RuntimeError(TORCHSCRIPT_UNSUPPORTED)
    items = input if isinstance(input, (list, tuple)) else [input]
    return any(isinstance(item, fx.Proxy) for item in items)


def leaf_call(module: nn.Module, input) -> fx.Proxy:
    """Record ``module(input)`` as one call_module node of the tracer that made the proxies in ``input``."""
    items = input if isinstance(input, (list, tuple)) else [input]
    tracer = next(item.tracer for item in items if isinstance(item, fx.Proxy))
    path = tracer.path_of_module(module)
    if not path:
        raise TypeError(
            f"{type(module).__name__} is a leaf module for torch.fx and cannot be the root of a trace: "
            "trace a module that contains it"
        )
    return tracer.create_proxy("call_module", path, (input,), {})


def refuse_torchscript(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__``: torch.jit.script calls it on every submodule before compiling anything."""
    raise RuntimeError(TORCHSCRIPT_UNSUPPORTED)


def register_timm_leaves() -> None:
    """Declare the fused modules leaves to timm's FX tracing, if timm is loaded (importing it here would slow
    every import of ours; ``convert`` calls this again once it meets a timm model)."""
    if "timm" not in sys.modules:
        return
    from timm.layers import register_notrace_module

    from .block.modules import _DenseBlock, _DenseLayer, _Transition

    for leaf in (_DenseBlock, _DenseLayer, _Transition):
        register_notrace_module(leaf)
