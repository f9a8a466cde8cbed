"""One prepared GPU check: environment, numerics, kernel and whole-step time, memory and sync-freedom.

Made for a GPU lent for a few minutes: on one H100/H200 it takes at most 8 minutes (every section has a
time limit and the whole run a budget, ``BUDGET_S``) and writes ``<out>/<gpu>.md`` and ``.json``. Both are
rewritten after every section, so a run cut short still leaves a report, and a section that fails records
its error while the next one runs.

    python benchmarks/gpu_check.py             # on the GPU: benchmarks/results/gpu/<gpu>.md and .json
    python benchmarks/gpu_check.py --dry-run   # on CPU: every code path on tiny shapes, Triton interpreted

The dry run (what CI runs, through tests/test_gpu_check.py) uses a tiny DenseNet and runs the Triton
kernels on CPU through Triton's interpreter; what it cannot measure (CUDA-event times, GPU memory, sync
debug mode, bf16 in the interpreter) it reports as "not measured (CPU dry run)".
"""

import argparse
import contextlib
import datetime
import gc
import inspect
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NamedTuple

if "--dry-run" in sys.argv:  # the dry run is on CPU: Triton's interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import _common as C  # noqa: E402  (first after that: it sets the profiler environment before torch loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import memory  # noqa: E402  (its Measurer: activation memory per model, batch and implementation, OOM-tolerant)
from densenet_fused.ops import PRIMITIVES  # noqa: E402
from densenet_fused.ops.layout import acc_dtype  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from twins import ROUNDING_SPREAD, errors_against_float64, randomize_affine, twins  # noqa: E402

BUDGET_S = 450  # all sections together; with imports and CUDA start-up (~15 s) the run stays within 8 minutes
NOT_MEASURED = "not measured (CPU dry run)"
TINY = C.Arch("tiny", 4, (2, 2), 8, 10)


@dataclass(frozen=True)
class Plan:
    """The shapes, repeats and budgets of a run: the GPU's, or the dry run's tiny ones."""

    arch: C.Arch  # the model timed, measured and checked for syncs, at batch x size^2
    batch: int
    size: int
    numerics: tuple  # (arch, batch, size) whose first layer and transition the primitives are checked at
    step_repeats: int  # timed training steps per implementation
    kernel_repeats: int  # timed calls per kernel
    budget: int  # bytes: the max-batch search's memory budget
    batch_cap: int | None  # the max-batch search stops there
    compile_backend: str


GPU_PLAN = Plan(C.arch("densenet121"), 64, 224, (C.Arch("small", 16, (3, 3), 32, 10), 4, 64), 10, 20, 16 * 2**30,
                None, "inductor")  # fmt: skip
# aot_eager: the compiled code paths (dynamo, AOTAutograd, our ops' fakes) without inductor's minutes-long CPU build.
DRY_PLAN = Plan(TINY, 2, 32, (TINY, 2, 32), 1, 1, C.MiB, 64, "aot_eager")

# name: (dtype, DENSENET_FUSED_TF32, the tolerance tests/test_triton_ops.py allows)
PRECISIONS = {
    "fp32 IEEE": (torch.float32, "0", 2e-5),
    "fp32 TF32": (torch.float32, "1", 1e-2),
    "fp16": (torch.float16, "0", 4e-3),
    "bf16": (torch.bfloat16, "0", 3e-2),
}


# ---------------------------------------------------------------------------------------------------
# Sections, the report, time limits


@dataclass
class Section:
    """One section of the report: what it found so far (notes, tables, data), however it ended."""

    title: str
    estimate_s: int  # expected seconds on one H100/H200
    limit_s: int  # it is stopped there (or earlier, when the run's budget ends first)
    run: Callable
    status: str = "not run"
    seconds: float | None = None
    deadline: float = 0.0  # time.perf_counter() at which it is stopped
    notes: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def table(self, *headers) -> list:
        """A new table; append its rows to the list returned (a cut-off section keeps those it has)."""
        rows = []
        self.tables.append({"headers": list(headers), "rows": rows})
        return rows

    def markdown(self) -> list:
        took = "" if self.seconds is None else f", {self.seconds:.0f} s"
        budget = f"estimate {self.estimate_s} s, limit {self.limit_s} s"
        lines = [f"## {self.title}", "", f"*{self.status}{took}* ({budget})", ""]
        for note in self.notes:
            lines += [note, ""]
        for t in self.tables:
            lines += ["| " + " | ".join(t["headers"]) + " |", "|" + " --- |" * len(t["headers"])]
            lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in t["rows"]] + [""]
        return lines


SECTIONS: list[Section] = []


def section(title: str, estimate_s: int, limit_s: int):
    """Register a section function ``fn(check, sec)``; sections run in the order they are defined."""

    def register(fn):
        SECTIONS.append(Section(title, estimate_s, limit_s, fn))
        return fn

    return register


class OutOfTime(BaseException):
    """A section's time limit passed. A BaseException, so the ``except Exception`` inside sections let it by."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def environ(**values: str):
    """Set environment variables (``_backend.config`` reads them at each call), then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def ieee_fp32():
    """torch's own float32 matmuls and convolutions (references, torchvision) in IEEE fp32, not TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Check:
    """A run: its plan, where it runs, and the report it writes."""

    plan: Plan
    dry_run: bool
    setup: C.Setup  # AMP bf16, channels_last
    name: str  # the GPU's name (the report's title)
    out: str
    stem: str  # file name of the report, without .md / .json
    start: float

    @property
    def device(self) -> torch.device:
        return self.setup.device

    def dry(self, note: str, sec: Section) -> None:
        """In the dry run, say in ``sec`` what it did and did not measure."""
        if self.dry_run:
            sec.notes.append(f"CPU dry run: {note}")

    def write(self) -> None:
        wall = time.perf_counter() - self.start
        title = "densenet_fused GPU check " + ("(CPU dry run)" if self.dry_run else f"on {self.name}")
        lines = [f"# {title}", "", f"`python benchmarks/gpu_check.py{' --dry-run' if self.dry_run else ''}`, "
                 f"{wall:.0f} s used of the {BUDGET_S} s budget.", ""]  # fmt: skip
        lines += ["| section | status | seconds | estimate s | limit s |", "| --- | --- | ---: | ---: | ---: |"]
        for s in SECTIONS:
            took = "-" if s.seconds is None else f"{s.seconds:.0f}"
            lines.append(f"| {s.title} | {s.status} | {took} | {s.estimate_s} | {s.limit_s} |")
        lines.append("")
        for s in SECTIONS:
            lines += s.markdown()
        with open(os.path.join(self.out, f"{self.stem}.md"), "w") as f:
            f.write("\n".join(lines))
        keys = ("title", "status", "seconds", "estimate_s", "limit_s", "notes", "tables", "data")
        sections = [{key: getattr(s, key) for key in keys} for s in SECTIONS]
        data = {"title": title, "dry_run": self.dry_run, "wall_s": wall, "budget_s": BUDGET_S, "sections": sections}
        C.write_json(os.path.join(self.out, f"{self.stem}.json"), data)


def run_sections(check: Check) -> None:
    """Each section within its limit and what is left of the budget; the report is rewritten after each."""
    end = check.start + BUDGET_S
    for sec in SECTIONS:
        left = end - time.perf_counter()
        if left < 5:
            sec.status = "skipped: the run's time budget is spent"
            continue
        limit = min(sec.limit_s, left)
        sec.status, sec.deadline = "running", time.perf_counter() + limit
        check.write()
        t0 = time.perf_counter()
        try:
            with time_limit(limit):
                sec.run(check, sec)
            sec.status = "done"
        except OutOfTime:
            sec.status = f"stopped at its time limit ({limit:.0f} s): partial"
        except Exception as error:
            sec.status = f"failed: {C.short_error(error)}"
            sec.data["error"] = traceback.format_exc()
        sec.seconds = time.perf_counter() - t0
        gc.collect()
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
        check.write()
        print(f"{sec.title}: {sec.status} ({sec.seconds:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------------
# Primitive inputs at DenseNet shapes


class OpShape(NamedTuple):
    """Where a primitive reads: x = buffer[:, start:start + channels] of a [batch, total, side, side] buffer."""

    batch: int
    side: int
    total: int
    channels: int
    out: int  # output channels of a 1x1 conv (its weight is [out, channels])
    start: int = 0

    def describe(self) -> str:
        part = f"{self.start}:{self.start + self.channels} of {self.total}"
        return f"[{self.batch}, {part}, {self.side}, {self.side}] -> {self.out}"


def primitive_shapes(arch: C.Arch, batch: int, size: int) -> list:
    """(where, primitive, shape) at the widest layer of every block and at every transition of ``arch``.

    The layer's channel_stats read its k new channels, bn_relu its bottleneck (bn_size 4, as torchvision's
    DenseNets), bn_relu_conv1x1 the buffer's prefix; a transition reads the whole buffer.
    """
    side, c0, k = size // 4, arch.num_init_features, arch.growth_rate
    width, shapes = 4 * k, []
    for i, layers in enumerate(arch.block_config, 1):
        total, c = c0 + layers * k, c0 + (layers - 1) * k
        where = f"block {i} layer {layers}"
        shapes += [
            (where, "channel_stats", OpShape(batch, side, total, k, k, start=c)),
            (where, "bn_relu", OpShape(batch, side, width, width, width)),
            (where, "bn_relu_conv1x1", OpShape(batch, side, total, c, width)),
        ]
        if i < len(arch.block_config):
            shapes.append((f"transition {i}", "bn_relu_pool_conv1x1", OpShape(batch, side, total, total, total // 2)))
            side, c0 = side // 2, total // 2
    return shapes


def op_inputs(primitive, op, shape: OpShape, dtype, device, seed: int = 0) -> dict:
    """``op``'s arguments, named as its reference's parameters: x a channel slice of a channels-last buffer,
    statistics and affine parameters in the accumulation dtype, a weight scaled as kaiming's, the gradient
    shaped as the primitive's forward output, the gradient buffer as x's buffer; training=True."""
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)

    def randn_like(t):
        return torch.empty_like(t).copy_(torch.randn(t.shape, generator=gen))

    def randn(*size, dtype=acc):
        return torch.randn(size, generator=gen).to(device, dtype)

    c = shape.channels
    buf = torch.empty(shape.batch, shape.total, shape.side, shape.side, dtype=dtype, device=device)
    buf = randn_like(buf.to(memory_format=torch.channels_last))
    values = {
        "x": buf[:, shape.start : shape.start + c],
        "mean": 0.2 * randn(c),
        "invstd": 0.5 + randn(c).abs(),
        "gamma": randn(c),
        "beta": randn(c),
        "weight": randn(shape.out, c, dtype=dtype) * c**-0.5,
        "grad_buffer": randn_like(buf),
        "training": True,
    }
    names = list(inspect.signature(op.reference).parameters)
    if "grad_y" in names or "grad_z" in names:
        forward = primitive.ops[primitive.name].reference
        out = forward(*[values[n] for n in inspect.signature(forward).parameters])
        values["grad_y"] = values["grad_z"] = randn_like(out)
    return {name: values[name] for name in names}


def max_relative_error(op, args: dict) -> tuple[float, str]:
    """(max |triton - reference| / max |reference|, over the output where it is largest, and that output's name);
    the gradient buffer an op adds into counts as an output."""
    results = []
    for backend in ("triton", "reference"):
        call = {name: a.clone() if name == "grad_buffer" else a for name, a in args.items()}
        out = op.kernels[backend](*call.values())
        outs = {f"out[{i}]": t for i, t in enumerate(out)} if isinstance(out, tuple) else {"out": out}
        results.append({**outs, **({"grad_buffer": call["grad_buffer"]} if "grad_buffer" in call else {})})
    errors = {}
    for name, got in results[0].items():
        want = results[1][name].double()
        errors[name] = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def ops():
    """(primitive, op) for every op in PRIMITIVES: each primitive's forward op, then its backward op."""
    return [(p, op) for p in PRIMITIVES.values() for op in sorted(p.ops.values(), key=lambda op: op.name != p.name)]


# ---------------------------------------------------------------------------------------------------
# The sections, in run order. Estimates are for one H100/H200 with a cold Triton and inductor cache.


# Estimate: versions and nvidia-smi, ~2 s.
@section("Environment", estimate_s=2, limit_s=20)
def environment(check: Check, sec: Section):
    import triton

    info = C.environment(check.device)
    info.update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        triton=triton.__version__,
        commit=git_commit(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        info.update(capability=f"sm{props.major}{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, driver=nvidia_smi("driver_version"))  # fmt: skip
    else:
        info.update(gpu="none", driver="none")
    check.dry("no GPU: the versions are this machine's.", sec)
    sec.data.update(info)
    rows = sec.table("what", "value")
    rows += [[key, value] for key, value in info.items()]


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def nvidia_smi(query: str) -> str:
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10)  # fmt: skip
        return result.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as error:
        return f"unknown ({C.short_error(error)})"


# Estimate: 7 ops x 4 precisions at small shapes; dominated by cold Triton compiles and autotuning of the
# 1x1-conv kernels (about 4 kernels x 4 precision families x ~6 configs), ~45 s.
@section("Numerics: Triton primitives against the reference", estimate_s=45, limit_s=75)
def primitive_numerics(check: Check, sec: Section):
    arch, batch, size = check.plan.numerics
    shapes = {}
    for where, name, shape in reversed(primitive_shapes(arch, batch, size)):
        shapes[name] = (where, shape)  # each primitive at its first place: block 1's widest layer, transition 1
    sec.notes.append(
        f"max |triton - reference| / max |reference| over each op's outputs (the worst one named), both kernels called "
        f"directly at a DenseNet-like shape ({arch.name}: k={arch.growth_rate}, batch {batch}, {size}x{size} input, "
        "channels_last prefix views, training=True); torch's own fp32 matmuls IEEE. **over** marks an error above "
        "the tolerance of tests/test_triton_ops.py ("
        + ", ".join(f"{label} {tol:g}" for label, (_, _, tol) in PRECISIONS.items()) + ")."
    )
    check.dry("Triton's interpreter on CPU (real comparisons); bf16 not measured (broken in the interpreter).", sec)
    rows = sec.table("op", "shape", *PRECISIONS)
    with ieee_fp32():
        for primitive, op in ops():
            where, shape = shapes[primitive.name]
            row = [op.name, f"{where}: {shape.describe()}"]
            for label, (dtype, tf32, tol) in PRECISIONS.items():
                if check.dry_run and dtype == torch.bfloat16:
                    row.append(f"{NOT_MEASURED}: bf16 is broken in the interpreter")
                    continue
                try:
                    with environ(DENSENET_FUSED_TF32=tf32):
                        err, output = max_relative_error(op, op_inputs(primitive, op, shape, dtype, check.device))
                    sec.data[f"{op.name} {label}"] = {"error": err, "output": output}
                    row.append(f"{err:.1e} {output}" + (" **over**" if err > tol else ""))
                except Exception as error:
                    row.append(f"error: {C.short_error(error)}")
            rows.append(row)


# Estimate: 3 tiny models, one fp32 step each of ours and torchvision's, plus torchvision in float64, ~10 s.
@section("Numerics: tiny models against torchvision (float64 truth)", estimate_s=10, limit_s=40)
def fuzz(check: Check, sec: Section):
    sec.notes.append(
        "Random tiny DenseNets (seeded), one training step in float32 with our Triton kernels forced, same weights "
        "and input as torchvision: relative error (L2 norm) against torchvision in float64, next to torchvision "
        f"float32's own. **look** marks ours above {ROUNDING_SPREAD}x torchvision's (the test suite judges the median "
        "over 5 seeds; one seed can land above by chance, a bug lands orders of magnitude above)."
    )
    check.dry("Triton's interpreter on CPU (real comparisons).", sec)
    rows = sec.table("config", "quantity", "ours vs float64", "torchvision fp32 vs float64", "ours / torchvision")
    with ieee_fp32(), environ(DENSENET_FUSED_BACKEND="triton"):
        for seed in range(3):
            config, batch, size, channels_last = fuzz_config(seed)
            ours, theirs = twins(dtype=torch.float32, seed=seed, **config)
            theirs.load_state_dict(randomize_affine(ours).state_dict())
            layout = torch.channels_last if channels_last else torch.contiguous_format
            ours, theirs = (m.to(check.device, memory_format=layout) for m in (ours, theirs))
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(batch, 3, size, size, generator=gen).to(check.device, memory_format=layout)
            target = torch.randint(0, config["num_classes"], (batch,), generator=gen).to(check.device)
            errors = errors_against_float64(ours, theirs, x, lambda out: F.cross_entropy(out, target))
            described = f"{config}, batch {batch}, {size}x{size}" + (", channels_last" if channels_last else "")
            sec.data[described] = errors
            for what, (mine, peer) in errors.items():
                ratio = mine / peer if peer else float("inf")
                rows.append([described, what, f"{mine:.2e}", f"{peer:.2e}",
                             f"{ratio:.2f}" + (" **look**" if ratio > ROUNDING_SPREAD else "")])  # fmt: skip
                described = ""


def fuzz_config(seed: int):
    """(DenseNet kwargs, batch, size, channels_last): 1-3 blocks of 1-3 layers, the last block at 2x2 or more."""
    rng = random.Random(seed)
    config = dict(
        growth_rate=rng.randint(2, 8),
        block_config=tuple(rng.randint(1, 3) for _ in range(rng.randint(1, 3))),
        num_init_features=rng.randint(4, 12),
        bn_size=rng.randint(1, 4),
        num_classes=5,
        memory_efficient=rng.random() < 0.5,
    )
    return config, rng.randint(2, 4), rng.randint(32, 48), rng.random() < 0.5


# Estimate: 26 (op, layer) rows x 2 kernels x 21 calls of at most a few ms, plus autotuning the 1x1-conv
# kernels for each new (C, pixels) bucket at batch 64 (~20 buckets x ~1 s), ~40 s.
@section("Per-primitive time: Triton against the PyTorch reference", estimate_s=40, limit_s=70)
def kernel_time(check: Check, sec: Section):
    p = check.plan
    dtype = torch.bfloat16 if not check.dry_run else torch.float32
    sec.notes.append(
        f"{p.arch.name}, batch {p.batch}, {p.size}x{p.size} input, {str(dtype).replace('torch.', '')}, channels_last "
        "views of the block buffer: the widest layer of every block and every transition. Median of "
        f"{p.kernel_repeats} CUDA-event timings per kernel, interleaved, after one warm-up call (which autotunes). "
        "The reference is pure PyTorch (cuBLAS GEMMs, torch elementwise ops); its backward ops compute in float32 "
        "(they upcast), so those rows race an fp32 GEMM, not a bf16 one. **Triton slower** flags a row where Triton "
        "loses."
    )
    check.dry("tiny model, float32 (bf16 is broken in the interpreter), one call each: times "
              f"{NOT_MEASURED}.", sec)  # fmt: skip
    rows = sec.table("op", "where", "shape", "Triton ms", "reference ms", "Triton / reference")
    for where, name, shape in primitive_shapes(p.arch, p.batch, p.size):
        for primitive, op in [(prim, op) for prim, op in ops() if prim.name == name]:
            row = [op.name, where, shape.describe()]
            try:
                args = op_inputs(primitive, op, shape, dtype, check.device)
                steps = {backend: partial(op.kernels[backend], *args.values()) for backend in ("triton", "reference")}
                times = C.time_steps(steps, p.kernel_repeats, warmup=1, device=check.device)
            except Exception as error:
                rows.append(row + [f"error: {C.short_error(error)}", "", ""])
                continue
            if check.dry_run:
                row += [NOT_MEASURED] * 3
            else:
                triton_s, reference_s = times["triton"]["median"], times["reference"]["median"]
                ratio = triton_s / reference_s
                row += [f"{triton_s * 1e3:.3f}", f"{reference_s * 1e3:.3f}",
                        f"{ratio:.2f}" + (" **Triton slower**" if ratio > 1 else "")]  # fmt: skip
                sec.data[f"{op.name} {where}"] = {"triton_s": triton_s, "reference_s": reference_s}
            rows.append(row)


# Estimate: eager (5 implementations x 12 steps of ~0.1-0.3 s, plus Triton autotuning in the first step,
# ~25 s), then cold compiles: torch.compile(torchvision) ~90 s, ours ~25 s in each mode (the blocks are
# opaque custom ops, so the graph is small), each then 12 steps: ~170 s.
@section("Whole training step: time and memory", estimate_s=170, limit_s=210)
def whole_step(check: Check, sec: Section):
    p, setup = check.plan, check.setup
    sec.notes.append(
        f"{p.arch.name}, batch {p.batch}, {p.size}x{p.size}, {setup.describe()}: zero_grad, forward, cross-entropy, "
        f"backward. Step time: median of {p.step_repeats} CUDA-event timings after one warm-up step; the eager "
        "implementations interleaved, each compiled one timed after its compile (`first step s` includes the "
        "compile and Triton's autotuning). max_memory_allocated: torch's peak over the timed steps, with the other "
        "models' parameters and gradients also resident; activation: the step's peak above what was allocated "
        "before it, gradients preallocated (benchmarks/_common.py)."
    )
    check.dry(f"tiny model on CPU, C++ kernels, torch.compile with {p.compile_backend}; step times and "
              f"max_memory_allocated {NOT_MEASURED}; activation is the exact CPU count.", sec)  # fmt: skip
    rows = sec.table("implementation", "first step s", "step ms", "vs naive", "max_memory_allocated MiB",
                     "activation MiB", "vs naive")  # fmt: skip
    x, target = C.make_batch(p.arch, p.batch, p.size, setup)
    results = sec.data

    def record(models, keys):
        keys = [key for key in keys if "error" not in results[key]]
        steps = {key: partial(C.train_step, models[key], x, target, setup.amp) for key in keys}
        timings = C.time_steps(steps, p.step_repeats, warmup=1, device=setup.device)
        for key, t in timings.items():
            results[key].update(median_s=t["median"], max_memory_allocated=t.get("peak"),
                                activation=C.activation_bytes(models[key], x, target, setup.amp))  # fmt: skip
            rows.append(whole_step_row(check, key, results))

    eager = C.build_models(p.arch, C.EAGER_IMPLS, setup)
    params = sum(t.nbytes for t in eager[C.BASELINE].parameters()) / C.MiB
    sec.notes.append(f"Each model's parameters take {params:.1f} MiB, and so do its gradients.")
    for key in C.EAGER_IMPLS:
        results[key] = first_step(eager[key], x, target, setup.amp)
    record(eager, C.EAGER_IMPLS)
    for key in C.COMPILED:  # one at a time: a compile that runs out of time loses only its own row
        torch._dynamo.reset()
        model = C.build_models(p.arch, [key], setup, backend=p.compile_backend)
        results[key] = first_step(model[key], x, target, setup.amp)
        record(model, [key])
    for key, r in results.items():
        if "error" in r:
            rows.append([C.IMPLS[key], f"error: {r['error']}", "", "", "", "", ""])


def first_step(model, x, target, amp) -> dict:
    """{"first_step_s": seconds} of one training step (compiles and autotunes), or {"error": ...}."""
    try:
        return {"first_step_s": C.first_step(model, x, target, amp)}
    except Exception as error:
        return {"error": C.short_error(error)}


def whole_step_row(check: Check, key: str, results: dict) -> list:
    r, base = results[key], results.get(C.BASELINE, {})
    row = [C.IMPLS[key], f"{r['first_step_s']:.1f}"]
    if check.dry_run:
        row += [NOT_MEASURED, "", NOT_MEASURED]
    else:
        row += [f"{r['median_s'] * 1e3:.1f}", C.ratio(r["median_s"], base.get("median_s")),
                f"{r['max_memory_allocated'] / C.MiB:.0f}"]  # fmt: skip
    return row + [f"{r['activation'] / C.MiB:.1f}", C.ratio(r["activation"], base.get("activation"))]


# Estimate: two warm-up steps per check (batch 64: already autotuned by the section before), ~10 s.
@section("Sync-freedom of our forward and backward", estimate_s=10, limit_s=40)
def sync_freedom(check: Check, sec: Section):
    p, setup = check.plan, check.setup
    sec.notes.append(
        f"{p.arch.name}, batch {p.batch}, {p.size}x{p.size}, {setup.describe()}: after two warm-up calls "
        "(autotuning and compilation synchronize, legitimately), one more under "
        '`torch.cuda.set_sync_debug_mode("error")`, which raises at any host-device synchronization.'
    )
    check.dry(f"the warm-up calls run; the check itself {NOT_MEASURED} (sync debug mode is CUDA only).", sec)
    rows = sec.table("implementation", "what", "result")
    models = C.build_models(p.arch, ["fused_eff", "fused_keep"], setup)
    x, target = C.make_batch(p.arch, p.batch, p.size, setup)
    checks = [(key, "training step", True, partial(C.train_step, m, x, target, setup.amp)) for key, m in models.items()]
    checks.append(("fused_eff", "eval forward, no_grad", False, partial(C.eval_step, models["fused_eff"], x, setup.amp)))
    for key, what, train, step in checks:
        models[key].train(train)
        result = check_sync_free(step, check.device)
        sec.data[f"{key} {what}"] = result
        rows.append([C.IMPLS[key], what, result])


def check_sync_free(step, device) -> str:
    """"pass", or the error sync debug mode raised and where in densenet_fused it came from (the innermost
    three frames, outermost first)."""
    step(), step()
    if device.type != "cuda":
        return NOT_MEASURED
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        package = f"{os.sep}densenet_fused{os.sep}"
        ours = [f"densenet_fused/{frame.filename.split(package, 1)[1]}:{frame.lineno}"
                for frame in traceback.extract_tb(error.__traceback__) if package in frame.filename]  # fmt: skip
        return f"**sync**: {C.short_error(error)}" + (f" (at {' > '.join(ours[-3:])})" if ours else "")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return "pass"


# Estimate: 39 bf16 tests (tests/test_triton_ops.py, test_instance_norm.py) with their own Triton compiles,
# partly cached by the sections before, plus ~5 s of collection, ~60 s. It runs after the measurements that
# only this script makes, so that a slow cold compile here cuts the least.
@section("Numerics: the CUDA-marked tests", estimate_s=60, limit_s=120)
def cuda_tests(check: Check, sec: Section):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    sec.notes.append(f"`{' '.join(command[2:])}` in a subprocess, TRITON_INTERPRET unset on a GPU.")
    check.dry("the same command with no GPU visible, so every cuda-marked test skips: this checks the "
              "selection and the report, not the kernels (~8 s).", sec)  # fmt: skip
    env = dict(os.environ)
    if check.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # as on a CPU machine, also where there is a GPU
    else:
        env.pop("TRITON_INTERPRET", None)
    timeout = max(1.0, sec.deadline - time.perf_counter() - 5)
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, sec.data["returncode"] = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace")  # bytes, whatever text= says
        sec.notes.append(f"**timed out** after {timeout:.0f} s; the output so far is below.")
    lines = output.splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), None)
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    sec.data.update(summary=summary, failures=failures, tail=lines[-40:])
    sec.notes.append(f"Summary: `{summary or 'no summary line'}`")
    if failures:
        sec.notes.append("Failures:\n\n" + "\n".join(f"- `{line}`" for line in failures))
    elif summary is None:
        sec.notes.append("Last lines:\n\n```\n" + "\n".join(lines[-20:]) + "\n```")


# Estimate: per eager implementation ~6 probes, each two real steps at up to ~1000 images (fused) plus
# autotuning for each new pixel bucket, ~25 s per implementation: ~100 s.
@section("Max batch under the memory budget", estimate_s=100, limit_s=130)
def max_batch(check: Check, sec: Section):
    p, setup = check.plan, check.setup
    budget = f"{p.budget / 2**30:g} GiB" if p.budget >= 2**30 else f"{p.budget / C.MiB:g} MiB"
    sec.notes.append(
        f"{p.arch.name}, {p.size}x{p.size}, {setup.describe()}: the largest batch whose training step fits in "
        f"{budget} (parameters, gradients, buffers, the batch and the step's activation peak), found by "
        "_common.largest_fitting, every probe a real measured step. Each implementation gets an equal share "
        "of the section's time; a search cut short reports the largest batch that fitted so far."
    )
    check.dry(f"tiny model, {budget} budget, searched up to {p.batch_cap}, CPU accounting: not the GPU's figure "
              f"({NOT_MEASURED}).", sec)  # fmt: skip
    rows = sec.table("implementation", f"max batch <= {budget}")
    m = memory.Measurer(setup)
    for i, key in enumerate(C.EAGER_IMPLS):
        share_end = time.perf_counter() + (sec.deadline - time.perf_counter()) / (len(C.EAGER_IMPLS) - i)
        result = search_batch(m, p, key, share_end)
        sec.data[key] = result
        rows.append([C.IMPLS[key], result])
        m.drop(p.arch)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    for key in C.COMPILED:
        rows.append([C.IMPLS[key], "skipped: every batch size recompiles"])
    if m.errors:
        sec.notes.append("Errors: " + "; ".join(dict.fromkeys(m.errors)))


class ShareSpent(Exception):
    """An implementation's share of the max-batch section's time is spent."""


def search_batch(m, p: Plan, key: str, share_end: float) -> str:
    def total(batch):
        if time.perf_counter() > share_end:
            raise ShareSpent()
        return m.total(p.arch, batch, p.size, key)

    try:
        found, capped = C.largest_fitting(total, p.budget, {p.batch: total(p.batch)}, start=2, cap=p.batch_cap)
        return f">= {found} (the cap)" if capped else str(found)
    except ShareSpent:
        fitting = [b for (_, b, _, k), act in m.cache.items() if k == key and act is not None
                   and m.total(p.arch, b, p.size, key) <= p.budget]  # fmt: skip
        return f">= {max(fitting)} (search cut at its time share)" if fitting else "- (no probe fitted in time)"


# ---------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted: every code path")
    parser.add_argument("--out", default=os.path.join(C.RESULTS_DIR, "gpu"), help="default: benchmarks/results/gpu")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; --dry-run runs every code path on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU dry run" if args.dry_run else torch.cuda.get_device_name(device)
    os.makedirs(args.out, exist_ok=True)
    check = Check(
        plan=DRY_PLAN if args.dry_run else GPU_PLAN,
        dry_run=args.dry_run,
        setup=C.Setup(device, torch.float32, channels_last=True, amp=torch.bfloat16),
        name=name,
        out=args.out,
        stem=re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
        start=time.perf_counter(),
    )
    run_sections(check)
    print(f"wrote {check.stem}.md and {check.stem}.json to {args.out} ({time.perf_counter() - check.start:.0f} s)")


if __name__ == "__main__":
    main()
