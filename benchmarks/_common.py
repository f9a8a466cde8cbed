"""What memory.py and speed.py share: the implementations compared, one training step, exact memory
accounting, interleaved timing, the command line, and table / JSON / CSV output.

Every implementation gets the same weights (torchvision's init, copied by ``state_dict``) and the same
input, so any difference in memory or time comes from the implementation alone.
"""

import os

# Set before torch loads the profiler, so import this module before torch.  Thread settings
# (OMP_WAIT_POLICY, thread counts) are left as users have them: the figures are what a training script gets.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop banners off stderr

import argparse
import copy
import csv
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

try:
    import densenet_fused
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import densenet_fused

MiB = 2**20
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The implementations compared, in table order; the first is the baseline every ratio is taken against.
IMPLS = {
    "tv_naive": "torchvision naive",
    "tv_ckpt": "torchvision checkpoint",
    "tv_compile": "torch.compile(torchvision)",
    "fused_eff": "fused memory_efficient=True",
    "fused_keep": "fused memory_efficient=False",
    "fused_eff_compile": "torch.compile(fused memory_efficient=True)",
    "fused_keep_compile": "torch.compile(fused memory_efficient=False)",
}
BASELINE = "tv_naive"
# The compiled implementations: torch.compile of the eager one named.
COMPILED = {"tv_compile": "tv_naive", "fused_eff_compile": "fused_eff", "fused_keep_compile": "fused_keep"}
EAGER_IMPLS = [key for key in IMPLS if key not in COMPILED]

# ImageNet DenseNets: (growth_rate, block_config, num_init_features), as in torchvision.
ARCHS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Arch:
    """A DenseNet-BC shape: ImageNet ones by name, or the CIFAR k=12 ones by depth (``bc<depth>``)."""

    name: str
    growth_rate: int
    block_config: tuple
    num_init_features: int
    num_classes: int
    depth: int | None = None  # CIFAR nets only: densenet_bc(depth), with its 3x3 stem

    @property
    def kwargs(self) -> dict:
        return dict(
            growth_rate=self.growth_rate,
            block_config=self.block_config,
            num_init_features=self.num_init_features,
            num_classes=self.num_classes,
        )


def arch(name: str) -> Arch:
    """``densenet121`` etc., or ``bc<depth>``: ``densenet_bc(depth)``, the CIFAR DenseNet-BC k=12 of Huang et
    al. and Pleiss et al.: a 3x3 conv stem, then three blocks of (depth-4)/6 layers at 32x32, 16x16, 8x8."""
    if name in ARCHS:
        growth, blocks, init = ARCHS[name]
        return Arch(name, growth, blocks, init, 1000)
    if name.startswith("bc") and name[2:].isdigit():
        depth = int(name[2:])
        n = (depth - 4) // 6
        if n < 1 or bc_depth(n) != depth:
            raise ValueError(f"bc<depth> needs a depth 6n + 4 (40, 100, 190, ...), got {name!r}")
        return Arch(name, 12, (n, n, n), 24, 10, depth)
    raise ValueError(f"unknown model {name!r}: one of {sorted(ARCHS)} or bc<depth> (e.g. bc100)")


def bc_depth(layers_per_block: int) -> int:
    return 6 * layers_per_block + 4


@dataclass
class Setup:
    """Where and how the models run: device, dtype, memory format, autocast dtype (None: no AMP)."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    amp: torch.dtype | None

    @classmethod
    def from_args(cls, args) -> "Setup":
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        amp = None
        if args.amp:
            amp = torch.float16 if device.type == "cuda" else torch.bfloat16
        return cls(device, DTYPES[args.dtype], args.channels_last, amp)

    def describe(self) -> str:
        parts = [self.device.type, str(self.dtype).replace("torch.", "")]
        if self.channels_last:
            parts.append("channels_last")
        if self.amp is not None:
            parts.append(f"AMP {str(self.amp).replace('torch.', '')}")
        return ", ".join(parts)

    def place(self, module_or_tensor):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return module_or_tensor.to(device=self.device, dtype=self.dtype, memory_format=fmt)


def build_models(a: Arch, impls, setup: Setup, seed: int = 0, backend: str = "inductor") -> dict:
    """One model per implementation, all with the weights torchvision's init gives for ``seed``; the
    ``COMPILED`` ones are ``torch.compile(..., backend=backend)`` of a copy of their eager model."""
    torch.manual_seed(seed)
    naive = setup.place(torchvision_model(a, memory_efficient=False))
    state = naive.state_dict()
    models = {}
    for key in impls:
        eager = COMPILED.get(key, key)
        if eager == "tv_naive":
            model = naive
        else:
            build = torchvision_model if eager == "tv_ckpt" else fused_model
            model = setup.place(build(a, memory_efficient=eager in ("tv_ckpt", "fused_eff")))
            model.load_state_dict(state)
        if key in COMPILED:
            model = torch.compile(copy.deepcopy(model), backend=backend)
        models[key] = model.train()
    return models


def torchvision_model(a: Arch, memory_efficient: bool) -> nn.Module:
    """torchvision's DenseNet; for a CIFAR net, with densenet_bc's stem (conv0 3x3 alone, torchvision's init)."""
    model = torchvision.models.DenseNet(**a.kwargs, memory_efficient=memory_efficient)
    if a.depth is not None:
        model.features.conv0 = nn.Conv2d(3, a.num_init_features, kernel_size=3, padding=1, bias=False)
        nn.init.kaiming_normal_(model.features.conv0.weight)
        del model.features.norm0, model.features.relu0, model.features.pool0
    return model


def fused_model(a: Arch, memory_efficient: bool) -> nn.Module:
    """densenet_fused's DenseNet for ``a``: ``densenet_bc`` for a CIFAR net."""
    if a.depth is not None:
        return densenet_fused.densenet_bc(a.depth, a.growth_rate, memory_efficient=memory_efficient)
    return densenet_fused.DenseNet(**a.kwargs, memory_efficient=memory_efficient)


def make_batch(a: Arch, batch: int, size: int, setup: Setup, seed: int = 1):
    """The input images and class targets every implementation is fed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, a.num_classes, (batch,), generator=gen)
    return setup.place(x), target.to(setup.device)


def forward_backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp=None) -> None:
    """Forward, cross-entropy loss and backward (under autocast when ``amp`` is a dtype)."""
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(model(x), target)
    loss.backward()


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp=None) -> None:
    """One training step without the optimizer: grads set to None (as ``zero_grad()`` does), forward, backward."""
    model.zero_grad(set_to_none=True)
    forward_backward(model, x, target, amp)


def eval_step(model: nn.Module, x: torch.Tensor, amp=None) -> None:
    """Inference as users run it: the model in eval() mode, under torch.no_grad() (and autocast)."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        model(x)


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


def matmul_rate(device: torch.device, dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of this machine's dense GEMM (torch.mm of two n x n matrices, best of ``repeats``): the
    compute ceiling a DenseNet step, made of GEMMs and convolutions, can approach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def first_step(model: nn.Module, x, target, amp=None) -> float:
    """Run one training step and return its seconds: for torch.compile this is the compile time."""
    t0 = time.perf_counter()
    train_step(model, x, target, amp)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def held_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """What a step needs besides activations: parameters, buffers, parameter gradients, the batch."""
    params = sum(p.nbytes for p in model.parameters())
    buffers = sum(b.nbytes for b in model.buffers())
    return 2 * params + buffers + sum(t.nbytes for t in inputs)


# ---------------------------------------------------------------------------------------------------
# Memory accounting


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


# ---------------------------------------------------------------------------------------------------
# Timing


def time_steps(steps: dict, repeats: int, warmup: int = 1, device=None, progress=None) -> dict:
    """Seconds per call of each ``steps[key]()``, interleaved so that machine noise hits all alike.

    Each round runs every step once, rotating the order; CUDA steps are timed with CUDA events.
    Returns {key: {"times": [...], "median": s, "peak": max_memory_allocated (CUDA only)}}.
    """
    cuda = device is not None and device.type == "cuda"
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    keys = list(steps)
    out = {key: {"times": [], "peak": 0} for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[key]()
                end.record()
                end.synchronize()
                out[key]["times"].append(start.elapsed_time(end) / 1e3)
                out[key]["peak"] = max(out[key]["peak"], torch.cuda.max_memory_allocated(device))
            else:
                t0 = time.perf_counter()
                steps[key]()
                out[key]["times"].append(time.perf_counter() - t0)
            if progress is not None:
                progress.update(1)
    for key in keys:
        out[key]["median"] = statistics.median(out[key]["times"])
        if not cuda:
            del out[key]["peak"]
    return out


# ---------------------------------------------------------------------------------------------------
# Search


def largest_fitting(measure, budget: float, known: dict, start: int = 1, cap: int | None = None):
    """Largest integer v >= start with measure(v) <= budget, for a measure that grows with v.

    Each guess is a real measurement. Guesses interpolate linearly between the nearest points
    measured so far (``known`` seeds them; ``start`` is probed when none of them fits), extrapolate
    at most 4x while no point is over budget, and fall back to bisection whenever interpolation did
    not halve the bracket. Returns (v, capped): v = 0 when even ``start`` does not fit; capped = True
    when ``cap`` itself fits.
    """
    points = dict(known)

    def probe(v):
        if v not in points:
            points[v] = measure(v)
        return points[v]

    if all(m > budget for m in points.values()) and probe(start) > budget:
        return 0, False
    bisect_next = False
    while True:
        lo = max(v for v, m in points.items() if m <= budget)
        over = [v for v, m in points.items() if m > budget]
        hi = min(over) if over else None
        if cap is not None and lo >= cap:
            return cap, True
        if hi is not None and hi - lo <= 1:
            return lo, False
        below = sorted(v for v in points if v <= lo)
        if hi is None:
            v0 = below[-2] if len(below) > 1 else 0
            m0 = points[v0] if v0 else 0.0
            slope = (points[lo] - m0) / (lo - v0)
            guess = min(lo + (budget - points[lo]) / max(slope, 1e-9), 4 * lo)
            upper = 4 * lo + 1
            if cap is not None:
                guess, upper = min(guess, cap), cap + 1
        elif bisect_next:
            guess, upper = (lo + hi) / 2, hi
        else:
            guess = lo + (budget - points[lo]) * (hi - lo) / (points[hi] - points[lo])
            upper = hi
        guess = min(max(int(guess), lo + 1), upper - 1)
        width = (hi - lo) if hi is not None else None
        probe(guess)
        new_lo = max(v for v, m in points.items() if m <= budget)
        new_hi = min((v for v, m in points.items() if m > budget), default=None)
        bisect_next = width is not None and new_hi is not None and (new_hi - new_lo) * 2 > width


# ---------------------------------------------------------------------------------------------------
# Command line and output


def parser(description: str, budget=False) -> argparse.ArgumentParser:
    """The flags both scripts take; config flags left unset keep the preset's (default/--quick/--full) value."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    p.add_argument("--model", default="densenet121", help=f"{', '.join(ARCHS)} or bc<depth> (default: densenet121)")
    p.add_argument("--batch", type=int, help="batch size, replacing the preset's")
    p.add_argument("--size", type=int, help="input height = width, replacing the preset's")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="default: float32")
    p.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    p.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--repeats", type=int, help="timed steps per implementation, median reported (preset: 5 or more)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile of torchvision and of both fused modes (default: on CUDA only; a cold compile "
        "takes minutes on a small CPU)",
    )
    if budget:
        p.add_argument("--budget", type=float, help="MiB for the max-batch and max-depth searches (default: 256)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small configs, for development")
    mode.add_argument("--full", action="store_true", help="bigger configs and more repeats (tens of minutes on CPU)")
    p.add_argument("--out", default=RESULTS_DIR, help="where JSON, CSV and PNG go (default: benchmarks/results)")
    return p


def preset(args, presets: dict) -> dict:
    """The preset the mode flags pick, with any config flag given on the command line applied on top."""
    chosen = dict(presets["quick" if args.quick else "full" if args.full else "default"])
    for key in ("batch", "size", "repeats", "budget"):
        if getattr(args, key, None) is not None:
            chosen[key] = getattr(args, key)
    return chosen


def compile_decision(args, device: torch.device) -> tuple[bool, str]:
    """Whether the compiled implementations (``COMPILED``) run, and the reason printed when they do not."""
    if args.compile is not None:
        return args.compile, "" if args.compile else "torch.compile skipped (--no-compile)"
    if device.type == "cuda":
        return True, ""
    return False, (
        "torch.compile (of torchvision and of ours) skipped on CPU: a cold compile of DenseNet-121's training "
        "step took 482 s on the 2-core dev machine (35 s with a warm inductor cache; measured once, torch 2.14). "
        "Pass --compile to include it."
    )


@dataclass
class Run:
    """One benchmark run: parsed flags, where it runs, the implementations compared, and its clock."""

    args: argparse.Namespace
    setup: Setup
    arch: Arch
    impls: list
    skip_reason: str
    env: dict
    start: float

    def finish(self, stem: str, data: dict, rows: list, also=()) -> None:
        """Write <stem>.json (environment, setup, data, wall time) and <stem>.csv (rows) to --out."""
        wall = time.perf_counter() - self.start
        data = {"environment": self.env, "setup": self.setup.describe(), **data, "wall_s": wall}
        write_json(os.path.join(self.args.out, f"{stem}.json"), data)
        write_csv(os.path.join(self.args.out, f"{stem}.csv"), rows)
        files = ", ".join([f"{stem}.json", f"{stem}.csv", *also])
        print(f"\nwrote {files} to {self.args.out} ({wall:.0f} s)")


def start_run(args, title: str) -> Run:
    """Print the header (versions, device, backend, compile decision) and create --out."""
    setup = Setup.from_args(args)
    with_compile, skip_reason = compile_decision(args, setup.device)
    impls = [key for key in IMPLS if key not in COMPILED or with_compile]
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    env = header(title, setup.device)
    if skip_reason:
        print(skip_reason)
    return Run(args, setup, arch(args.model), impls, skip_reason, env, start)


def compile_note(seconds) -> str:
    return f"  (torch.compile's first step, which compiles, took {seconds:.0f} s)"


def fused_backend(device: torch.device) -> str:
    """Which backend densenet_fused's primitives run on this device (C++/Triton kernels or reference)."""
    try:
        from densenet_fused.ops import _backend

        return _backend.backend_for(torch.empty(1, device=device))
    except Exception as error:  # the package may not expose this; the benchmark does not depend on it
        return f"unknown ({error})"


def environment(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "densenet_fused_backend": fused_backend(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def header(title: str, device: torch.device) -> dict:
    env = environment(device)
    print(title)
    print(
        f"torch {env['torch']}, torchvision {env['torchvision']}, {env['device']}"
        f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, {env['cpu_threads']} CPU threads, "
        f"OMP_WAIT_POLICY={env['omp_wait_policy']}, densenet_fused backend: {env['densenet_fused_backend']}"
    )
    return env


def ratio(value, base) -> str:
    if value is None or base is None or not base or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / base:.2f}x"


def table(headers: list, rows: list, indent: str = "  ") -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row):
        return indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule] + [fmt(row) for row in cells[1:]])


def write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


def write_csv(path: str, rows: list) -> None:
    """Rows are dicts; the columns are the union of their keys, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def short_error(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]
