"""One training step and one inference step, as every benchmark runs them, and their FLOPs."""

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn


def forward_backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp=None) -> None:
    """Forward, cross-entropy loss and backward (under autocast when ``amp`` is a dtype)."""
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(model(x), target)
    loss.backward()


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp=None) -> None:
    """One training step without the optimizer: grads set to None (as ``zero_grad()`` does), forward, backward."""
    model.zero_grad(set_to_none=True)
    forward_backward(model, x, target, amp)


def graphed_train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp=None) -> None:
    """``train_step`` for a ``torch.compile(mode="reduce-overhead")`` model: it first tells CUDA-graph trees
    that a new iteration begins (``torch.compiler.cudagraph_mark_step_begin``), as a training loop does."""
    torch.compiler.cudagraph_mark_step_begin()
    train_step(model, x, target, amp)


def eval_step(model: nn.Module, x: torch.Tensor, amp=None) -> None:
    """Inference as users run it: the model in eval() mode, under torch.no_grad() (and autocast)."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        model(x)


def first_step(model: nn.Module, x, target, amp=None, step=train_step) -> float:
    """Run one training step and return its seconds: for torch.compile this is the compile time."""
    t0 = time.perf_counter()
    step(model, x, target, amp)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def step_flops(model: nn.Module, x: torch.Tensor, target: torch.Tensor, train: bool = True) -> int:
    """FLOPs of one training step (or one eval forward) of ``model``, counted by torch's FlopCounterMode:
    convolutions and matmuls, the work every implementation must do (count it on torchvision's model)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).train(train)
    with FlopCounterMode(display=False) as counter:
        if train:
            forward_backward(model, x, target)
        else:
            eval_step(model, x)
    return counter.get_total_flops()
