"""Host overhead of a DenseNet training step, per dense layer: what the host issues, not how long the GPU runs.

On a GPU the fused step is host-bound (issue 17): the host issues many more small ops than torchvision's
eager step.  This benchmark counts them without a GPU.  For one training step (forward + cross-entropy,
then backward) of the GPU code path (the Triton backend; on a machine without CUDA its kernels run
through Triton's interpreter, so launches are counted, never timed) and of torchvision's eager step, it
counts, for forward and backward separately:

* custom-op dispatches (``densenet_fused::*``): per-block ops (``dense_block``, ``dense_block_backward``)
  and per-layer primitive ops (``bn_relu_conv1x1``, ``channel_stats``, their ``*_cpp`` kernels, ...);
* aten ops that launch kernels, views/metadata-only ops, and "empty" factories (allocate, launch nothing);
* Triton launches;
* allocations: tensors an op returns on storage none of its inputs has (factories and fresh outputs).

Counting (``Counter``): a ``TorchDispatchMode`` sees every op that reaches the dispatcher's Python key.
A custom op's Python kernel runs below that key, where the mode is switched off, so the mode redispatches
``densenet_fused::*`` ops itself, below the Python key, with the mode re-entered: the aten ops inside our
kernels are counted too (``inside_custom_ops`` checks that they are).  Triton launches: under the
interpreter every ``kernel[grid](...)`` (through ``JITFunction``, ``Autotuner`` or anything else) ends in
``triton.runtime.interpreter.GridExecutor.__call__``, which is wrapped; the interpreter's own host copies
inside it are not counted.  On CUDA, ``triton.knobs.runtime.launch_enter_hook`` counts compiled launches
(untried on a GPU so far; a launcher that passes no enter hook to the compiled kernel would not be counted).
An op launches kernels unless it is an "empty" factory, ``set_``/``resize_``-like metadata, or returns
only tensors on its inputs' storage without mutating anything (views, and ``to``/``contiguous``/
``reshape`` when they are no-ops or views).

Per dense layer by difference: a small DenseNet (growth 8, bn_size 4, 16 initial features, blocks
(2, 2, 2, 2)) against the same net with one more layer per block (3, 3, 3, 3); per layer = (big - small) / 4
(``--layers``).  Stem, transitions, head and loss cancel exactly.  Batch 2, 32x32; each count is of a step
after one warm-up step.  Without ``--quick`` the net of DenseNet-121's depth (blocks (6, 12, 24, 16), same
tiny width) is counted too: its whole step, and its average per layer beyond the small net.  The two
per-layer figures differ where a layer's count grows with its depth in the block: torchvision's backward
adds one more gradient (aten::add) per later layer that read its features.

The host time of the C++ CPU path (default backend) against torchvision's, at tiny shapes where per-op
cost dominates: median wall time (time.perf_counter, interleaved) of a training step and of its forward,
DenseNet-121 depth at growth 8, batch 2, 32x32.

    python benchmarks/host_ops.py            # tables + benchmarks/results/host_ops.json (a few minutes)
    python benchmarks/host_ops.py --quick    # per-layer counts and fewer timing repeats only

The counting runs in a subprocess: TRITON_INTERPRET=1 and DENSENET_FUSED_BACKEND=triton (set there only
when no CUDA device is present) must be set before triton and densenet_fused are imported, while the
timing runs here with the default backend.  ``tests/test_host_ops.py`` imports this file and pins a
per-layer budget on the counts.
"""

import os

if __name__ == "__main__":
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # before torch loads the profiler: no start/stop banners

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter as _Tally
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

# The counted nets: DenseNets with LAYERS[0] and LAYERS[1] layers in each of 4 blocks; per layer = their
# difference / 4.  (1, 2) gives the same per-layer counts as (2, 3) today and takes less time (the test's).
NET = {"growth_rate": 8, "bn_size": 4, "num_init_features": 16, "num_classes": 10}
LAYERS = (2, 3)
DENSENET121_BLOCKS = (6, 12, 24, 16)
COUNT_BATCH, COUNT_SIZE = 2, 32

# The timed net of the C++ host-time comparison: DenseNet-121's depth, tiny width and input.
TIMED_BLOCKS, TIMED_BATCH, TIMED_SIZE = DENSENET121_BLOCKS, 2, 32

BLOCK_OPS = ("dense_block", "dense_block_backward")  # per-block custom ops; any other densenet_fused op is per layer
EMPTY_FACTORIES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
METADATA_OPS = {"set_", "resize_", "resize_as_", "_resize_output_", "lift_fresh", "sym_size", "sym_stride",
                "sym_numel", "sym_storage_offset", "is_same_size", "_version", "_nested_tensor_size"}  # fmt: skip

# The categories counted, per phase; "host_ops" = aten_launch + triton_launches (what the budget pins).
CATEGORIES = ("block_ops", "layer_ops", "aten_launch", "aten_view", "aten_empty", "triton_launches",
              "allocations", "host_ops", "inside_custom_ops", "profiler_leaf_aten")  # fmt: skip
LAUNCH_MARK = "host_ops::triton_launch"  # profiler range around an interpreted launch (the interpreter's own ops)
PHASES = ("forward", "backward")


# ---------------------------------------------------------------------------------------------------
# Counting


def _tensors(tree) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage_id(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. fake): never fresh
        return -1


_AFTER_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


class Counter(TorchDispatchMode):
    """Counts the ops of one phase at a time (``phase``) into ``counts[phase]`` (category -> n) and
    ``ops[phase]`` (op name -> n).  See the module docstring."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts = {p: _Tally() for p in PHASES}
        self.ops = {p: _Tally() for p in PHASES}
        self._custom_depth = 0

    def _add(self, category: str, n: int = 1) -> None:
        if n:
            self.counts[self.phase][category] += n

    def launch(self, name: str) -> None:
        """One Triton launch (called by the launch hooks)."""
        self._add("triton_launches")
        self._add("host_ops")
        self.ops[self.phase][f"triton::{name}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        self.ops[self.phase][f"{namespace}::{name}"] += 1
        inputs = _tensors((args, kwargs))
        if namespace == "densenet_fused":
            self._add("block_ops" if name in BLOCK_OPS else "layer_ops")
            return self._run_custom_op(func, inputs, args, kwargs)
        if self._custom_depth:
            self._add("inside_custom_ops")
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        input_storages = {_storage_id(t) for t in inputs}
        fresh = sum(1 for t in outputs if _storage_id(t) not in input_storages)
        mutates = func._schema.is_mutable
        if name in EMPTY_FACTORIES:
            self._add("aten_empty")
        elif name in METADATA_OPS or torch.Tag.inplace_view in func.tags or (not mutates and outputs and not fresh):
            self._add("aten_view")
        else:
            self._add("aten_launch")
            self._add("host_ops")
        self._add("allocations", fresh)
        return out

    def _run_custom_op(self, func, inputs, args, kwargs):
        """Run a densenet_fused op's kernel below the Python key with this mode active, so that the ops its
        Python kernel issues are counted as well."""
        keys = _AFTER_PYTHON
        if inputs:
            found = torch._C._dispatch_keys(inputs[0])
            for t in inputs[1:]:
                found = found | torch._C._dispatch_keys(t)
            keys = found & _AFTER_PYTHON
        self._custom_depth += 1
        try:
            with self:
                return func.redispatch(keys, *args, **kwargs)
        finally:
            self._custom_depth -= 1


@contextmanager
def triton_launch_hook(counter: Counter):
    """Count every Triton launch into ``counter`` while active (a no-op when triton is not installed)."""
    try:
        import triton
    except ImportError:
        yield False
        return
    if triton.knobs.runtime.interpret:
        from triton.runtime import interpreter

        original = interpreter.GridExecutor.__call__

        def call(executor, *args, **kwargs):
            counter.launch(getattr(executor.fn, "__name__", "?"))
            # The interpreter's host copies are not the kernel's host ops: neither the mode nor the profiler
            # (which drops what runs inside LAUNCH_MARK) counts them.
            with _disable_current_modes(), torch.profiler.record_function(LAUNCH_MARK):
                return original(executor, *args, **kwargs)

        interpreter.GridExecutor.__call__ = call
        try:
            yield True
        finally:
            interpreter.GridExecutor.__call__ = original
    else:
        runtime = triton.knobs.runtime
        previous = runtime.launch_enter_hook

        def enter(metadata):  # a LazyDict: .get() returns the dict
            try:
                name = metadata.get()["name"]
            except (AttributeError, KeyError, TypeError):
                name = "?"
            counter.launch(name)
            if previous is not None and not hasattr(previous, "add"):
                previous(metadata)

        if hasattr(previous, "add"):  # a HookChain (triton 3.8)
            previous.add(enter)
        else:
            runtime.launch_enter_hook = enter
        try:
            yield True
        finally:
            if hasattr(previous, "add"):
                previous.remove(enter)
            else:
                runtime.launch_enter_hook = previous


def count_step(model, x, target, profile: bool = False) -> dict:
    """Counts of one training step of ``model`` after a warm-up step: {"forward": {category: n}, "backward":
    {...}, "ops": {phase: {op: n}}}.  With ``profile``, one more step under the profiler alone (the mode
    changes what the profiler records) gives "profiler_leaf_aten"."""

    def forward():
        return F.cross_entropy(model(x), target)

    warm = forward()
    warm.backward()
    model.zero_grad(set_to_none=True)
    counter = Counter()
    with triton_launch_hook(counter), counter:
        counter.phase = "forward"
        loss = forward()
        counter.phase = "backward"
        loss.backward()
    # The redispatch must not change what the step computes (training mode: batch statistics, same loss).
    torch.testing.assert_close(loss.detach(), warm.detach(), rtol=1e-4, atol=1e-5)
    if profile:
        model.zero_grad(set_to_none=True)
        with triton_launch_hook(Counter()):
            with _profiler() as prof:
                loss = forward()
            counter.counts["forward"]["profiler_leaf_aten"] = _leaf_aten_ops(prof)
            with _profiler() as prof:
                loss.backward()
            counter.counts["backward"]["profiler_leaf_aten"] = _leaf_aten_ops(prof)
    result = {p: {c: counter.counts[p][c] for c in CATEGORIES} for p in PHASES}
    result["ops"] = {p: dict(counter.ops[p].most_common()) for p in PHASES}
    return result


def _profiler():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def _leaf_aten_ops(prof) -> int:
    """The profiler's leaf aten ops (aten:: events with no aten:: event inside), the measure issue 17 quotes;
    nested ops count once, at the bottom; ops inside an interpreted Triton launch are dropped."""
    n = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or any(c.name.startswith("aten::") for c in event.cpu_children):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name != LAUNCH_MARK:
            parent = parent.cpu_parent
        n += parent is None
    return n


def _fused(blocks, memory_efficient=True, act="relu"):
    from densenet_fused.models import DenseNet

    return DenseNet(**NET, block_config=blocks, memory_efficient=memory_efficient, act=act)


def _torchvision(blocks):
    import torchvision

    return torchvision.models.DenseNet(**NET, block_config=blocks, memory_efficient=False)


IMPLS = {  # key -> (label, model factory)
    "fused": ("fused", _fused),  # densenet_fused, memory_efficient=True (its default): backward recomputes
    "fused_keep": ("fused keep", lambda blocks: _fused(blocks, False)),  # memory_efficient=False
    "fused_prelu": ("fused prelu", lambda blocks: _fused(blocks, act="prelu")),  # MONAI's act="prelu"
    "torchvision": ("torchvision", _torchvision),  # eager, memory_efficient=False (its default)
}
LEGEND = (
    "fused: densenet_fused memory_efficient=True (default; backward recomputes each bottleneck); fused keep: "
    "memory_efficient=False; fused prelu: act=\"prelu\" (asked for with --impls); torchvision: eager, "
    "memory_efficient=False"
)


def _blocks(layers: int) -> tuple:
    return (layers,) * len(DENSENET121_BLOCKS)


def per_layer(small: dict, big: dict, added: int) -> dict:
    """(big - small) / added per phase and category."""
    return {p: {c: (big[p][c] - small[p][c]) / added for c in CATEGORIES} for p in PHASES}


def count_impls(impls, device: torch.device, profile: bool = False, layers=LAYERS, densenet121=()) -> dict:
    """Counts of each implementation in ``impls`` on ``device``: "per_layer", the difference between nets of
    ``layers[0]`` and ``layers[1]`` layers per block, per added layer; "small_step", the smaller net's step.
    For the implementations in ``densenet121``, also the step of a net of DenseNet-121's depth ("densenet121_step") and its average
    per layer beyond the small net ("densenet121_per_layer"), which differs from "per_layer" where a layer's
    count grows with its depth in the block (torchvision's backward: one more gradient add per later layer)."""
    out = {}
    for key in impls:
        nets = {"small": _blocks(layers[0]), "big": _blocks(layers[1])}
        if key in densenet121:
            nets["densenet121"] = DENSENET121_BLOCKS
        steps = {}
        for net, blocks in nets.items():
            torch.manual_seed(0)
            model = IMPLS[key][1](blocks).to(device).train()
            x = torch.randn(COUNT_BATCH, 3, COUNT_SIZE, COUNT_SIZE, device=device)
            target = torch.randint(0, NET["num_classes"], (COUNT_BATCH,), device=device)
            steps[net] = count_step(model, x, target, profile)
        small = steps["small"]
        out[key] = {
            "label": IMPLS[key][0],
            "blocks": nets,
            "per_layer": per_layer(small, steps["big"], sum(nets["big"]) - sum(nets["small"])),
            "small_step": {p: small[p] for p in PHASES},
            "ops": {net: step["ops"] for net, step in steps.items()},
        }
        if key in densenet121:
            big = steps["densenet121"]
            out[key]["densenet121_step"] = {p: big[p] for p in PHASES}
            out[key]["densenet121_per_layer"] = per_layer(small, big, sum(DENSENET121_BLOCKS) - sum(nets["small"]))
    return out


def count_worker(out_path: str, impls, profile: bool = False, layers=LAYERS, densenet121=()) -> None:
    """The counting subprocess: the GPU code path (Triton) counted, checked and written to ``out_path``."""
    import densenet_fused  # noqa: F401  (imported with this process's environment)
    from densenet_fused.ops._backend import config

    torch.set_num_threads(1)  # counts do not depend on threads; tiny CPU ops run faster without OpenMP's

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = config.backend or ("triton" if device.type == "cuda" else "cpp")
    results = count_impls(impls, device, profile, layers, densenet121)
    for key, r in results.items():
        step = r["small_step"]
        if key.startswith("fused"):
            if backend == "triton" and not sum(step[p]["triton_launches"] for p in PHASES):
                raise RuntimeError(f"{key}: the Triton backend ran but the launch hook saw no launch")
            if not step["forward"]["inside_custom_ops"]:
                raise RuntimeError(f"{key}: the counter saw no aten op inside densenet_fused's custom ops")
    meta = {"device": str(device), "backend": backend, "interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    meta.update({module: _version(module) for module in ("torch", "triton", "torchvision")})
    Path(out_path).write_text(json.dumps({"meta": meta, "results": results}))


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def counting_env() -> dict:
    """The counting subprocess's environment: the GPU code path, interpreted when no CUDA device is present."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.update(TRITON_INTERPRET="1", DENSENET_FUSED_BACKEND="triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def count_in_subprocess(impls=("fused", "torchvision"), profile=False, layers=LAYERS, densenet121=(), timeout=900.0):
    """Run the counting in a fresh interpreter (see the module docstring); returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--count-worker", out, "--impls", *impls]
        cmd += ["--layers", *map(str, layers), "--densenet121", *densenet121] + ["--profile"] * profile
        proc = subprocess.run(cmd, env=counting_env(), capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"counting subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(Path(out).read_text())


# ---------------------------------------------------------------------------------------------------
# Host time of the C++ CPU path at tiny shapes


def cpp_host_time(repeats: int) -> dict:
    """Median seconds of a training step and of its forward: densenet_fused (default backend, C++ kernels
    on CPU) against torchvision, same weights and input, interleaved.  Also the C++ path's per-layer counts."""
    from densenet_fused.ops._backend import CPP_AVAILABLE, config

    if config.backend:
        return {"error": f"DENSENET_FUSED_BACKEND={config.backend} is set: unset it to time the C++ path"}
    if not CPP_AVAILABLE:
        return {"error": "densenet_fused._C is not built: no C++ path to time"}
    torch.manual_seed(0)
    tv = _torchvision(TIMED_BLOCKS).train()
    ours = _fused(TIMED_BLOCKS).train()
    ours.load_state_dict(tv.state_dict())
    models = {"fused": ours, "torchvision": tv}
    x = torch.randn(TIMED_BATCH, 3, TIMED_SIZE, TIMED_SIZE)
    target = torch.randint(0, NET["num_classes"], (TIMED_BATCH,))

    def train_step(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()

    def forward(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target)

    times = {(kind, key): [] for kind in ("step", "forward") for key in models}
    for r in range(repeats + 2):  # two warm-up rounds
        for kind, fn in (("step", train_step), ("forward", forward)):
            keys = list(models) if r % 2 == 0 else list(models)[::-1]
            for key in keys:
                t0 = time.perf_counter()
                fn(models[key])
                elapsed = time.perf_counter() - t0
                if r >= 2:
                    times[kind, key].append(elapsed)
    medians = {f"{kind}_{key}_s": statistics.median(t) for (kind, key), t in times.items()}
    out = dict(medians, times_s={f"{kind}_{key}": t for (kind, key), t in times.items()}, repeats=repeats)
    out.update(threads=torch.get_num_threads(), blocks=list(TIMED_BLOCKS), batch=TIMED_BATCH, size=TIMED_SIZE)
    out["step_ratio"] = out["step_fused_s"] / out["step_torchvision_s"]
    out["forward_ratio"] = out["forward_fused_s"] / out["forward_torchvision_s"]
    counts = count_impls(["fused"], torch.device("cpu"))["fused"]  # the C++ path's own op counts (cheap)
    out["cpp_per_layer"] = counts["per_layer"]
    return out


# ---------------------------------------------------------------------------------------------------
# Report

ROWS = [  # (label, category)
    ("custom ops, per-block", "block_ops"),
    ("custom ops, per-layer", "layer_ops"),
    ("aten ops launching kernels", "aten_launch"),
    ("aten views / metadata", "aten_view"),
    ("aten empty factories", "aten_empty"),
    ("Triton launches", "triton_launches"),
    ("allocations", "allocations"),
    ("**host ops** (launching aten + Triton)", "host_ops"),
    ("profiler leaf aten ops (issue 17's measure)", "profiler_leaf_aten"),
]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def table(results: dict, section: str, title: str) -> str:
    keys = list(results)
    header = ["", *[f"{results[k]['label']} {p[:3]}" for k in keys for p in PHASES]]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for label, cat in ROWS:
        if cat == "profiler_leaf_aten" and not any(results[k]["small_step"][p][cat] for k in keys for p in PHASES):
            continue  # not profiled
        cells = [_fmt(results[k][section][p][cat]) for k in keys for p in PHASES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(counts: dict, timing: dict | None) -> str:
    res, meta = counts["results"], counts["meta"]
    nets = next(iter(res.values()))["blocks"]
    interpreted = " (Triton interpreter)" if meta["interpret"] else ""
    setup = (
        f"Counting: {meta['device']}, backend {meta['backend']}{interpreted}, torch {meta['torch']}, triton "
        f"{meta['triton']}, torchvision {meta['torchvision']}; DenseNet growth {NET['growth_rate']}, bn_size "
        f"{NET['bn_size']}, batch {COUNT_BATCH}, {COUNT_SIZE}x{COUNT_SIZE}, one step after a warm-up step."
    )
    small, big = tuple(nets["small"]), tuple(nets["big"])
    parts = [setup, "", LEGEND + ".", "", table(res, "per_layer", f"Per dense layer: blocks {big} minus {small}")]
    if all("densenet121_step" in r for r in res.values()):
        parts += [
            "",
            table(res, "densenet121_per_layer", f"Per dense layer: blocks {DENSENET121_BLOCKS} minus {small}"),
        ]
        parts += ["", table(res, "densenet121_step", f"Whole step, blocks {DENSENET121_BLOCKS} (DenseNet-121's depth)")]
    else:
        parts += ["", table(res, "small_step", f"Whole step, blocks {small}")]
    for section, nets_label in (("per_layer", f"{big} minus {small}"), ("densenet121_per_layer", "DenseNet-121 depth")):
        if "torchvision" not in res or any(section not in r for r in res.values()):
            continue
        tv = {p: res["torchvision"][section][p]["host_ops"] for p in PHASES}
        for key in res:
            if key != "torchvision":
                mine = {p: res[key][section][p]["host_ops"] for p in PHASES}
                ratios = ", ".join(f"{p} {mine[p] / max(tv[p], 1e-9):.2f}x" for p in PHASES)
                total = sum(mine.values()) / max(sum(tv.values()), 1e-9)
                parts.append(f"\n{res[key]['label']} / torchvision, host ops per layer ({nets_label}): {ratios}, "
                             f"step {total:.2f}x.")  # fmt: skip
    if timing and "error" in timing:
        parts += ["", f"C++ host time: {timing['error']}"]
    elif timing:
        t, cpp = timing, timing["cpp_per_layer"]
        title = (
            f"### C++ CPU path host time (blocks {tuple(t['blocks'])}, growth {NET['growth_rate']}, batch "
            f"{t['batch']}, {t['size']}x{t['size']}, {t['threads']} threads, median of {t['repeats']})"
        )
        rows = [
            f"| {label} | {t[kind + '_fused_s'] * 1e3:.2f} | {t[kind + '_torchvision_s'] * 1e3:.2f} "
            f"| {t[kind + '_ratio']:.2f} |"
            for label, kind in (("training step", "step"), ("forward + loss", "forward"))
        ]
        per_layer_cpp = ", ".join(
            f"{cat} {_fmt(cpp['forward'][cat])} / {_fmt(cpp['backward'][cat])}"
            for _, cat in ROWS
            if cat != "profiler_leaf_aten"
        )
        parts += ["", title, "", "| | densenet_fused ms | torchvision ms | ratio |", "| --- | ---: | ---: | ---: |",
                  *rows, "", f"C++ path (fused, default backend) per layer, fwd / bwd: {per_layer_cpp}"]  # fmt: skip
    return "\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer timing repeats; no memory_efficient=False, profiler or DenseNet-121-depth count")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 15, --quick 5)")
    parser.add_argument("--no-timing", action="store_true", help="counts only")
    parser.add_argument("--out", default=str(RESULTS_DIR / "host_ops.json"))
    parser.add_argument("--count-worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--impls", nargs="+", default=None, choices=list(IMPLS),
                        help="what to count (default: fused fused_keep torchvision; --quick: fused torchvision)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--densenet121", nargs="*", default=[], choices=list(IMPLS), help=argparse.SUPPRESS)
    parser.add_argument("--layers", nargs=2, type=int, default=list(LAYERS), metavar=("SMALL", "BIG"),
                        help="layers per block of the two counted nets (default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.count_worker:  # the timing runs here, on the default backend (C++ kernels for CPU tensors)
        os.environ.pop("DENSENET_FUSED_BACKEND", None)
    try:
        import densenet_fused  # noqa: F401
    except ImportError:  # run from a checkout that is not pip-installed
        sys.path.insert(0, str(ROOT))
    if args.count_worker:
        count_worker(
            args.count_worker, args.impls or ["fused", "torchvision"], args.profile, args.layers, args.densenet121
        )
        return
    impls = args.impls or (["fused", "torchvision"] if args.quick else ["fused", "fused_keep", "torchvision"])
    counts = count_in_subprocess(
        impls, profile=not args.quick, layers=args.layers, densenet121=[] if args.quick else impls
    )
    timing = None if args.no_timing else cpp_host_time(args.repeats or (5 if args.quick else 15))
    print(report(counts, timing))
    out = {"meta": dict(counts["meta"], python=platform.python_version(), machine=platform.machine()),
           "counts": counts["results"], "cpp_host_time": timing}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
