"""The benchmarks package: importing it sets no environment variable, its three scripts run from the repository
root as the README says, the max-batch search starts where it is told, and reports name the package's own commit."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.report import package_commit
from benchmarks.search import largest_fitting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "benchmarks")) if name.endswith(".py"))
SCRIPTS = ["memory.py", "speed.py", "gpu_check.py"]


def _env():
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "KINETO_LOG_LEVEL")}


def test_importing_benchmarks_sets_no_environment_variables():
    code = (
        "import importlib, json, os, sys\n"
        "import torch, torchvision, densenet_fused\n"  # what they import may set its own; compare after
        "before = dict(os.environ)\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module('benchmarks.' + name)\n"
        "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert {"gpu_check", "memory", "speed", "models", "timing", "twins"} <= set(MODULES)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_run_from_the_repository_root(script):
    """``python benchmarks/<script>`` without PYTHONPATH: the scripts import the package from the root."""
    result = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--help"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout


def test_largest_fitting_starts_from_a_known_point():
    """From one measured point, the first guess is the line through it and the origin (it undershoots a measure
    with a fixed part, so it fits), allowed past 4x with ``max_growth``; then the search ends exactly."""
    probes = []

    def measure(v):
        probes.append(v)
        return 100 + 10 * v  # a fixed part and a per-item part

    found, capped = largest_fitting(measure, 10_000, {10: measure(10)}, max_growth=64)
    assert (found, capped) == (990, False)
    assert probes[1] == 10 + int((10_000 - 200) / 20)  # 500: past 4x 10
    assert len(probes) <= 5
    probes.clear()
    found, _ = largest_fitting(measure, 10_000, {10: measure(10)})  # the default: at most 4x a probe
    assert found == 990 and probes[1] == 40


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)  # fmt: skip


def test_package_commit_is_the_packages_own_checkout(tmp_path):
    import densenet_fused

    here = package_commit()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(densenet_fused.__file__),
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    if head:  # a checkout (CI's fresh clone, a worktree): its commit
        assert here.startswith(head), (here, head)
    # A tree copied without its .git, nested in another repository: "unknown", not the other one's commit.
    outer = tmp_path / "outer"
    tree = outer / "copied" / "densenet_fused"
    tree.mkdir(parents=True)
    (tree / "__init__.py").write_text("")
    _git(outer, "init", "-q")
    _git(outer, "add", ".")
    _git(outer, "commit", "-q", "-m", "outer")
    assert package_commit(str(tree)) == "unknown"
    # Its own checkout: its commit, and "+ local changes" once a tracked file changes.
    _git(outer / "copied", "init", "-q")
    _git(outer / "copied", "add", ".")
    _git(outer / "copied", "commit", "-q", "-m", "tree")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=outer / "copied", capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    assert package_commit(str(tree)) == commit
    (tree / "__init__.py").write_text("x = 1\n")
    assert package_commit(str(tree)) == commit + " + local changes"
    # A git work tree whose tracked files do not include the package: "unknown".
    other = tmp_path / "other"
    (other / "densenet_fused").mkdir(parents=True)
    (other / "README").write_text("")
    _git(other, "init", "-q")
    _git(other, "add", "README")
    _git(other, "commit", "-q", "-m", "other")
    assert package_commit(str(other / "densenet_fused")) == "unknown"
