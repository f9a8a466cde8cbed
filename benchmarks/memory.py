"""How much activation memory one DenseNet training step needs: torchvision vs densenet_fused.

Compares, with the same weights and input: torchvision memory_efficient=False (naive) and True
(checkpointing), densenet_fused with memory_efficient=True (recompute) and False (keep bottlenecks), and
torch.compile of torchvision and of both fused modes where compiling is affordable. It reports

  * activation memory of one training step (forward + backward), exact on CPU (see accounting.py),
  * median step time, interleaved across implementations,
  * the largest batch (and, for CIFAR-style nets, the largest depth) that fits in --budget MiB,

for one main config, a depth sweep (DenseNet-BC k=12: memory quadratic vs linear in depth) and a
batch sweep; then writes JSON, CSV and PNG plots to --out. torch.compile is in the main config only
(every new shape recompiles).

    python benchmarks/memory.py            # default: DenseNet-121, batch 16, 64x64, < 10 min on 2 CPU cores
    python benchmarks/memory.py --quick    # a minute, for development
    python benchmarks/memory.py --device cuda --size 224 --batch 64
    python benchmarks/memory.py --spatial-dims 3   # 3-D instance-norm DenseNet-121 vs MONAI's, on volumes
"""

import os
import sys
from functools import partial

if __name__ == "__main__" and not __package__:  # run as a script: import the benchmarks package from the root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.accounting import activation_bytes, held_bytes, self_check  # noqa: E402
from benchmarks.cli import compile_note, make_parser, preset, start_run  # noqa: E402
from benchmarks.measurer import Measurer  # noqa: E402
from benchmarks.models import BASELINE, COMPILED, EAGER_IMPLS, IMPLS, MiB, bc_depth, make_batch, named_arch  # noqa: E402
from benchmarks.report import ratio, short_error, table  # noqa: E402
from benchmarks.search import largest_fitting  # noqa: E402
from benchmarks.steps import first_step, train_step  # noqa: E402
from benchmarks.timing import time_steps  # noqa: E402

PRESETS = {
    "quick": dict(
        batch=8, size=32, repeats=5, budget=128, depths=(40, 100), depth_batch=8, max_depth=250, batches=(2, 4, 8, 16)
    ),
    "default": dict(
        batch=16,
        size=64,
        repeats=9,
        budget=256,
        depths=(40, 100, 190, 250),
        depth_batch=8,
        max_depth=500,
        batches=(2, 4, 8, 16, 32),
    ),
    "full": dict(
        batch=16,
        size=64,
        repeats=10,
        budget=1024,
        depths=(40, 100, 190, 250, 400),
        depth_batch=16,
        max_depth=1000,
        batches=(1, 2, 4, 8, 16, 32, 64, 128),
    ),
}
DEPTH_SIZE = 32  # CIFAR resolution for the depth sweep
# Published for DenseNet-BC-100 (k=12, CIFAR-10) in efficient_densenet_pytorch's README: "each is a DenseNet-BC
# with 100 layers, batch size 64, tested on a NVIDIA Pascal Titan-X", GPU memory in GB (all of it, not only
# activations), naive vs memory-efficient.
PUBLISHED = {"depth": 100, "batch": 64, "naive_gb": 2.863, "efficient_gb": 1.605}
ACCEPTANCE = {"fused_eff": 0.30, "fused_keep": 0.50}  # target activation ratios vs torchvision naive


def mib(nbytes):
    return None if nbytes is None else nbytes / MiB


def fmt_mib(nbytes):
    return "error" if nbytes is None else f"{nbytes / MiB:.1f}"


def bar(desc, total=None):
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def main_config(m: Measurer, arch, cfg, impls, setup):
    """Activation memory and step time of every implementation, then the max batch under the budget."""
    batch, size = cfg["batch"], cfg["size"]
    results = {key: {} for key in impls}
    if "tv_compile" in impls:  # the first call compiles: time it apart from the steps
        x, target = make_batch(arch, batch, size, setup)
        try:
            results["tv_compile"]["compile_s"] = first_step(m.model(arch, "tv_compile"), x, target, setup.amp)
        except Exception as error:
            m.errors.append(f"{IMPLS['tv_compile']}: {short_error(error)}")
    with bar("memory", len(impls)) as m.progress:
        for key in impls:
            results[key]["activation"] = m.activation(arch, batch, size, key)

    ok = [key for key in impls if results[key]["activation"] is not None]
    x, target = make_batch(arch, batch, size, setup)
    steps = {key: partial(train_step, m.model(arch, key), x, target, setup.amp) for key in ok}
    with bar("step time", cfg["repeats"] * len(ok)) as progress:
        timings = time_steps(steps, cfg["repeats"], warmup=1, device=setup.device, progress=progress)
    for key in ok:
        results[key]["step_s"] = timings[key]["median"]
        results[key]["step_times_s"] = timings[key]["times"]

    budget = cfg["budget"] * MiB
    with bar("max batch search") as m.progress:
        for key in ok:
            if key in COMPILED:
                continue  # every new batch size recompiles: not searched
            known = {batch: m.total(arch, batch, size, key)}
            found, _ = largest_fitting(lambda b: m.total(arch, b, size, key), budget, known, start=2)
            results[key]["max_batch"] = found
    m.progress = None
    return results


def depth_sweep(m: Measurer, cfg, impls):
    """Activation memory of DenseNet-BC k=12 at each depth, then the largest depth within the budget."""
    batch, depths = cfg["depth_batch"], cfg["depths"]
    results = {key: {} for key in impls}
    with bar("depth sweep", len(depths) * len(impls)) as m.progress:
        for depth in depths:
            arch = named_arch(f"bc{depth}")
            for key in impls:
                results[key][depth] = m.activation(arch, batch, DEPTH_SIZE, key)
            m.drop(arch)

    budget, cap = cfg["budget"] * MiB, (cfg["max_depth"] - 4) // 6
    largest = {}

    def total(key, n):
        arch = named_arch(f"bc{bc_depth(n)}")
        value = m.total(arch, batch, DEPTH_SIZE, key)
        m.drop(arch)
        return value

    with bar("max depth search") as m.progress:
        for key in impls:
            known = {(d - 4) // 6: total(key, (d - 4) // 6) for d in depths}
            if all(v == float("inf") for v in known.values()):
                continue  # failed at every swept depth
            n, capped = largest_fitting(partial(total, key), budget, known, start=1, cap=cap)
            largest[key] = {"depth": bc_depth(n) if n else 0, "capped": capped}
    m.progress = None
    return results, largest


def batch_sweep(m: Measurer, arch, cfg, impls):
    results = {key: {} for key in impls}
    with bar("batch sweep", len(cfg["batches"]) * len(impls)) as m.progress:
        for batch in cfg["batches"]:
            for key in impls:
                results[key][batch] = m.activation(arch, batch, cfg["size"], key)
    m.progress = None
    return results


def sweep_table(title, axis_name, axis, results, impls, extra_rows=()):
    """Rows: one per axis value, then growth first -> last; columns: activation MiB (vs naive) per implementation."""
    base = results.get(BASELINE, {})
    rows = []
    for value in axis:
        row = [value]
        for key in impls:
            act = results[key].get(value)
            row.append(f"{fmt_mib(act)} ({ratio(act, base.get(value))})" if act is not None else "error")
        rows.append(row)
    first, last = axis[0], axis[-1]
    growth = [f"{last} vs {first}"]
    for key in impls:
        a, b = results[key].get(first), results[key].get(last)
        growth.append(f"x{b / a:.1f}" if a and b else "-")
    rows.append(growth)
    rows.extend(extra_rows)
    print(f"\n{title}")
    print(table([axis_name] + [IMPLS[key] for key in impls], rows))


def plot(path, title, xlabel, axis, results, impls, log=False):
    """One line per implementation; ``log``: log-log axes (linear growth is then a slope-1 line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in impls:
        points = [(v, mib(results[key].get(v))) for v in axis if results[key].get(v) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=IMPLS[key])
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        for axis_ in (ax.xaxis, ax.yaxis):
            axis_.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis_.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("activation memory of one training step (MiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_main(arch, cfg, setup, impls, main):
    """The main table: activation memory, step time and max batch, each against torchvision naive."""
    base = main[BASELINE]
    rows = []
    for key in impls:
        r = main[key]
        rows.append(
            [
                IMPLS[key],
                fmt_mib(r.get("activation")),
                ratio(r.get("activation"), base.get("activation")),
                f"{r['step_s'] * 1e3:.0f}" if "step_s" in r else "-",
                ratio(r.get("step_s"), base.get("step_s")),
                r.get("max_batch", "-"),
            ]
        )
    headers = ["implementation", "activation MiB", "vs naive", "step ms", "vs naive"]
    headers.append(f"max batch <= {cfg['budget']:g} MiB")
    print(
        f"\n{arch.name}, batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, {setup.describe()}: "
        f"one training step (step time: median of {cfg['repeats']} interleaved steps)"
    )
    print(table(headers, rows))
    if "compile_s" in main.get("tv_compile", {}):
        print(compile_note(main["tv_compile"]["compile_s"]))
    if (arch.name, cfg["batch"], cfg["size"]) == ("densenet121", 16, 64) and base.get("activation"):
        checks = []
        for key, target in ACCEPTANCE.items():
            act = main[key].get("activation")
            if act is not None:
                r = act / base["activation"]
                verdict = "met" if r <= target else "MISSED"
                checks.append(f"{IMPLS[key]} {r:.3f}x (target <= {target:.2f}x: {verdict})")
        print("  targets: " + "; ".join(checks))


def report_depth(cfg, depth, largest, impls):
    fits = [f"max <= {cfg['budget']:g} MiB"]
    for key in impls:
        d = largest.get(key)
        fits.append("-" if d is None else f"{'>= ' if d['capped'] else ''}{d['depth']}")
    sweep_table(
        f"DenseNet-BC k=12 (densenet_bc, CIFAR stem), batch {cfg['depth_batch']}, {DEPTH_SIZE}x{DEPTH_SIZE}: "
        "activation MiB (vs naive) by depth",
        "depth",
        list(cfg["depths"]),
        depth,
        impls,
        extra_rows=[fits],
    )
    print(
        f"  max: the largest depth whose step fits in {cfg['budget']:g} MiB "
        f"(params + grads + batch + activations), searched up to {cfg['max_depth']}"
    )
    p, d = PUBLISHED, PUBLISHED["depth"]
    print(
        f"  published, DenseNet-BC-{d} k=12, batch {p['batch']}, Titan-X GPU memory "
        "(efficient_densenet_pytorch README): "
        f"efficient {p['efficient_gb']} GB / naive {p['naive_gb']} GB = {p['efficient_gb'] / p['naive_gb']:.2f}x"
    )
    if d in depth[BASELINE]:
        base = depth[BASELINE][d]
        ours = [f"{IMPLS[key]} {ratio(depth[key].get(d), base)}" for key in impls if key != BASELINE]
        print(f"  here at depth {d} (activations, vs torchvision naive): " + ", ".join(ours))


def csv_rows(arch, cfg, impls, main, depth, by_batch):
    """One row per (sweep, config, implementation), in long format."""
    rows = []

    def row(sweep, model, batch, size, key, act, base_act, **extra):
        ratio = act / base_act if act and base_act else None
        rows.append(
            dict(sweep=sweep, model=model, batch=batch, size=size, impl=key, activation_mib=mib(act),
                 activation_vs_naive=ratio, **extra)
        )  # fmt: skip

    base = main[BASELINE]
    for key in impls:
        r = main[key]
        step, base_step = r.get("step_s"), base.get("step_s")
        row("main", arch.name, cfg["batch"], cfg["size"], key, r.get("activation"), base.get("activation"),
            step_ms=step * 1e3 if step else None, step_vs_naive=step / base_step if step and base_step else None,
            max_batch=r.get("max_batch"), budget_mib=cfg["budget"])  # fmt: skip
    for key in EAGER_IMPLS:
        for d in cfg["depths"]:
            row("depth", f"bc{d}", cfg["depth_batch"], DEPTH_SIZE, key, depth[key].get(d), depth[BASELINE].get(d))
        for b in cfg["batches"]:
            row("batch", arch.name, b, cfg["size"], key, by_batch[key].get(b), by_batch[BASELINE].get(b))
    return rows


VOLUME_PRESETS = {
    "quick": dict(batch=1, size=64, repeats=3, budget=256),
    "default": dict(batch=2, size=64, repeats=5, budget=512),
    "full": dict(batch=2, size=96, repeats=10, budget=2048),
}  # 64^3 is the smallest size whose last block still sees more than one voxel, which instance norm needs
VOLUME_IMPLS = {
    "monai": "MONAI DenseNet121",
    "fused_eff": IMPLS["fused_eff"],
    "fused_keep": IMPLS["fused_keep"],
    "monai_prelu": "MONAI DenseNet121, act=prelu",
    "fused_eff_prelu": f"{IMPLS['fused_eff']}, act=prelu",
}
_VOLUME_BASELINES = {"monai": "monai", "fused_eff": "monai", "fused_keep": "monai", "monai_prelu": "monai_prelu",
                     "fused_eff_prelu": "monai_prelu"}  # fmt: skip


def volume_models(setup, impls):
    """MONAI's 3-D DenseNet121 with instance norm (its own 3-D test's choice) and ours from the same config,
    holding MONAI's weights; the same with MONAI's PReLU activation (``act="prelu"``, the ``_prelu`` keys)."""
    from monai.networks.nets import DenseNet121

    import densenet_fused

    models = {}
    for act in ("relu", "prelu"):
        suffix = "_prelu" if act == "prelu" else ""
        config = dict(spatial_dims=3, in_channels=1, out_channels=2, norm=("instance", {"eps": 1e-5}), act=act)
        torch.manual_seed(0)
        monai = models["monai" + suffix] = setup.place(DenseNet121(**config)).train()
        for key in ("fused_eff", "fused_keep"):
            if key + suffix in impls:
                ours = densenet_fused.DenseNet.from_monai_config(**config, memory_efficient=key == "fused_eff")
                densenet_fused.load_monai_state_dict(ours, monai.state_dict())
                models[key + suffix] = setup.place(ours).train()
    return models


def volume_benchmark(args, setup):
    """Activation memory, step time and max batch of one training step on [batch, 1, size^3] volumes."""
    cfg = preset(args, VOLUME_PRESETS)
    impls = list(VOLUME_IMPLS)
    models = volume_models(setup, impls)

    def batch(n):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(n, 1, cfg["size"], cfg["size"], cfg["size"], generator=gen)
        if setup.channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        return x.to(setup.device, setup.dtype), torch.randint(0, 2, (n,), generator=gen).to(setup.device)

    x, target = batch(cfg["batch"])
    results = {key: {"activation": activation_bytes(models[key], x, target, setup.amp)} for key in impls}
    steps = {key: partial(train_step, models[key], x, target, setup.amp) for key in impls}
    timings = time_steps(steps, cfg["repeats"], warmup=1, device=setup.device)

    def total(key, n):
        xs, ts = batch(n)
        return held_bytes(models[key], xs, ts) + activation_bytes(models[key], xs, ts, setup.amp)

    budget = cfg["budget"] * MiB
    for key in impls:
        results[key]["step_s"] = timings[key]["median"]
        results[key]["step_times_s"] = timings[key]["times"]
        known = {cfg["batch"]: total(key, cfg["batch"])}
        results[key]["max_batch"], _ = largest_fitting(partial(total, key), budget, known, start=1)
    rows = []
    for key, r in results.items():
        base = results[_VOLUME_BASELINES[key]]  # MONAI's network with the same activation
        rows.append([VOLUME_IMPLS[key], fmt_mib(r["activation"]), ratio(r["activation"], base["activation"]),
                     f"{r['step_s'] * 1e3:.0f}", ratio(r["step_s"], base["step_s"]), r["max_batch"]])  # fmt: skip
    print(
        f"\n3-D DenseNet-121 (instance norm, 1 input channel), batch {cfg['batch']}, {cfg['size']}^3 volumes, "
        f"{setup.describe()}: one training step (step time: median of {cfg['repeats']} interleaved steps)"
    )
    headers = ["implementation", "activation MiB", "vs MONAI", "step ms", "vs MONAI", f"max batch <= {cfg['budget']:g} MiB"]
    # "vs MONAI": against MONAI's network with the same activation
    print(table(headers, rows))
    return cfg, results


def main():
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop banners off stderr
    parser = make_parser(__doc__.splitlines()[0], budget=True)
    parser.add_argument(
        "--spatial-dims", type=int, choices=[2, 3], default=2,
        help="3: only the 3-D instance-norm DenseNet-121 against MONAI's (needs monai), on volumes",
    )  # fmt: skip
    args = parser.parse_args()
    if args.spatial_dims == 3:
        run = start_run(args, "densenet_fused memory benchmark, 3-D volumes")
        cfg, results = volume_benchmark(args, run.setup)
        rows = [dict(impl=key, batch=cfg["batch"], size=cfg["size"], activation_mib=mib(r["activation"]),
                     step_ms=r["step_s"] * 1e3, max_batch=r["max_batch"], budget_mib=cfg["budget"])
                for key, r in results.items()]  # fmt: skip
        run.finish("memory_3d", {"config": cfg, "volume": results}, rows)
        return
    cfg = preset(args, PRESETS)
    run = start_run(args, "densenet_fused memory benchmark")
    setup, arch, impls = run.setup, run.arch, run.impls
    check = self_check(setup.device)
    print(check)

    m = Measurer(setup)
    main = main_config(m, arch, cfg, impls, setup)
    report_main(arch, cfg, setup, impls, main)
    depth, largest = depth_sweep(m, cfg, EAGER_IMPLS)
    report_depth(cfg, depth, largest, EAGER_IMPLS)
    by_batch = batch_sweep(m, arch, cfg, EAGER_IMPLS)
    sweep_table(
        f"{arch.name}, {cfg['size']}x{cfg['size']}: activation MiB (vs naive) by batch size",
        "batch",
        list(cfg["batches"]),
        by_batch,
        EAGER_IMPLS,
    )
    for error in dict.fromkeys(m.errors):
        print(f"  failed: {error}")

    plots = ("memory_vs_depth.png", "memory_vs_batch.png")
    depth_title = f"DenseNet-BC k=12, batch {cfg['depth_batch']}, {DEPTH_SIZE}x{DEPTH_SIZE}, {setup.describe()}"
    plot(os.path.join(args.out, plots[0]), depth_title, "depth", cfg["depths"], depth, EAGER_IMPLS)
    batch_title = f"{arch.name}, {cfg['size']}x{cfg['size']}, {setup.describe()}"
    plot(os.path.join(args.out, plots[1]), batch_title, "batch size", cfg["batches"], by_batch, EAGER_IMPLS, log=True)
    data = {
        "config": {**cfg, "model": arch.name, "impls": impls, "compile_skipped": run.skip_reason or None},
        "self_check": check,
        "main": main,
        "depth_sweep": {
            "batch": cfg["depth_batch"],
            "size": DEPTH_SIZE,
            "activation": depth,
            "largest": largest,
            "published": PUBLISHED,
        },
        "batch_sweep": {"size": cfg["size"], "activation": by_batch},
        "errors": m.errors,
    }
    run.finish("memory", data, csv_rows(arch, cfg, impls, main, depth, by_batch), also=plots)


if __name__ == "__main__":
    main()
