"""Training-step time of torchvision's DenseNet vs densenet_fused, interleaved in one run.

Compares, with the same weights and input: torchvision memory_efficient=False (naive) and True
(checkpointing), densenet_fused memory_efficient=True and False, and torch.compile(torchvision) on
CUDA (on CPU only with --compile: compiling takes minutes there). A step is zero_grad + forward +
cross-entropy + backward (no optimizer). Steps of all implementations are interleaved, so machine
noise hits all alike, and the median is reported with its ratio to torchvision naive. On CUDA steps
are timed with CUDA events, and each implementation's max_memory_allocated is reported too.

    python benchmarks/speed.py                    # CPU: DenseNet-121 batch 16 at 64x64 and 128x128
    python benchmarks/speed.py --device cuda --amp --channels-last   # + 224x224, batch 64
"""

import _common as C  # first: it sets the profiler environment before torch loads

from functools import partial

from tqdm import tqdm

# (batch, size) configs per device and mode; --batch / --size replace them with one config.
PRESETS = {
    "cpu": {
        "quick": dict(configs=[(8, 32), (16, 64)], repeats=5),
        "default": dict(configs=[(16, 64), (16, 128)], repeats=5),
        "full": dict(configs=[(16, 64), (32, 128), (16, 224)], repeats=10),
    },
    "cuda": {
        "quick": dict(configs=[(16, 64)], repeats=10),
        "default": dict(configs=[(16, 64), (64, 224)], repeats=20),
        "full": dict(configs=[(16, 64), (64, 224), (128, 224)], repeats=50),
    },
}


def run_config(arch, batch, size, setup, impls, repeats, errors):
    """Time every implementation on one (batch, size); returns {impl: result dict}."""
    models = C.build_models(arch, impls, setup)
    x, target = C.make_batch(arch, batch, size, setup)
    results = {}
    for key in impls:  # the first step compiles (torch.compile) and shows which implementations run at all
        try:
            results[key] = {"first_step_s": C.first_step(models[key], x, target, setup.amp)}
        except Exception as error:
            errors.append(f"{C.IMPLS[key]} at batch {batch}, {size}x{size}: {C.short_error(error)}")
    steps = {key: partial(C.train_step, models[key], x, target, setup.amp) for key in results}
    desc = f"batch {batch}, {size}x{size}"
    with tqdm(total=repeats * len(steps), desc=desc, leave=False, dynamic_ncols=True) as progress:
        timings = C.time_steps(steps, repeats, warmup=1, device=setup.device, progress=progress)
    for key, t in timings.items():
        results[key].update(median_s=t["median"], times_s=t["times"])
        if "peak" in t:
            results[key]["max_memory_allocated"] = t["peak"]
    return results


def print_config(arch, batch, size, setup, results, repeats):
    base = results.get(C.BASELINE, {})
    cuda = setup.device.type == "cuda"
    headers = ["implementation", "median ms", "min-max ms", "vs naive", "images/s"]
    if cuda:
        headers += ["max_memory_allocated MiB", "vs naive"]
    rows = []
    for key, r in results.items():
        ms = [t * 1e3 for t in r["times_s"]]
        row = [C.IMPLS[key], f"{r['median_s'] * 1e3:.1f}", f"{min(ms):.0f}-{max(ms):.0f}"]
        row += [C.ratio(r["median_s"], base.get("median_s")), f"{batch / r['median_s']:.1f}"]
        if cuda:
            peak = r["max_memory_allocated"]
            row += [f"{peak / C.MiB:.0f}", C.ratio(peak, base.get("max_memory_allocated"))]
        rows.append(row)
    print(f"\n{arch.name}, batch {batch}, {size}x{size}, {setup.describe()} (median of {repeats} interleaved steps)")
    print(C.table(headers, rows))
    if "tv_compile" in results:
        print(C.compile_note(results["tv_compile"]["first_step_s"]))


def main():
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    run = C.start_run(args, "densenet_fused speed benchmark")
    setup, arch, impls = run.setup, run.arch, run.impls
    cfg = C.preset(args, PRESETS[setup.device.type])
    configs = cfg["configs"]
    if args.batch or args.size:
        configs = [(args.batch or configs[0][0], args.size or configs[0][1])]
    errors, all_results, rows = [], [], []
    for batch, size in configs:
        results = run_config(arch, batch, size, setup, impls, cfg["repeats"], errors)
        print_config(arch, batch, size, setup, results, cfg["repeats"])
        all_results.append({"batch": batch, "size": size, "results": results})
        base = results.get(C.BASELINE, {})
        for key, r in results.items():
            rows.append(
                dict(
                    model=arch.name, batch=batch, size=size, setup=setup.describe(), impl=key,
                    median_ms=r["median_s"] * 1e3,
                    vs_naive=r["median_s"] / base["median_s"] if "median_s" in base else None,
                    max_memory_allocated_mib=r["max_memory_allocated"] / C.MiB if "max_memory_allocated" in r else None,
                )
            )  # fmt: skip
    for error in errors:
        print(f"  failed: {error}")

    data = {
        "config": {"model": arch.name, "repeats": cfg["repeats"], "impls": impls},
        "compile_skipped": run.skip_reason or None,
        "configs": all_results,
        "errors": errors,
    }
    run.finish("speed", data, rows)


if __name__ == "__main__":
    main()
