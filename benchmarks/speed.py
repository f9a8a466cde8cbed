"""Training-step time of torchvision's DenseNet vs densenet_fused, interleaved in one run.

Compares, with the same weights and input: torchvision memory_efficient=False (naive) and True
(checkpointing), densenet_fused memory_efficient=True and False, and torch.compile of torchvision and of
both fused modes on CUDA (on CPU only with --compile: compiling takes minutes there). A step is zero_grad + forward +
cross-entropy + backward (no optimizer). Steps of all implementations are interleaved, so machine
noise hits all alike, and the median and min-max are reported with the median's ratio to torchvision
naive. Eval-mode inference (``torch.no_grad()``) is timed the same way. On CUDA steps are timed with
CUDA events, and each implementation's max_memory_allocated is reported too.

Each table also gives the achieved GFLOP/s: torchvision's FLOPs for that step (convolutions and GEMMs,
counted once per model and input size by torch's FlopCounterMode, the same work for every implementation)
over the median time; and the compute floor: those FLOPs at this machine's measured dense GEMM rate.

    python benchmarks/speed.py                    # CPU: DenseNet-121 batch 16 at 64x64 and 128x128
    python benchmarks/speed.py --device cuda --amp --channels-last   # + 224x224, batch 64
"""

import os
import sys
from functools import partial

if __name__ == "__main__" and not __package__:  # run as a script: import the benchmarks package from the root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tqdm import tqdm  # noqa: E402

from benchmarks.cli import compile_note, make_parser, preset, start_run  # noqa: E402
from benchmarks.models import BASELINE, IMPLS, MiB, build_models, make_batch  # noqa: E402
from benchmarks.report import ratio, short_error, table  # noqa: E402
from benchmarks.steps import eval_step, first_step, step_flops, train_step  # noqa: E402
from benchmarks.timing import matmul_rate, time_steps  # noqa: E402

PRESETS = {
    "cpu": {
        "quick": dict(configs=[(8, 32), (16, 64)], repeats=5),
        "default": dict(configs=[(16, 64), (16, 128)], repeats=11),
        "full": dict(configs=[(16, 64), (32, 128), (16, 224)], repeats=21),
    },
    "cuda": {
        "quick": dict(configs=[(16, 64)], repeats=10),
        "default": dict(configs=[(16, 64), (64, 224)], repeats=20),
        "full": dict(configs=[(16, 64), (64, 224), (128, 224)], repeats=50),
    },
}


def run_config(arch, batch, size, setup, impls, repeats, errors):
    """Time every implementation on one (batch, size); returns {impl: result dict}."""
    models = build_models(arch, impls, setup)
    x, target = make_batch(arch, batch, size, setup)
    results = {}
    for key in impls:  # the first step compiles (torch.compile) and shows which implementations run at all
        try:
            results[key] = {"first_step_s": first_step(models[key], x, target, setup.amp)}
        except Exception as error:
            errors.append(f"{IMPLS[key]} at batch {batch}, {size}x{size}: {short_error(error)}")
    steps = {key: partial(train_step, models[key], x, target, setup.amp) for key in results}
    desc = f"batch {batch}, {size}x{size}"
    with tqdm(total=2 * repeats * len(steps), desc=desc, leave=False, dynamic_ncols=True) as progress:
        timings = time_steps(steps, repeats, warmup=1, device=setup.device, progress=progress)
        for key in steps:
            models[key].eval()
        inference = {key: partial(eval_step, models[key], x, setup.amp) for key in steps}
        eval_timings = time_steps(inference, repeats, warmup=1, device=setup.device, progress=progress)
    for key, t in timings.items():
        results[key].update(median_s=t["median"], times_s=t["times"])
        results[key].update(eval_median_s=eval_timings[key]["median"], eval_times_s=eval_timings[key]["times"])
        if "peak" in t:
            results[key]["max_memory_allocated"] = t["peak"]
    naive = models[BASELINE]
    flops = {"train": step_flops(naive, x, target), "eval": step_flops(naive, x, target, train=False)}
    return results, flops


def print_config(arch, batch, size, setup, results, flops, rate, repeats):
    base = results.get(BASELINE, {})
    cuda = setup.device.type == "cuda"
    for mode, prefix, what in (("train", "", "training step"), ("eval", "eval_", "eval-mode inference, no_grad")):
        headers = ["implementation", "median ms", "min-max ms", "vs naive", "GFLOP/s", "images/s"]
        if cuda and mode == "train":
            headers += ["max_memory_allocated MiB", "vs naive"]
        rows = []
        for key, r in results.items():
            median, ms = r[f"{prefix}median_s"], [t * 1e3 for t in r[f"{prefix}times_s"]]
            row = [IMPLS[key], f"{median * 1e3:.1f}", f"{min(ms):.0f}-{max(ms):.0f}"]
            row += [ratio(median, base.get(f"{prefix}median_s")), f"{flops[mode] / median / 1e9:.0f}", f"{batch / median:.1f}"]
            if cuda and mode == "train":
                peak = r["max_memory_allocated"]
                row += [f"{peak / MiB:.0f}", ratio(peak, base.get("max_memory_allocated"))]
            rows.append(row)
        print(f"\n{arch.name}, batch {batch}, {size}x{size}, {setup.describe()}, {what} (median of {repeats} interleaved)")
        print(table(headers, rows))
        floor = flops[mode] / rate
        print(
            f"  compute floor: {flops[mode] / 1e9:.1f} GFLOP at this machine's GEMM rate of {rate / 1e9:.0f} GFLOP/s "
            f"= {floor * 1e3:.1f} ms ({ratio(floor, base.get(f'{prefix}median_s'))} torchvision naive)"
        )
    if "tv_compile" in results:
        print(compile_note(results["tv_compile"]["first_step_s"]))


def main():
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop banners off stderr
    args = make_parser(__doc__.splitlines()[0]).parse_args()
    run = start_run(args, "densenet_fused speed benchmark")
    setup, arch, impls = run.setup, run.arch, run.impls
    cfg = preset(args, PRESETS[setup.device.type])
    configs = cfg["configs"]
    if args.batch or args.size:
        configs = [(args.batch or configs[0][0], args.size or configs[0][1])]
    rate = matmul_rate(setup.device, setup.amp or setup.dtype)
    print(f"dense GEMM rate (torch.mm, 2048^2, {setup.amp or setup.dtype}, best of 5): {rate / 1e9:.0f} GFLOP/s")
    errors, all_results, rows = [], [], []
    for batch, size in configs:
        results, flops = run_config(arch, batch, size, setup, impls, cfg["repeats"], errors)
        print_config(arch, batch, size, setup, results, flops, rate, cfg["repeats"])
        all_results.append({"batch": batch, "size": size, "flops": flops, "results": results})
        base = results.get(BASELINE, {})
        for key, r in results.items():
            rows.append(
                dict(
                    model=arch.name, batch=batch, size=size, setup=setup.describe(), impl=key,
                    median_ms=r["median_s"] * 1e3,
                    vs_naive=r["median_s"] / base["median_s"] if "median_s" in base else None,
                    gflops_per_s=flops["train"] / r["median_s"] / 1e9,
                    eval_median_ms=r["eval_median_s"] * 1e3,
                    eval_vs_naive=r["eval_median_s"] / base["eval_median_s"] if "eval_median_s" in base else None,
                    max_memory_allocated_mib=r["max_memory_allocated"] / MiB if "max_memory_allocated" in r else None,
                )
            )  # fmt: skip
    for error in errors:
        print(f"  failed: {error}")

    data = {
        "config": {"model": arch.name, "repeats": cfg["repeats"], "impls": impls, "gemm_flops_per_s": rate},
        "compile_skipped": run.skip_reason or None,
        "configs": all_results,
        "errors": errors,
    }
    run.finish("speed", data, rows)


if __name__ == "__main__":
    main()
