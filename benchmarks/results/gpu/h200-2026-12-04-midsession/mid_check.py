"""Mid-session GPU check of the new hot path (not committed): numerics, step time, host time, graph replay,
profile, launch overhead.  python .device/mid_check.py [--dry]"""
import os, sys, time, json, statistics, copy, traceback
sys.path.insert(0, os.getcwd())
DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["DENSENET_FUSED_BACKEND"] = "triton"
import torch, torchvision, torch.nn.functional as F
import densenet_fused as dn
from densenet_fused.ops._backend import config

OUT = os.environ.get("OUT", "/tmp/midout")
os.makedirs(OUT, exist_ok=True)
log = open(f"{OUT}/mid.txt", "w")
T0 = time.time()
def p(*a):
    s = " ".join(str(x) for x in a)
    print(f"[{time.time()-T0:6.1f}s] {s}", flush=True); print(f"[{time.time()-T0:6.1f}s] {s}", file=log, flush=True)

dev = torch.device("cpu" if DRY else "cuda")
import triton
p("env", torch.__version__, torchvision.__version__, triton.__version__, torch.cuda.get_device_name() if not DRY else "cpu", "backend", config.backend or "device default")

def sync():
    if dev.type == "cuda": torch.cuda.synchronize()

# 1. numerics: tiny model, train step, ours fp32 vs torchvision fp64; and torchvision fp32's own error
def numerics():
    for tf32 in (False, True):
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        for me in (True, False):
            torch.manual_seed(0)
            cfg = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=4, num_classes=5, drop_rate=0.0)
            ours = dn.DenseNet(**cfg, memory_efficient=me)
            tv = torchvision.models.DenseNet(**cfg); tv.load_state_dict(ours.state_dict())
            x = torch.randn(4, 3, 40, 36)
            res = {}
            for name, m, dtype in (("truth", tv, torch.float64), ("tv32", tv, torch.float32), ("ours32", ours, torch.float32)):
                mm = copy.deepcopy(m).to(dev, dtype).to(memory_format=torch.channels_last)
                xi = x.to(dev, dtype).to(memory_format=torch.channels_last).requires_grad_()
                outs = []
                for step in range(2):
                    out = mm(xi); out.square().sum().backward()
                    outs.append([out.detach().double(), xi.grad.double()] + [q.grad.double() for q in mm.parameters()] + [b.double() for b in mm.buffers() if b.is_floating_point()])
                    with torch.no_grad():
                        for q in mm.parameters(): q -= 1e-3 * q.grad; q.grad = None
                    xi.grad = None
                res[name] = outs
            def err(a):
                e = sorted(((u - v).norm() / v.norm().clamp_min(1e-30)).item() for sa, sb in zip(res[a], res["truth"]) for u, v in zip(sa, sb))
                return f"median {statistics.median(e):.2e} max {e[-1]:.2e}"
            p(f"numerics tf32={tf32} mem_eff={me}: rel err vs fp64 over all outputs/grads/stats: ours {err('ours32')} | torchvision fp32 {err('tv32')}")
    torch.backends.cudnn.conv.fp32_precision = "tf32"

def models(batch, size):
    torch.manual_seed(0)
    arch = dict(growth_rate=4, block_config=(2, 2), num_init_features=8) if DRY else dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
    tv = torchvision.models.DenseNet(**arch)
    ms = {"tv": tv, "fused_eff": dn.DenseNet(**arch, memory_efficient=True), "fused_keep": dn.DenseNet(**arch, memory_efficient=False)}
    for k in ("fused_eff", "fused_keep"): ms[k].load_state_dict(tv.state_dict())
    return {k: m.to(dev, memory_format=torch.channels_last) for k, m in ms.items()}

def step_fn(m, x, y):
    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
    return step

def timing(batch, size, steps):
    ms = models(batch, size)
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    steps_fn = {k: step_fn(m, x, y) for k, m in ms.items()}
    for k, f in steps_fn.items():
        t = time.time(); f(); f(); sync(); p(f"{k} warm-up 2 steps {time.time()-t:.1f}s")
        if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
    res = {k: {"ms": [], "host": []} for k in steps_fn}
    for _ in range(steps):
        for k, f in steps_fn.items():
            ms[k].zero_grad(set_to_none=False)
            sync(); t0 = time.perf_counter(); f(); t1 = time.perf_counter(); sync(); t2 = time.perf_counter()
            res[k]["ms"].append((t2 - t0) * 1e3); res[k]["host"].append((t1 - t0) * 1e3)
    for k in res:
        p(f"{k} b{batch} {size}^2 bf16 CL: step {statistics.median(res[k]['ms']):.1f} ms (min {min(res[k]['ms']):.1f}) host {statistics.median(res[k]['host']):.1f} ms")
    # memory per impl
    if dev.type == "cuda":
        for k, f in steps_fn.items():
            ms[k].zero_grad(set_to_none=False); sync()
            base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats(); f(); sync()
            p(f"{k} step peak above resident {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
    # graph replay
    if dev.type == "cuda":
        for k, f in steps_fn.items():
            try:
                s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2): f()
                torch.cuda.current_stream().wait_stream(s); sync()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g): f()
                g.replay(); sync()
                ts = []
                for _ in range(10):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
                p(f"{k} graph replay median {statistics.median(ts):.1f} ms")
                del g
            except Exception as e:
                p(f"{k} graph capture FAILED {type(e).__name__}: {str(e)[:300]}")
    return ms, steps_fn

def profile(ms, steps_fn):
    from torch.profiler import profile as prof, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for k in ("fused_eff", "tv"):
        with prof(activities=acts) as pr:
            steps_fn[k](); sync()
        ev = pr.key_averages()
        kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) if dev.type == "cuda" else 0
        p(f"profile {k}: cuda kernel launches in one step {kernels}")
        table = ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        open(f"{OUT}/profile_{k}.txt", "w").write(table)
        p(table[:4000] if k == "fused_eff" else table[:1500])

def launch_overhead():
    from densenet_fused.ops.bn_relu import bn_relu_launch, _bn_relu_kernel
    from densenet_fused.ops._norm_args import NormArgs
    x = torch.randn(2, 64, 8, 8, device=dev, dtype=torch.bfloat16)
    n = NormArgs(torch.zeros(64, device=dev), torch.ones(64, device=dev), torch.ones(64, device=dev), torch.zeros(64, device=dev), 1e-5)
    for _ in range(3): bn_relu_launch(x, n)
    sync(); t = time.perf_counter()
    for _ in range(200): bn_relu_launch(x, n)
    t1 = time.perf_counter(); sync()
    p(f"bn_relu_launch host per call {(t1 - t) / 200 * 1e6:.1f} us")
    y = torch.empty_like(x)
    sync(); t = time.perf_counter()
    for _ in range(200): torch.relu(x)
    t1 = time.perf_counter(); sync()
    p(f"torch.relu host per call {(t1 - t) / 200 * 1e6:.1f} us")

for name, fn in (("numerics", numerics), ("launch", launch_overhead)):
    try: fn()
    except Exception: p(name, "FAILED", traceback.format_exc()[-2000:])
try:
    ms, steps_fn = timing(4 if DRY else 64, 32 if DRY else 224, 1 if DRY else 8)
    profile(ms, steps_fn)
except Exception:
    p("timing FAILED", traceback.format_exc()[-3000:])
p("done")
