"""One prepared GPU check: numerics, kernel time, the whole training step (eager, replayed from a CUDA graph,
host time, kernel launches, memory), sync-freedom, max batch, the CUDA-marked tests and the compiled step.

Made for a GPU lent for a few minutes, on that machine's own torch (2.11 or newer) and triton, from the
source tree, without the C++ extension, MONAI or timm. The run is time-boxed: ``--budget-s`` (default
``BUDGET_S``) is shared between the sections in proportion to their planned seconds, which come from the
first H200 run; the time a section leaves unused goes to the ones after it, and a section that fails or
runs out of time says so while the next one runs. With imports and CUDA start-up the default run takes at
most 7 minutes on one H100/H200. It writes ``<out>/<gpu>.md`` and ``.json``, rewritten after every section.

    python benchmarks/gpu_check.py                      # on the GPU: benchmarks/results/gpu/<gpu>.md and .json
    python benchmarks/gpu_check.py --budget-s 600       # more time; the compiled section, last, gets the rest
    python benchmarks/gpu_check.py --only step,compiled # some sections (and the environment)
    python benchmarks/gpu_check.py --dry-run            # on CPU: every code path on tiny shapes, Triton interpreted

The dry run (what CI runs, through tests/test_gpu_check.py) uses a tiny DenseNet and runs the Triton
kernels on CPU through Triton's interpreter; what it cannot measure (CUDA-event times, graph replay, GPU
memory, kernel launches, sync debug mode, bf16 in the interpreter) it reports as "not measured (CPU dry run)".
"""

import argparse
import datetime
import gc
import logging
import os
import random
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial

if __name__ == "__main__":
    if not __package__:  # run as a script: import the benchmarks package from the repository root, not this folder
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "--dry-run" in sys.argv:  # on CPU: Triton's interpreter must be on before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import flags  # noqa: E402
from benchmarks.accounting import activation_bytes, held_bytes  # noqa: E402
from benchmarks.measurer import Measurer  # noqa: E402
from benchmarks.models import (  # noqa: E402
    BASELINE,
    COMPILE_MODES,
    EAGER_IMPLS,
    IMPLS,
    MiB,
    Arch,
    Setup,
    named_arch,
    build_models,
    make_batch,
)
from benchmarks.primitives import max_relative_error, op_inputs, ops, primitive_shapes  # noqa: E402
from benchmarks.report import RESULTS_DIR, environment, package_commit, ratio, short_error  # noqa: E402
from benchmarks.search import largest_fitting  # noqa: E402
from benchmarks.sections import OutOfTime, Report, Section  # noqa: E402
from benchmarks.steps import eval_step, first_step, forward_backward, graphed_train_step, train_step  # noqa: E402
from benchmarks.timing import CaptureFailed, call_time, graph_replay, host_times, kernel_launches, time_steps  # noqa: E402
from benchmarks.twins import ROUNDING_SPREAD, errors_against_float64, randomize_affine, twins  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# All sections together. With imports and CUDA start-up (~15-25 s) the run stays within 7 minutes.
BUDGET_S = 390
NOT_MEASURED = "not measured (CPU dry run)"
TINY = Arch("tiny", 4, (2, 2), 8, 10)


@dataclass(frozen=True)
class Plan:
    """The shapes, repeats and budgets of a run: the GPU's, or the dry run's tiny ones."""

    arch: Arch  # the model timed, measured and checked for syncs, at batch x size^2
    batch: int
    size: int
    numerics: tuple  # (arch, batch, size) whose first layer and transition the primitives are checked at
    step_repeats: int  # timed training steps per implementation
    host_repeats: int  # steps whose host time is measured, per implementation
    graph_replays: int  # timed replays of the captured step
    kernel_calls: int  # calls of a kernel captured in one CUDA graph
    kernel_replays: int  # timed replays of that graph
    budget: int  # bytes: the max-batch search's memory budget
    batch_cap: int | None  # the max-batch search stops there
    compile_backends: dict = field(default_factory=dict)  # implementation -> torch.compile backend (else inductor)
    compiled: tuple | None = None  # the compiled implementations run (None: all of COMPILE_ORDER)


GPU_PLAN = Plan(named_arch("densenet121"), 64, 224, (Arch("small", 16, (3, 3), 32, 10), 4, 64), step_repeats=10,
                host_repeats=5, graph_replays=10, kernel_calls=20, kernel_replays=5, budget=16 * 2**30,
                batch_cap=None)  # fmt: skip
# The dry run compiles with aot_eager (dynamo, AOTAutograd and our ops' fakes, without inductor's minutes-long
# CPU build), but for ours with reduce-overhead: inductor on CPU tensors (~10 s), which skips the CUDA graphs.
# It leaves out the two default-mode rows whose code path another row already runs.
DRY_PLAN = Plan(TINY, 2, 32, (TINY, 2, 32), step_repeats=1, host_repeats=1, graph_replays=1, kernel_calls=1,
                kernel_replays=1, budget=MiB, batch_cap=64,
                compile_backends={"fused_eff_compile": "aot_eager", "tv_graphs": "aot_eager"},
                compiled=("fused_eff_compile", "fused_eff_graphs", "tv_graphs"))  # fmt: skip

# name: (dtype, float32 convolution precision, the tolerance the tests allow: tests/test_kernels.py, TF32
# tests/test_triton_ops.py). The Triton 1x1 convolutions follow torch's convolution precision flag, as cuDNN's
# do; torch's own GEMMs stay IEEE.
PRECISIONS = {
    "fp32 IEEE": (torch.float32, "ieee", 2e-5),
    "fp32 TF32": (torch.float32, "tf32", 1e-2),
    "fp16": (torch.float16, "ieee", 4e-3),
    "bf16": (torch.bfloat16, "ieee", 3e-2),
}

# The compiled section's order: ours first, so that a slow compile of torchvision (137 s on the first H200
# run) cannot take their time; torchvision's reduce-overhead before its default, which the first run measured.
COMPILE_ORDER = ["fused_eff_compile", "fused_eff_graphs", "fused_keep_compile", "tv_graphs", "tv_compile"]


@dataclass
class Check:
    """A run: its plan, where it runs, and what sections hand on to later ones (``shared``)."""

    plan: Plan
    dry_run: bool
    setup: Setup  # AMP bf16, channels_last
    commit: str | None = None  # --commit: the tree's commit when it is not a git checkout
    shared: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.setup.device

    def dry(self, note: str, sec: Section) -> None:
        """In the dry run, say in ``sec`` what it did and did not measure."""
        if self.dry_run:
            sec.notes.append(f"CPU dry run: {note}")


# (key, title, planned seconds, function), in run order; main() makes the Sections.
SECTIONS: list = []


def section(key: str, title: str, plan_s: float):
    """Register a section function ``fn(check, sec)``. ``plan_s``: its planned seconds on one H100/H200 (a
    share of ``BUDGET_S``), from the first H200 run's section times where the section existed then."""

    def register(fn):
        SECTIONS.append((key, title, plan_s, fn))
        return fn

    return register


def ms(seconds) -> str:
    return f"{seconds * 1e3:.1f}"


def mib(nbytes) -> str:
    return f"{nbytes / MiB:.0f}"


# ---------------------------------------------------------------------------------------------------
# The sections, in run order. Planned seconds are for one H100/H200 with a cold Triton and inductor cache.


# First run: 0 s.
@section("environment", "Environment", plan_s=5)
def environment_section(check: Check, sec: Section):
    import triton

    import densenet_fused

    info = environment(check.device)
    info.update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        triton=triton.__version__,
        densenet_fused_commit=check.commit + " (given by --commit)" if check.commit else package_commit(),
        densenet_fused_path=os.path.dirname(os.path.abspath(densenet_fused.__file__)),
        fp32_precision=", ".join(f"{k} {v}" for k, v in flags.fp32_precision().items()),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        info.update(capability=f"sm{props.major}{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, driver=nvidia_smi("driver_version"))  # fmt: skip
    else:
        info.update(gpu="none", driver="none")
    sec.notes.append(
        "densenet_fused_commit: the commit of the checkout the package is imported from (its own git work tree), "
        '"+ local changes" when its tracked files differ; "unknown" when the package is not at the top of a git '
        "work tree (a copied tree, or one nested in another repository). fp32_precision: torch's flags for "
        "float32 convolutions (which our 1x1 convolutions follow too) and GEMMs, as the check found them."
    )
    check.dry("no GPU: the versions are this machine's.", sec)
    sec.data.update(info)
    rows = sec.table("what", "value")
    rows += [[key, value] for key, value in info.items()]


def nvidia_smi(query: str) -> str:
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10)  # fmt: skip
        return result.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as error:
        return f"unknown ({short_error(error)})"


# First run: 39 s (7 ops x 4 precisions at small shapes, dominated by cold Triton compiles and autotuning).
@section("numerics", "Numerics: Triton primitives against the reference", plan_s=45)
def primitive_numerics(check: Check, sec: Section):
    arch_, batch, size = check.plan.numerics
    shapes = {}
    for where, name, shape in reversed(primitive_shapes(arch_, batch, size)):
        shapes[name] = (where, shape)  # each primitive at its first place: block 1's widest layer, transition 1
    sec.notes.append(
        f"max |triton - reference| / max |reference| over each op's outputs (the worst one named), both kernels called "
        f"directly at a DenseNet-like shape ({arch_.name}: k={arch_.growth_rate}, batch {batch}, {size}x{size} input, "
        "channels_last prefix views, training=True). fp32 IEEE / TF32: torch's float32 convolution precision flag "
        "(`torch.backends.cudnn.conv.fp32_precision`, or `allow_tf32` on older torch) set to ieee / tf32, which our "
        "1x1 convolutions follow as cuDNN's do; torch's own GEMMs (the reference) IEEE. **over** marks an error "
        "above the tolerance the tests allow (tests/test_kernels.py; TF32: tests/test_triton_ops.py): ("
        + ", ".join(f"{label} {tol:g}" for label, (_, _, tol) in PRECISIONS.items()) + ")."
    )
    check.dry("Triton's interpreter on CPU (real comparisons); bf16 not measured (broken in the interpreter).", sec)
    rows = sec.table("op", "shape", *PRECISIONS)
    for primitive, op in ops():
        where, shape = shapes[primitive.name]
        row = [op.name, f"{where}: {shape.describe()}"]
        rows.append(row)
        for label, (dtype, conv, tol) in PRECISIONS.items():
            if check.dry_run and dtype == torch.bfloat16:
                row.append(f"{NOT_MEASURED}: bf16 is broken in the interpreter")
                continue
            try:
                with flags.fp32(conv=conv, matmul="ieee"):
                    err, output = max_relative_error(op, op_inputs(primitive, op, shape, dtype, check.device))
                sec.data[f"{op.name} {label}"] = {"error": err, "output": output}
                row.append(f"{err:.1e} {output}" + (" **over**" if err > tol else ""))
            except Exception as error:
                row.append(f"error: {short_error(error)}")


# First run: 32 s (3 tiny models, one fp32 step each of ours and torchvision's, plus torchvision in float64).
@section("tiny-models", "Numerics: tiny models against torchvision (float64 truth)", plan_s=35)
def fuzz(check: Check, sec: Section):
    sec.notes.append(
        "Random tiny DenseNets (seeded), one training step in float32 (IEEE: convolution and GEMM precision flags "
        "set to ieee) with our Triton kernels forced, same weights and input as torchvision: relative error (L2 "
        "norm) against torchvision in float64, next to torchvision float32's own. "
        f"**look** marks ours above {ROUNDING_SPREAD}x torchvision's (the test suite judges the median over 5 "
        "seeds; one seed can land above by chance, a bug lands orders of magnitude above)."
    )
    check.dry("Triton's interpreter on CPU (real comparisons).", sec)
    rows = sec.table("config", "quantity", "ours vs float64", "torchvision fp32 vs float64", "ours / torchvision")
    with flags.fp32(conv="ieee", matmul="ieee"), flags.fused_backend("triton"):
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
                r = mine / peer if peer else float("inf")
                rows.append([described, what, f"{mine:.2e}", f"{peer:.2e}",
                             f"{r:.2f}" + (" **look**" if r > ROUNDING_SPREAD else "")])  # fmt: skip
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


# First run: 22 s with eager CUDA-event timing. Now each kernel's calls are captured in a CUDA graph and
# replayed (26 rows x 2 kernels x (capture + 6 replays of 20 calls of at most a few ms)), plus autotuning the
# 1x1-conv kernels for each new (C, pixels) bucket at batch 64 (~20 buckets x ~1 s).
@section("kernels", "Per-primitive time: Triton against the PyTorch reference, on the device and on the host",
         plan_s=25)
def kernel_time(check: Check, sec: Section):
    p = check.plan
    dtype = torch.bfloat16 if not check.dry_run else torch.float32
    sec.notes.append(
        f"{p.arch.name}, batch {p.batch}, {p.size}x{p.size} input, {str(dtype).replace('torch.', '')}, channels_last "
        "views of the block buffer: the widest layer of every block and every transition. Device time: after one "
        f"warm-up call (which autotunes), {p.kernel_calls} calls captured in one CUDA graph, the median of "
        f"{p.kernel_replays} replays divided by {p.kernel_calls}, so the host's launch cost is not in it (a row whose "
        "calls cannot be captured says so, and is timed eagerly with CUDA events instead). Host time: the wall time "
        f"of issuing {p.kernel_calls} calls, per call. **host-bound** names the kernels whose host time per call is "
        "above their device time: called eagerly one after another, those run at the host's pace, not the GPU's. "
        "The reference is pure PyTorch (cuBLAS GEMMs, torch elementwise ops); its backward ops compute in float32 "
        "(they upcast), so those rows race an fp32 GEMM, not a bf16 one. **Triton slower** flags a row where "
        "Triton's device time loses."
    )
    check.dry("tiny model, float32 (bf16 is broken in the interpreter), each kernel called eagerly: times "
              f"{NOT_MEASURED}.", sec)  # fmt: skip
    rows = sec.table("op", "where", "shape", "Triton ms", "reference ms", "Triton / reference", "Triton host µs / call",
                     "reference host µs / call", "host-bound")  # fmt: skip
    for where, name, shape in primitive_shapes(p.arch, p.batch, p.size):
        for primitive, op in [(prim, op) for prim, op in ops() if prim.name == name]:
            row = [op.name, where, shape.describe()]
            try:
                args = op_inputs(primitive, op, shape, dtype, check.device)
                times = {backend: call_time(partial(op.kernels[backend], *args.values()), check.device,
                                            calls=p.kernel_calls, replays=p.kernel_replays, host_repeats=p.host_repeats)
                         for backend in ("triton", "reference")}  # fmt: skip
            except Exception as error:
                rows.append(row + [f"error: {short_error(error)}"] + [""] * 5)
                continue
            if check.dry_run:
                rows.append(row + [NOT_MEASURED] + [""] * 5)
                continue
            sec.data[f"{op.name} {where}"] = times
            t, r = times["triton"], times["reference"]
            eager = [f"{b}: {times[b]['how']}" for b in times if times[b]["how"] != "graph"]
            bound = [b.capitalize() if b == "triton" else b for b in times if times[b]["host"] > times[b]["device"]]
            row += [f"{t['device'] * 1e3:.3f}", f"{r['device'] * 1e3:.3f}",
                    f"{t['device'] / r['device']:.2f}" + (" **Triton slower**" if t["device"] > r["device"] else ""),
                    f"{t['host'] * 1e6:.0f}", f"{r['host'] * 1e6:.0f}",
                    ", ".join(bound) or "-"]  # fmt: skip
            if eager:
                row[3] += " (" + "; ".join(eager)[:200] + ")"
            rows.append(row)


# First run: the eager part took ~25 s (4 implementations x 11 steps of 0.07-0.3 s, plus Triton autotuning in the
# first step, ~12 s). Now also: host time (5 steps each), one profiled step each (~2 s of profiler start-up),
# and each step captured in a CUDA graph after 3 warm-up steps, then 11 replays (~2 s each).
@section("step", "Whole training step: eager, graph-replayed and host time, kernel launches, memory", plan_s=55)
def whole_step(check: Check, sec: Section):
    p, setup = check.plan, check.setup
    sec.notes.append(
        f"{p.arch.name}, batch {p.batch}, {p.size}x{p.size}, {setup.describe()}: zero_grad, forward, cross-entropy, "
        f"backward. **eager step**: median of {p.step_repeats} CUDA-event timings after one warm-up step, the "
        "implementations interleaved (`first step s` includes Triton's autotuning). **graph replay**: the same "
        "forward and backward captured in one `torch.cuda.CUDAGraph` after 3 warm-up steps on a side stream (outside "
        f"the capture), the median of {p.graph_replays} replays: the device time of the step, without the host's. "
        "**host**: the wall time of issuing one step without waiting for the GPU (sync, t0, step, t1, sync), median "
        f"of {p.host_repeats}. **bound**: host when issuing the step takes longer than the GPU takes to run it (host "
        "time above the graph replay; without a replay, host time at 90 % of the eager step or more), else device. "
        "**kernels**: the CUDA kernels of one step in torch.profiler (memcpy and memset apart, in the JSON)."
    )
    sec.notes.append(
        "Memory: max_memory_allocated is torch's peak over the timed steps, with the other models' parameters and "
        "gradients also resident; activation is the step's peak above what was allocated before it, gradients "
        "preallocated (benchmarks/accounting.py); graph pool is the memory the captured graph's private pool "
        "reserves (it holds the step's activations, and the gradients, between replays)."
    )
    check.dry(f"tiny model on CPU, C++ kernels; eager and graph-replay times, bound, kernel launches and "
              f"max_memory_allocated {NOT_MEASURED} (a CPU has no CUDA events, graphs or kernels: the profiler and "
              "host-time code paths run); host ms is the whole CPU step; activation is the exact CPU count.",
              sec)  # fmt: skip
    time_rows = sec.table("implementation", "eager step ms", "vs naive", "graph replay ms", "vs naive",
                          "host ms / step", "bound", "kernels / step")  # fmt: skip
    memory_rows = sec.table("implementation", "first step s", "max_memory_allocated MiB", "activation MiB",
                            "vs naive", "graph pool MiB")  # fmt: skip
    x, target = make_batch(p.arch, p.batch, p.size, setup)
    models = build_models(p.arch, EAGER_IMPLS, setup)
    params = sum(t.nbytes for t in models[BASELINE].parameters()) / MiB
    sec.notes.append(f"Each model's parameters take {params:.1f} MiB, and so do its gradients.")
    results = sec.data
    steps = {key: partial(train_step, models[key], x, target, setup.amp) for key in EAGER_IMPLS}

    def show():
        time_rows[:] = [step_time_row(check, key, results) for key in results]
        memory_rows[:] = [step_memory_row(check, key, results) for key in results]

    for key in EAGER_IMPLS:
        results[key] = first_step_result(models[key], x, target, setup.amp)
    ok = [key for key in EAGER_IMPLS if "error" not in results[key]]
    show()
    timings = time_steps({key: steps[key] for key in ok}, p.step_repeats, warmup=1, device=setup.device)
    for key, t in timings.items():
        results[key].update(eager_s=t["median"], max_memory_allocated=t.get("peak"))
        activation = activation_bytes(models[key], x, target, setup.amp)
        results[key].update(activation=activation, total=held_bytes(models[key], x, target) + activation)
        check.shared.setdefault("step_totals", {})[key] = (p.batch, results[key]["total"])
    show()
    for key in ok:
        results[key]["host_s"] = statistics.median(host_times(steps[key], p.host_repeats, setup.device))
    show()
    for key in ok:
        try:
            results[key]["launches"] = kernel_launches(steps[key], setup.device)
        except Exception as error:
            results[key]["launches_error"] = short_error(error)
    show()
    # Ours first: a capture that fails (torchvision's checkpointing reads the RNG state, which a capture may
    # refuse) is the last to run. A CPU has no CUDA graphs.
    for key in [] if check.dry_run else sorted(ok, key=lambda key: not key.startswith("fused")):
        model = models[key]
        try:
            replay = graph_replay(partial(forward_backward, model, x, target, setup.amp), setup.device,
                                  replays=p.graph_replays, warmup=3,
                                  prepare=partial(model.zero_grad, set_to_none=True))  # fmt: skip
            results[key].update(graph_s=replay["median"], graph_pool=replay["pool_bytes"])
        except Exception as error:  # CaptureFailed, or the warm-up failed: this row says so, the others run
            text = str(error) if isinstance(error, CaptureFailed) else short_error(error)
            results[key]["graph_error"] = text[:1000]
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        show()
    if BASELINE in results and "eager_s" in results[BASELINE]:
        check.shared["tv_eager_s"] = results[BASELINE]["eager_s"]


def first_step_result(model, x, target, amp, step=train_step) -> dict:
    """{"first_step_s": seconds} of one training step (compiles and autotunes), or {"error": ...}."""
    try:
        return {"first_step_s": first_step(model, x, target, amp, step=step)}
    except Exception as error:
        return {"error": short_error(error)}


def bound(r: dict) -> str:
    if "host_s" not in r:
        return ""
    if "graph_s" in r:
        return "host" if r["host_s"] > r["graph_s"] else "device"
    return "host" if r["host_s"] >= 0.9 * r["eager_s"] else "device"


def step_time_row(check: Check, key: str, results: dict) -> list:
    r, base = results[key], results.get(BASELINE, {})
    if "error" in r:
        return [IMPLS[key], f"error: {r['error']}"] + [""] * 6
    if "eager_s" not in r:
        return [IMPLS[key]] + [""] * 7
    if check.dry_run:
        row = [IMPLS[key], NOT_MEASURED, "", NOT_MEASURED, ""]
    else:
        graph = ms(r["graph_s"]) if "graph_s" in r else ""
        if "graph_error" in r:
            graph = f"**failed**: {r['graph_error'][:160]}"
        row = [IMPLS[key], ms(r["eager_s"]), ratio(r["eager_s"], base.get("eager_s")), graph,
               ratio(r.get("graph_s"), base.get("graph_s"))]  # fmt: skip
    row.append(ms(r["host_s"]) if "host_s" in r else "")
    launches = r.get("launches")
    if check.dry_run:
        row += [NOT_MEASURED, NOT_MEASURED if launches is not None else ""]
    else:
        row += [bound(r), str(launches["kernels"]) if launches is not None else r.get("launches_error", "")]
    return row


def step_memory_row(check: Check, key: str, results: dict) -> list:
    r, base = results[key], results.get(BASELINE, {})
    if "error" in r:
        return [IMPLS[key], f"error: {r['error']}"] + [""] * 4
    row = [IMPLS[key], f"{r['first_step_s']:.1f}"]
    if "activation" not in r:
        return row + [""] * 4
    peak = NOT_MEASURED if check.dry_run else mib(r["max_memory_allocated"])
    pool = NOT_MEASURED if check.dry_run else mib(r["graph_pool"]) if "graph_pool" in r else "-"
    return row + [peak, f"{r['activation'] / MiB:.1f}", ratio(r["activation"], base.get("activation")), pool]


# First run: 2 s (two warm-up steps per check, batch 64, already autotuned by the sections before).
@section("sync", "Sync-freedom of our forward and backward", plan_s=10)
def sync_freedom(check: Check, sec: Section):
    p, setup = check.plan, check.setup
    sec.notes.append(
        f"{p.arch.name}, batch {p.batch}, {p.size}x{p.size}, {setup.describe()}: after two warm-up calls "
        "(autotuning and compilation synchronize, legitimately), one more under "
        '`torch.cuda.set_sync_debug_mode("error")`, which raises at any host-device synchronization.'
    )
    check.dry(f"the warm-up calls run; the check itself {NOT_MEASURED} (sync debug mode is CUDA only).", sec)
    rows = sec.table("implementation", "what", "result")
    models = build_models(p.arch, ["fused_eff", "fused_keep"], setup)
    x, target = make_batch(p.arch, p.batch, p.size, setup)
    checks = [(key, "training step", True, partial(train_step, m, x, target, setup.amp)) for key, m in models.items()]
    checks.append(("fused_eff", "eval forward, no_grad", False, partial(eval_step, models["fused_eff"], x, setup.amp)))
    for key, what, train, step in checks:
        models[key].train(train)
        result = check_sync_free(step, check.device)
        sec.data[f"{key} {what}"] = result
        rows.append([IMPLS[key], what, result])


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
        return f"**sync**: {short_error(error)}" + (f" (at {' > '.join(ours[-3:])})" if ours else "")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return "pass"


# First run: 36 s, cut, for 255 (torchvision naive), 515 (checkpointed) and ">= 256" (ours, whose search started
# at batch 64 and grew 4x a probe). Now each search starts from the step's memory at batch 64 (the whole-step
# section's), so its first probe lands near the answer (~1700 for ours): ~3-6 probes of two real steps each,
# ~5-10 s a probe for ours at ~1000-1700 images (autotuning new pixel buckets), ~1 s for torchvision's.
@section("max-batch", "Max batch under the memory budget", plan_s=50)
def max_batch(check: Check, sec: Section):
    p, setup = check.plan, check.setup
    budget = f"{p.budget / 2**30:g} GiB" if p.budget >= 2**30 else f"{p.budget / MiB:g} MiB"
    sec.notes.append(
        f"{p.arch.name}, {p.size}x{p.size}, {setup.describe()}: the largest batch whose training step fits in "
        f"{budget} (parameters, gradients, buffers, the batch and the step's activation peak), found by "
        "benchmarks/search.py's largest_fitting, every probe a real measured step. Each search starts from the "
        f"memory of the step at batch {p.batch} measured in the whole-step section (the line through it and the "
        "origin, which undershoots, so the first probe fits). Each implementation gets an equal share of what is "
        "left of the section's time; a search cut short gives the bracket it reached."
    )
    check.dry(f"tiny model, {budget} budget, searched up to {p.batch_cap}, CPU accounting: not the GPU's figure "
              f"({NOT_MEASURED}).", sec)  # fmt: skip
    rows = sec.table("implementation", f"max batch <= {budget}", "probes")
    m = Measurer(setup)
    seeds = check.shared.get("step_totals", {})
    for i, key in enumerate(EAGER_IMPLS):
        share_end = time.perf_counter() + sec.left() / (len(EAGER_IMPLS) - i)
        result, probes = search_batch(m, p, key, share_end, seeds.get(key))
        sec.data[key] = {"result": result, "probes": probes}
        rows.append([IMPLS[key], result, ", ".join(str(b) for b in probes) or "-"])
        m.drop(p.arch)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    for key in COMPILE_ORDER:
        rows.append([IMPLS[key], "skipped: every batch size recompiles", ""])
    if m.errors:
        sec.notes.append("Errors: " + "; ".join(dict.fromkeys(m.errors)))


class ShareSpent(Exception):
    """An implementation's share of the max-batch section's time is spent."""


def search_batch(m: Measurer, p: Plan, key: str, share_end: float, seed) -> tuple[str, dict]:
    """(the max batch as reported, {batch: total bytes} of the probes made here). ``seed``: (batch, total
    bytes) measured before, or None (then batch ``p.batch`` is probed first)."""
    probes = {}

    def total(batch):
        if time.perf_counter() > share_end:
            raise ShareSpent()
        probes[batch] = m.total(p.arch, batch, p.size, key)
        return probes[batch]

    try:
        known = dict([seed]) if seed is not None else {p.batch: total(p.batch)}
        found, capped = largest_fitting(total, p.budget, known, start=1, cap=p.batch_cap, max_growth=64)
        return (f">= {found} (the cap)" if capped else str(found)), probes
    except ShareSpent:
        points = {**(dict([seed]) if seed is not None else {}), **probes}
        fits = [b for b, v in points.items() if v <= p.budget]
        lo = max(fits, default=None)
        over = [b for b, v in points.items() if v > p.budget and (lo is None or b > lo)]
        if lo is None:
            return "- (no probe fitted in time)", probes
        return f">= {lo}" + (f", < {min(over)}" if over else "") + " (search cut at its time share)", probes


# The kernels' and CUDA-graph tests first, in their own run, so that a run cut short still has their result.
CUDA_TEST_GROUPS = [
    ["tests/test_kernels.py", "tests/test_cuda_graphs.py"],
    ["tests", "--ignore=tests/test_kernels.py", "--ignore=tests/test_cuda_graphs.py"],
]


# First run: 65 s for the 34 cuda-marked tests of tests/ (tests/peer ignored by hand). Now tests/peer collects
# without MONAI and timm (5 more: torchvision's model tests on CUDA), and tests/test_cuda_graphs.py adds CUDA-graph
# training (make_graphed_callables, and reduce-overhead with an inductor compile of a tiny model, ~20-30 s).
@section("cuda-tests", "Numerics: the CUDA-marked tests", plan_s=95)
def cuda_tests(check: Check, sec: Section):
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5", "-m", "cuda"]
    sec.notes.append(
        "`pytest -m cuda tests`, in two subprocesses, TRITON_INTERPRET unset on a GPU: first "
        f"`{' '.join(CUDA_TEST_GROUPS[0])}`, then the rest of the selection (the peer tests among them)."
    )
    check.dry("the same commands with no GPU visible, so every cuda-marked test skips: this checks the "
              "selection and the report, not the kernels (~8 s each).", sec)  # fmt: skip
    env = dict(os.environ)
    if check.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # as on a CPU machine, also where there is a GPU
    else:
        env.pop("TRITON_INTERPRET", None)
    rows = sec.table("tests", "summary", "failures")
    for group in CUDA_TEST_GROUPS:
        name = " ".join(group)
        timeout = max(1.0, sec.left() - 3)
        try:
            result = subprocess.run(base + group, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=timeout)  # fmt: skip
            output, returncode, cut = result.stdout + result.stderr, result.returncode, False
        except subprocess.TimeoutExpired as expired:
            output = (expired.stdout or b"").decode(errors="replace")  # bytes, whatever text= says
            returncode, cut = None, True
        lines = output.splitlines()
        summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                       None)  # fmt: skip
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        durations = [line.strip() for line in lines if re.match(r"\s*\d+\.\d+s (call|setup|teardown) ", line)]
        sec.data[name] = dict(returncode=returncode, summary=summary, failures=failures, durations=durations,
                              tail=lines[-40:])  # fmt: skip
        status = f"**timed out** after {timeout:.0f} s" if cut else f"`{summary or 'no summary line'}`"
        rows.append([f"`{name}`", status, "<br>".join(f"`{line}`" for line in failures) or "-"])
        if cut or summary is None:
            sec.notes.append(f"Last lines of `{name}`:\n\n```\n" + "\n".join(lines[-20:]) + "\n```")
        if durations:
            sec.notes.append(f"Slowest of `{name}`:\n\n" + "\n".join(f"- `{line}`" for line in durations))


# First run: torch.compile(torchvision) took 137 s (default mode, cold), so ours never ran. Now ours compile
# first: the blocks are opaque custom ops, so the graph is small (~20-30 s cold for the first, less for the next,
# which share inductor's caches). torchvision's compiles come last and run as far as the time left allows:
# this section is last so that it also gets whatever the sections before it left unused.
@section("compiled", "Compiled training step: torch.compile, default and reduce-overhead (CUDA graphs)", plan_s=70)
def compiled_step(check: Check, sec: Section):
    p, setup = check.plan, check.setup
    sec.notes.append(
        f"{p.arch.name}, batch {p.batch}, {p.size}x{p.size}, {setup.describe()}: each implementation compiled in "
        "turn (dynamo reset between them), ours first, then torchvision's, so that a slow compile of torchvision "
        "cannot take ours' time; a compile still running when the section's time ends is named. `compile s` is "
        "the first step (compile and autotuning). reduce-overhead replays the compiled forward and backward from "
        "CUDA graphs (inductor's CUDA-graph trees); each of its steps starts with "
        "`torch.compiler.cudagraph_mark_step_begin()`, and its first three steps (compile, warm-up, recording) "
        f"are not timed. Step time: median of {p.step_repeats} CUDA-event timings; host and kernels as in the "
        "whole-step section; `vs torchvision eager`: against the whole-step section's eager torchvision step. "
        "**CUDA graphs**: used, or why inductor skipped them. Activation is not given for reduce-overhead: the "
        "graphs' memory pool holds it across steps (see max_memory_allocated)."
    )
    check.dry("tiny model; torch.compile with aot_eager, but for ours with reduce-overhead (inductor on CPU "
              "tensors, which skips CUDA graphs); the default-mode compiles of fused memory_efficient=False and of "
              f"torchvision left out (their code path runs in the other rows); times, kernels and max_memory_allocated "
              f"{NOT_MEASURED}.", sec)  # fmt: skip
    rows = sec.table("implementation", "compile s", "step ms", "vs torchvision eager", "host ms / step",
                     "kernels / step", "CUDA graphs", "max_memory_allocated MiB", "activation MiB")  # fmt: skip
    x, target = make_batch(p.arch, p.batch, p.size, setup)
    base = check.shared.get("tv_eager_s")
    for i, key in enumerate(COMPILE_ORDER):
        if p.compiled is not None and key not in p.compiled:
            rows.append([IMPLS[key], "not run in the dry run: the rows above run its code path"] + [""] * 7)
            continue
        backend = p.compile_backends.get(key, "inductor")
        label = IMPLS[key] + ("" if backend == "inductor" else f" (backend {backend})")
        r = sec.data[key] = {"backend": backend}
        torch._dynamo.reset()
        started, model = time.perf_counter(), None
        try:
            with CudagraphSkips() as skips:
                model = build_models(p.arch, [key], setup, backend=backend)[key]
                step_fn = graphed_train_step if key in COMPILE_MODES else train_step
                step = partial(step_fn, model, x, target, setup.amp)
                r["compile_s"] = first_step(model, x, target, setup.amp, step=step_fn)
                step(), step()  # reduce-overhead: warm-up, then recording; the timed steps replay
                t = time_steps({key: step}, p.step_repeats, warmup=0, device=setup.device)[key]
                r.update(step_s=t["median"], max_memory_allocated=t.get("peak"))
                r["host_s"] = statistics.median(host_times(step, p.host_repeats, setup.device))
                r["launches"] = kernel_launches(step, setup.device)
                if key not in COMPILE_MODES:
                    r["activation"] = activation_bytes(model, x, target, setup.amp)
            r["cudagraphs"] = skips.describe(check.device, backend) if key in COMPILE_MODES else "-"
            rows.append(compiled_row(check, label, r, base))
        except OutOfTime:
            spent = time.perf_counter() - started
            what = "compile" if "compile_s" not in r else "timing"
            r["cut"] = f"{what} still running after {spent:.0f} s"
            rows.append([label, f"**cut**: its {what} was still running when the section's time ended, after "
                         f"{spent:.0f} s"] + [""] * 7)  # fmt: skip
            rows.extend([IMPLS[later], "not run: the section's time had ended"] + [""] * 7
                        for later in COMPILE_ORDER[i + 1 :])  # fmt: skip
            raise
        except Exception as error:
            r["error"] = traceback.format_exc()
            rows.append([label, f"error: {short_error(error)}"] + [""] * 7)
        finally:
            del model
            gc.collect()
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()


def compiled_row(check: Check, label: str, r: dict, base) -> list:
    row = [label, f"{r['compile_s']:.1f}"]
    if check.dry_run:
        row += [NOT_MEASURED, "", ms(r["host_s"]), NOT_MEASURED, r["cudagraphs"], NOT_MEASURED]
    else:
        row += [ms(r["step_s"]), ratio(r["step_s"], base), ms(r["host_s"]), str(r["launches"]["kernels"]),
                r["cudagraphs"], mib(r["max_memory_allocated"])]  # fmt: skip
    return row + [f"{r['activation'] / MiB:.1f}" if "activation" in r else "-"]


class CudagraphSkips(logging.Handler):
    """Within the block: how many compiled graphs inductor did not wrap in CUDA graphs, and why (the
    messages of its cudagraphs log, which it writes for CUDA graphs it skips; on CPU tensors it counts them
    without a message)."""

    def __enter__(self):
        from torch._dynamo.utils import counters
        from torch._inductor import cudagraph_utils

        self.messages, self.counters = [], counters
        self.start = counters["inductor"]["cudagraph_skips"]
        self.loggers = [getattr(cudagraph_utils, name) for name in ("cudagraphs_log", "perf_hint_log")
                        if isinstance(getattr(cudagraph_utils, name, None), logging.Logger)]  # fmt: skip
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.count = self.counters["inductor"]["cudagraph_skips"] - self.start
        for logger in self.loggers:
            logger.removeHandler(self)
        return False

    def emit(self, record):
        message = record.getMessage()
        if "cudagraph" in message.lower():
            self.messages.append(message.splitlines()[0][:200])

    def describe(self, device, backend: str = "inductor") -> str:
        if backend != "inductor":
            return f"- (backend {backend}: no CUDA graphs)"
        if not self.count and not self.messages:
            return "used"
        reasons = "; ".join(dict.fromkeys(self.messages))
        if not reasons and device.type == "cpu":
            reasons = "CPU tensors (CUDA graphs are CUDA only)"
        graphs = f"{self.count} graph{'' if self.count == 1 else 's'}"
        return f"**skipped** ({graphs}): {reasons or 'no reason logged'}"


# ---------------------------------------------------------------------------------------------------


def make_sections(only=None) -> list:
    """The registered sections (those named in ``only`` and the environment, when given) as fresh Sections."""
    return [Section(key, title, plan_s, fn) for key, title, plan_s, fn in SECTIONS
            if only is None or key in only or key == "environment"]  # fmt: skip


def main(argv=None):
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop banners off stderr
    keys = [key for key, *_ in SECTIONS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted: every code path")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"seconds for all sections together (default {BUDGET_S}: with start-up, within 7 "
                        "minutes on one H100/H200); each gets a share in proportion to its planned "
                        "seconds")  # fmt: skip
    parser.add_argument("--only", help=f"comma-separated sections to run, of: {', '.join(keys)} (the environment "
                        "always runs); their shares grow to fill the budget")  # fmt: skip
    parser.add_argument("--commit", help="the tree's commit, to report when it is not a git checkout (a copied tree)")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "gpu"), help="default: benchmarks/results/gpu")
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = [key.strip() for key in args.only.split(",") if key.strip()]
        unknown = sorted(set(only) - set(keys))
        if unknown:
            parser.error(f"--only: unknown sections {unknown}; they are {keys}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; --dry-run runs every code path on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU dry run" if args.dry_run else torch.cuda.get_device_name(device)
    os.makedirs(args.out, exist_ok=True)
    check = Check(
        plan=DRY_PLAN if args.dry_run else GPU_PLAN,
        dry_run=args.dry_run,
        setup=Setup(device, torch.float32, channels_last=True, amp=torch.bfloat16),
        commit=args.commit,
    )
    report = Report(
        title="densenet_fused GPU check " + ("(CPU dry run)" if args.dry_run else f"on {name}"),
        command=" ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        sections=make_sections(only),
        budget_s=args.budget_s,
        out=args.out,
        stem=re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
        dry_run=args.dry_run,
    )
    report.run(check)
    wall = time.perf_counter() - report.start
    print(f"wrote {report.stem}.md and {report.stem}.json to {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
