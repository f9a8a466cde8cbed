"""benchmarks/gpu_check.py: its dry run writes every section of the report with the rows the GPU run fills, the
run's budget is shared between the sections, a section that fails or runs past its time limit is recorded while
the next one runs, and the cuda-marked tests it runs collect on a machine without MONAI or timm."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_check
from benchmarks.models import IMPLS
from benchmarks.sections import Report, Section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = [
    "Environment",
    "Numerics: Triton primitives against the reference",
    "Numerics: tiny models against torchvision (float64 truth)",
    "Per-primitive time: Triton against the PyTorch reference, on the device and on the host",
    "Whole training step: eager, graph-replayed and host time, kernel launches, memory",
    "Sync-freedom of our forward and backward",
    "Max batch under the memory budget",
    "Numerics: the CUDA-marked tests",
    "Compiled training step: torch.compile, default and reduce-overhead (CUDA graphs)",
]
# Sections whose figures (CUDA-event times, graph replay, GPU memory, sync debug mode) a CPU dry run cannot measure.
UNMEASURED = [SECTIONS[i] for i in (3, 4, 5, 6, 8)]
NOT_MEASURED = "not measured (CPU dry run)"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--out", str(out)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # as from a checkout
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((out / "cpu-dry-run.json").read_text())
    markdown = (out / "cpu-dry-run.md").read_text()
    return report, markdown, {s["title"]: s for s in report["sections"]}


def body(markdown, title):
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_dry_run_writes_every_section(dry_run):
    report, markdown, _ = dry_run
    assert report["dry_run"] and [s["title"] for s in report["sections"]] == SECTIONS
    assert report["budget_s"] == gpu_check.BUDGET_S
    for s in report["sections"]:
        assert s["status"] == "done", (s["title"], s["status"], s["data"].get("error"))
        assert "CPU dry run:" in body(markdown, s["title"]), s["title"]
        if s["title"] in UNMEASURED:
            assert NOT_MEASURED in body(markdown, s["title"]), s["title"]


def test_dry_run_whole_step_has_graph_replay_host_time_and_launches(dry_run):
    _, markdown, sections = dry_run
    step = sections[SECTIONS[4]]
    timing, memory = step["tables"]
    assert timing["headers"] == ["implementation", "eager step ms", "vs naive", "graph replay ms", "vs naive",
                                 "host ms / step", "bound", "kernels / step"]  # fmt: skip
    assert "graph pool MiB" in memory["headers"]
    assert [row[0] for row in timing["rows"]] == [IMPLS[key] for key in gpu_check.EAGER_IMPLS]
    for row in timing["rows"]:
        assert row[3] == NOT_MEASURED  # graph replay: a CPU has no CUDA graphs
        assert float(row[5]) > 0  # host time: measured on CPU too
        assert row[7] == NOT_MEASURED  # kernels: the profiler ran, a CPU has no CUDA kernels
    for key in gpu_check.EAGER_IMPLS:
        assert step["data"][key]["launches"] == {"kernels": 0, "memcpy": 0, "memset": 0}
        assert step["data"][key]["host_s"] > 0
    kernels = sections[SECTIONS[3]]["tables"][0]["headers"]
    assert "Triton host µs / call" in kernels and "host-bound" in kernels


def test_dry_run_compiles_ours_first_and_reports_reduce_overhead(dry_run):
    _, _, sections = dry_run
    compiled = sections[SECTIONS[-1]]
    rows = compiled["tables"][0]["rows"]
    assert [row[0].split(" (backend")[0] for row in rows] == [IMPLS[key] for key in gpu_check.COMPILE_ORDER]
    assert gpu_check.COMPILE_ORDER.index("fused_eff_graphs") < gpu_check.COMPILE_ORDER.index("tv_compile")
    for key, row in zip(gpu_check.COMPILE_ORDER, rows):
        if key in gpu_check.DRY_PLAN.compiled:
            assert float(row[1]) > 0 and float(row[4]) > 0, row  # compile seconds, host time
        else:
            assert row[1].startswith("not run in the dry run"), row
    ours = rows[gpu_check.COMPILE_ORDER.index("fused_eff_graphs")]
    assert 'mode="reduce-overhead"' in ours[0] and "backend" not in ours[0]  # inductor, as on the GPU
    assert ours[6].startswith("**skipped**") and "CPU tensors" in ours[6]
    assert compiled["data"]["fused_eff_graphs"]["backend"] == "inductor"


def test_dry_run_max_batch_starts_from_the_step_memory(dry_run):
    _, _, sections = dry_run
    step, search = sections[SECTIONS[4]]["data"], sections[SECTIONS[6]]["data"]
    plan = gpu_check.DRY_PLAN
    for key in gpu_check.EAGER_IMPLS:
        assert search[key]["result"].isdigit(), search[key]
        assert str(plan.batch) not in search[key]["probes"]  # seeded by the whole-step section, not probed again
        first = int(next(iter(search[key]["probes"])))
        per_image = step[key]["total"] / plan.batch  # the line through the origin
        assert first == plan.batch + int((plan.budget - step[key]["total"]) / per_image)
        assert search[key]["probes"][str(first)] <= plan.budget  # which undershoots: the first probe fits


def test_budget_is_shared_and_left_time_goes_to_the_next_sections(tmp_path):
    limits = []

    def record(sec):
        limits.append(sec.limit_s)

    sections = [Section(name, name, plan_s, lambda check, sec: record(sec)) for name, plan_s in
                (("a", 10), ("b", 10), ("c", 20))]  # fmt: skip
    report = Report("t", "cmd", sections, budget_s=8, out=str(tmp_path), stem="report", min_section_s=0.5)
    report.run(None)
    assert [s.status for s in sections] == ["done"] * 3
    # 8 s shared 1:1:2: the deadlines fall at 2, 4 and 8 s, whatever the sections take; a takes next to no
    # time, so b gets its own 2 s and most of a's.
    assert [s.deadline - report.start for s in sections] == pytest.approx([2, 4, 8])
    assert limits[0] == pytest.approx(2, abs=0.5) and limits[1] > 2


def test_failing_and_overrunning_sections_are_recorded(tmp_path):
    def overruns(check, sec):
        sec.notes.append("found before the limit")
        time.sleep(30)

    def fails(check, sec):
        raise ValueError("broken")

    def runs(check, sec):
        sec.table("what", "value").append(["ran", "yes"])

    sections = [Section(fn.__name__, fn.__name__, plan_s, fn) for fn, plan_s in ((overruns, 1), (fails, 1), (runs, 1))]
    report = Report("t", "cmd", sections, budget_s=6, out=str(tmp_path), stem="report", min_section_s=0.5)
    report.run(None)
    assert [s.status for s in sections] == [
        "stopped at its time limit (2 s): partial", "failed: ValueError: broken", "done"
    ]  # fmt: skip
    assert sections[0].seconds < 10
    markdown = (tmp_path / "report.md").read_text()
    assert "found before the limit" in markdown and "| ran | yes |" in markdown
    assert "ValueError: broken" in json.loads((tmp_path / "report.json").read_text())["sections"][1]["data"]["error"]


BLOCK_PEERS = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("monai", "timm", "hypothesis"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
import pytest
# hypothesis's pytest plugin is not there either
sys.exit(pytest.main(["--collect-only", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-m", "cuda",
                      "tests"]))
"""


def test_cuda_tests_collect_without_monai_timm_and_hypothesis():
    """The lent GPU machine has none of them: the files that need them skip, and the rest still collects."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", BLOCK_PEERS], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=env)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert not re.search(r"\d+ errors?\b", output), output[-4000:]
    for skipped in ("tests/peer/test_monai_densenet.py", "tests/peer/test_timm_models.py", "tests/test_fuzz.py"):
        assert f"SKIPPED [1] {skipped}" in output, output[-4000:]
    assert "tests/peer/test_torchvision_models.py::test_classification_model[cuda-densenet121]" in output
    assert "tests/test_cuda_graphs.py::test_reduce_overhead_trains_like_eager_with_cuda_graphs" in output
