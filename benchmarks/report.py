"""What a run reports: the environment it ran in, plain-text tables, JSON and CSV files, short errors."""

import csv
import json
import math
import os
import platform
import subprocess

import torch
import torchvision

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def fused_backend(device: torch.device) -> str:
    """Which backend densenet_fused's primitives run on this device (C++/Triton kernels or reference)."""
    try:
        from densenet_fused.ops import _backend

        return _backend.backend_for(torch.empty(1, device=device))
    except Exception as error:  # the package may not expose this; the benchmark does not depend on it
        return f"unknown ({error})"


def package_commit(package_dir: str | None = None) -> str:
    """The commit of the checkout densenet_fused is imported from (``package_dir``: its directory), with
    " + local changes" when its tracked files differ from that commit; "unknown" unless the directory above
    the package is the top of a git work tree whose tracked files include the package (a tree copied
    without its .git, or nested in another repository, says "unknown" rather than the other one's commit)."""
    if package_dir is None:
        import densenet_fused

        package_dir = os.path.dirname(os.path.abspath(densenet_fused.__file__))
    top, name = os.path.split(os.path.normpath(package_dir))

    def git(*args) -> str:
        result = subprocess.run(["git", "-C", top, *args], capture_output=True, text=True, timeout=30)
        return result.stdout.strip() if result.returncode == 0 else ""

    try:
        toplevel = git("rev-parse", "--show-toplevel")
        if not toplevel or os.path.realpath(toplevel) != os.path.realpath(top):
            return "unknown"
        if not git("ls-files", "--", f"{name}/"):
            return "unknown"
        commit = git("rev-parse", "--short", "HEAD")
        if not commit:
            return "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" + local changes" if changed else "")


def environment(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "densenet_fused_backend": fused_backend(device),
        "densenet_fused_commit": package_commit(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
