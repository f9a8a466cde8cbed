"""benchmarks/gpu_check.py: its dry run writes every section of the report, and a section that fails or runs
past its time limit is recorded while the next one runs."""

import json
import os
import subprocess
import sys
import time

import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SECTIONS = [
    "Environment",
    "Numerics: Triton primitives against the reference",
    "Numerics: tiny models against torchvision (float64 truth)",
    "Per-primitive time: Triton against the PyTorch reference",
    "Whole training step: time and memory",
    "Sync-freedom of our forward and backward",
    "Numerics: the CUDA-marked tests",
    "Max batch under the memory budget",
]
# Sections whose figures (CUDA-event times, GPU memory, sync debug mode) a CPU dry run cannot measure.
UNMEASURED = [SECTIONS[i] for i in (3, 4, 5, 7)]


def test_dry_run_writes_every_section(tmp_path):
    command = [sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    markdown = (tmp_path / "cpu-dry-run.md").read_text()
    assert report["dry_run"] and [s["title"] for s in report["sections"]] == SECTIONS
    for s in report["sections"]:
        assert s["status"] == "done", (s["title"], s["status"], s["data"].get("error"))
        body = markdown.split(f"\n## {s['title']}\n", 1)[1].split("\n## ", 1)[0]
        assert "CPU dry run:" in body, s["title"]
        if s["title"] in UNMEASURED:
            assert "not measured (CPU dry run)" in body, s["title"]


def test_failing_and_overrunning_sections_are_recorded(tmp_path, monkeypatch):
    sys.path.insert(0, BENCHMARKS)
    import gpu_check

    def overruns(check, sec):
        sec.notes.append("found before the limit")
        time.sleep(30)

    def fails(check, sec):
        raise ValueError("broken")

    def runs(check, sec):
        sec.table("what", "value").append(["ran", "yes"])

    sections = [gpu_check.Section(fn.__name__, 1, 1, fn) for fn in (overruns, fails, runs)]
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    setup = gpu_check.C.Setup(torch.device("cpu"), torch.float32, True, torch.bfloat16)
    check = gpu_check.Check(gpu_check.DRY_PLAN, True, setup, "CPU", str(tmp_path), "report", time.perf_counter())
    gpu_check.run_sections(check)
    assert [s.status for s in sections] == [
        "stopped at its time limit (1 s): partial", "failed: ValueError: broken", "done"
    ]  # fmt: skip
    assert sections[0].seconds < 10
    markdown = (tmp_path / "report.md").read_text()
    assert "found before the limit" in markdown and "| ran | yes |" in markdown
    assert "ValueError: broken" in json.loads((tmp_path / "report.json").read_text())["sections"][1]["data"]["error"]
