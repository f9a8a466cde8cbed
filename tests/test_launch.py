"""``ops._triton.launch``: after a specialization's first launch through Triton, launches call the compiled
kernel's launcher with exactly the arguments Triton itself passes it (no GPU needed: a fake kernel records both)."""

import pytest
import torch

from densenet_fused.ops import _triton as tr


class FakeCompiled:
    function, packed_metadata = "function", "packed metadata"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class FakeKernel:
    """A Triton kernel as ``launch`` sees one: ``kernel[grid](*args, **constexprs)`` compiles (here: records) and
    returns the compiled kernel; an autotuned one has a ``best_config`` after each call."""

    arg_names = ["x_ptr", "y_ptr", "eps", "n", "ACC", "FLAG", "BLOCK"]

    def __init__(self, autotuned: bool):
        self.compiled, self.jit_calls = FakeCompiled(), []
        self.autotuned = autotuned

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            if self.autotuned:
                self.best_config = type("Config", (), {"kwargs": {"BLOCK": 64}})()
            return self.compiled

        return run


@pytest.fixture
def cuda0(monkeypatch):
    """A pretend current CUDA device 0 with stream 1234, and an empty launch cache."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1234, raising=False)
    monkeypatch.setattr(tr, "_COMPILED", {})
    monkeypatch.setattr(tr, "_launch_hooks", lambda: False)
    return torch.device("cuda", 0)


def _launch(kernel, device, x, y, n=10, eps=1e-5, flag=True, **extra):
    grid = (lambda meta: (n // meta["BLOCK"] + 1, 2)) if kernel.autotuned else (3, 2)
    constexprs = {"FLAG": flag, **({} if kernel.autotuned else {"BLOCK": 16}), **extra}
    return tr.launch(kernel, grid, (x, y), (eps, n), device, "acc", **constexprs)


@pytest.mark.parametrize("autotuned", [False, True])
def test_repeated_specialization_calls_the_compiled_launcher_as_triton_does(cuda0, autotuned):
    kernel, x, y = FakeKernel(autotuned), torch.zeros(8), torch.zeros(8)
    meta = _launch(kernel, cuda0, x, y)
    assert len(kernel.jit_calls) == 1 and not kernel.compiled.calls  # the first launch is Triton's: it compiles
    assert kernel.jit_calls[0][2]["ACC"] == "acc" and meta["BLOCK"] == (64 if autotuned else 16)
    x2, y2 = torch.ones(8), torch.ones(8)  # new tensors, same dtypes and alignment
    assert _launch(kernel, cuda0, x2, y2) == meta
    assert len(kernel.jit_calls) == 1
    grid = (1, 2, 1) if autotuned else (3, 2, 1)
    tail = ("acc", True, 64 if autotuned else 16)  # the parameters after the given ones, in the kernel's order
    expected = (*grid, 1234, "function", "packed metadata", None, None, None, x2, y2, 1e-5, 10, *tail)
    assert len(kernel.compiled.calls) == 1
    assert all(a is b or a == b for a, b in zip(kernel.compiled.calls[0], expected, strict=True))


@pytest.mark.parametrize(
    "change",
    ["integer", "float", "constexpr", "dtype", "alignment"],
)
def test_any_change_triton_specializes_on_goes_through_triton(cuda0, change):
    """A new integer, dtype, pointer alignment or constexpr is a new specialization: Triton launches it (and
    compiles, or finds, the right kernel); only then is it replayed."""
    kernel, x, y = FakeKernel(False), torch.zeros(8), torch.zeros(8)
    _launch(kernel, cuda0, x, y)
    args = {
        "integer": dict(x=x, y=y, n=11),
        "float": dict(x=x, y=y, eps=1e-3),
        "constexpr": dict(x=x, y=y, flag=False),
        "dtype": dict(x=x.double(), y=y),
        "alignment": dict(x=torch.zeros(9)[1:], y=y),  # 4 bytes past a 16-byte-aligned allocation
    }[change]
    _launch(kernel, cuda0, **args)
    assert len(kernel.jit_calls) == 2 and not kernel.compiled.calls
    _launch(kernel, cuda0, **args)
    assert len(kernel.jit_calls) == 2 and len(kernel.compiled.calls) == 1


def test_launch_hooks_keep_launches_in_triton(cuda0, monkeypatch):
    """With a Triton launch hook installed (a profiler), every launch goes through Triton, which calls it."""
    monkeypatch.setattr(tr, "_launch_hooks", lambda: True)
    kernel, x, y = FakeKernel(False), torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        _launch(kernel, cuda0, x, y)
    assert len(kernel.jit_calls) == 3 and not kernel.compiled.calls


def test_other_devices_launch_through_triton_on_their_device(cuda0):
    """A tensor on another GPU than the current one, and CPU tensors (the interpreter), never use the cache."""
    kernel, x, y = FakeKernel(False), torch.zeros(8), torch.zeros(8)
    _launch(kernel, torch.device("cpu"), x, y)
    _launch(kernel, torch.device("cpu"), x, y)
    assert len(kernel.jit_calls) == 2 and not kernel.compiled.calls and not tr._COMPILED
