"""Exact activation-memory accounting of one training step.

On CPU the count is exact: the profiler records every allocation and free of the CPU allocator in order,
and the peak of their running total is taken, leaving out the parameter gradients at every instant. On
CUDA it is the growth of ``max_memory_allocated`` over the step, gradients preallocated.
"""

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from .models import MiB
from .steps import forward_backward, train_step


def held_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """What a step needs besides activations: parameters, buffers, parameter gradients, the batch."""
    params = sum(p.nbytes for p in model.parameters())
    buffers = sum(b.nbytes for b in model.buffers())
    return 2 * params + buffers + sum(t.nbytes for t in inputs)


def _allocation_events(prof) -> list:
    """(ptr, bytes) of every allocator event the profiler saw, in time order; frees have bytes < 0."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append(event)
    events.sort(key=lambda e: e.start_time_ns)
    return [(e.extra_fields.ptr, e.extra_fields.alloc_size) for e in events]


def _peak_without(events, keep_ptrs) -> int:
    """Peak of the running allocation total, leaving out the allocations still alive at ``keep_ptrs``.

    Those are the parameter gradients: an allocation is one when its pointer is a gradient's at the
    end of the step and it is the last allocation at that pointer (nothing freed it afterwards).
    """
    last_alloc = {}
    for i, (ptr, size) in enumerate(events):
        if size > 0:
            last_alloc[ptr] = i
        else:
            last_alloc.pop(ptr, None)
    excluded = {i for ptr, i in last_alloc.items() if ptr in keep_ptrs}
    running = peak = 0
    for i, (_, size) in enumerate(events):
        if i not in excluded:
            running += size
            peak = max(peak, running)
    return peak


def step_peak_bytes(step, params) -> int:
    """Activation memory of ``step()``: its peak allocation above what was held before, less param grads.

    The grads of ``params`` are set to None first (so ``step`` allocates them, as after
    ``zero_grad()``), and are left out of the peak at every instant, not just subtracted at the end.
    CPU: exact, from the profiler's allocator events (every c10 CPU allocation and free, in order).
    CUDA: ``max_memory_allocated`` growth with the grads allocated (zeroed) beforehand instead,
    so it also counts a transient weight gradient before it is accumulated (at most the largest one).
    """
    params = list(params)
    device = params[0].device
    if device.type == "cuda":
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    for p in params:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    grads = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    return _peak_without(_allocation_events(prof), grads)


def activation_bytes(model: nn.Module, x, target, amp=None, warmup: bool = False) -> int:
    """Activation memory of one training step of ``model`` (see ``step_peak_bytes``)."""
    if warmup:  # compilation, cuDNN autotuning and other one-off allocations happen here
        train_step(model, x, target, amp)
    return step_peak_bytes(lambda: forward_backward(model, x, target, amp), model.parameters())


def self_check(device: torch.device, layers: int = 5, numel: int = MiB // 4) -> str:
    """Check the accounting on a case with a known answer: a chain of ``layers`` exp() on a parameter.

    Each exp saves its n-byte output, and backward holds one more n-byte gradient before freeing
    the last output: the peak is (layers + 1) * n, plus the 4-byte loss and its 4-byte gradient
    (on CUDA each rounds up to the caching allocator's 512-byte block).
    """
    weight = nn.Parameter(torch.randn(numel, device=device))

    def step():
        y = weight
        for _ in range(layers):
            y = y.exp()
        loss = y.sum()
        del y
        loss.backward()

    cuda = device.type == "cuda"
    expected = (layers + 1) * weight.nbytes + 2 * (512 if cuda else 4)
    measured = step_peak_bytes(step, [weight])
    ok = measured == expected if not cuda else abs(measured - expected) <= 64 * 1024  # CUDA kernels may add workspace
    return (
        f"accounting self-check ({layers} chained exp() on a {weight.nbytes // MiB} MiB parameter): "
        f"expected {expected} B, measured {measured} B: {'OK' if ok else 'MISMATCH'}"
    )
