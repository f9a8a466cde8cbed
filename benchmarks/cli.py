"""The command line of memory.py and speed.py: flags, presets, the compile decision and the run's header."""

import argparse
import os
import time
from dataclasses import dataclass

import torch

from .models import ARCHS, COMPILE_MODES, COMPILED, DTYPES, IMPLS, Arch, Setup, named_arch
from .report import RESULTS_DIR, environment, write_csv, write_json


def make_parser(description: str, budget=False) -> argparse.ArgumentParser:
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
    """Whether the compiled implementations run (those of ``COMPILED`` with torch.compile's default mode; the
    ``COMPILE_MODES`` ones are gpu_check.py's), and the reason printed when they do not."""
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
    impls = [key for key in IMPLS if key not in COMPILE_MODES and (key not in COMPILED or with_compile)]
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    env = header(title, setup.device)
    if skip_reason:
        print(skip_reason)
    return Run(args, setup, named_arch(args.model), impls, skip_reason, env, start)


def compile_note(seconds) -> str:
    return f"  (torch.compile's first step, which compiles, took {seconds:.0f} s)"


def header(title: str, device: torch.device) -> dict:
    env = environment(device)
    print(title)
    print(
        f"torch {env['torch']}, torchvision {env['torchvision']}, {env['device']}"
        f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, {env['cpu_threads']} CPU threads, "
        f"OMP_WAIT_POLICY={env['omp_wait_policy']}, densenet_fused backend: {env['densenet_fused_backend']}"
    )
    return env
