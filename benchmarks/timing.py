"""How long steps take, and where the time goes: interleaved step timing, the host time of issuing a step,
the same step replayed from a CUDA graph (its device time), kernel launches per step, and a GEMM ceiling.

An eager CUDA step takes max(host time, device time): when issuing its kernels takes the host longer than
the GPU takes to run them, the GPU waits (host-bound). Replaying the step from a CUDA graph removes the
host's part, so the replay time is the device time; the host time is measured by issuing the step without
waiting for the GPU.
"""

import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile



def synchronize(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def host_times(step, repeats: int, device=None) -> list:
    """Seconds the host takes to issue ``step()``, ``repeats`` times: sync, t0, step(), t1, sync. On CUDA the
    GPU may still be running the step at t1; on CPU the host time is the whole step."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        synchronize(device)
    return times


def kernel_launches(step, device) -> dict:
    """Counts of the GPU activities of one ``step()``, from torch.profiler: {"kernels", "memcpy", "memset"}.
    On CPU the profiler records CPU activity only, so every count is 0."""
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    counts = Counter({"kernels": 0, "memcpy": 0, "memset": 0})
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.lower()
            counts["memcpy" if name.startswith("memcpy") else "memset" if name.startswith("memset") else "kernels"] += 1
    return dict(counts)


class CaptureFailed(RuntimeError):
    """A step could not be captured in a CUDA graph (the error is the message)."""


def graph_replay(step, device, replays: int = 10, warmup: int = 3, prepare=None) -> dict:
    """``step()`` captured in one ``torch.cuda.CUDAGraph`` and replayed: the device time of the step.

    ``warmup`` calls first run on a side stream, outside the capture (Triton autotuning, cuDNN/cuBLAS
    set-up and lazy allocations happen there, never inside the capture); then ``prepare()`` (e.g.
    ``zero_grad(set_to_none=True)``, so that the captured backward allocates the gradients in the graph's
    pool), the capture on that stream, one replay, and ``replays`` replays timed with CUDA events.
    Returns {"median": s, "times": [...], "pool_bytes": memory the graph's private pool reserves}.
    Raises CaptureFailed when the capture or the first replay fails.
    """
    if torch.device(device).type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    if prepare is not None:
        prepare()
    torch.cuda.empty_cache()  # as the capture will: the pool's size is the growth of reserved memory from here
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    try:
        try:
            with torch.cuda.graph(graph, stream=stream):
                step()
            graph.replay()
            torch.cuda.synchronize(device)
        except Exception as error:
            raise CaptureFailed(f"{type(error).__name__}: {error}") from error
        pool = torch.cuda.memory_reserved(device) - reserved
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return {"median": statistics.median(times), "times": times, "pool_bytes": pool}
    finally:
        torch.cuda.synchronize(device)
        del graph


def call_time(fn, device, calls: int = 20, replays: int = 5, host_repeats: int = 3) -> dict:
    """Time of one ``fn()`` call (after a first, warm-up call, e.g. one that autotunes): the device's and
    the host's.

    On CUDA: {"device": s per call, from ``calls`` calls captured in one CUDA graph and replayed
    ``replays`` times (median), so launch overhead is not in it; "how": "graph", or "eager" with the
    capture's error when the calls cannot be captured (then the time is ``calls`` eager calls timed with
    CUDA events, host time included), "host": s per call of issuing ``calls`` calls, median of
    ``host_repeats``}. On CPU: "host" only.
    """
    fn()
    cuda = torch.device(device).type == "cuda"
    host = statistics.median(host_times(lambda: [fn() for _ in range(calls)], host_repeats, device)) / calls
    if not cuda:
        return {"host": host}

    def many():
        for _ in range(calls):
            fn()

    try:
        result = graph_replay(many, device, replays=replays, warmup=1)
        return {"device": result["median"] / calls, "how": "graph", "host": host}
    except CaptureFailed as error:
        times = time_steps({"calls": many}, replays, warmup=0, device=torch.device(device))["calls"]["times"]
        return {"device": statistics.median(times) / calls, "how": f"eager ({error})", "host": host}
