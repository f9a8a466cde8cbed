"""A report made of time-limited sections, for a machine lent for a few minutes (gpu_check.py's frame).

Each section gets a share of the run's budget in proportion to its planned seconds. Its deadline is the
sum of its own and every earlier section's share, so the time an early section leaves unused goes to the
ones after it, and none can take a later one's share. A section that fails records its error, one that
runs out of time keeps what it found, and the next one runs. The report (Markdown and JSON) is rewritten
after every section, so a run cut short still leaves one.
"""

import contextlib
import gc
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from .report import short_error, write_json

@dataclass
class Section:
    """One section of the report: what it found so far (notes, tables, data), however it ended."""

    key: str  # short name, for --only
    title: str
    plan_s: float  # its share of the default budget: seconds planned on one H100/H200
    run: Callable
    status: str = "not run"
    seconds: float | None = None
    limit_s: float | None = None  # the time it was given, planned share plus what earlier sections left
    deadline: float = 0.0  # time.perf_counter() at which it is stopped
    notes: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def table(self, *headers) -> list:
        """A new table; append its rows to the list returned (a cut-off section keeps those it has)."""
        rows = []
        self.tables.append({"headers": list(headers), "rows": rows})
        return rows

    def left(self) -> float:
        """Seconds until this section's deadline."""
        return self.deadline - time.perf_counter()

    def markdown(self) -> list:
        took = "" if self.seconds is None else f", {self.seconds:.0f} s"
        limit = "" if self.limit_s is None else f", limit {self.limit_s:.0f} s"
        lines = [f"## {self.title}", "", f"*{self.status}{took}* (planned {self.plan_s:.0f} s{limit})", ""]
        for note in self.notes:
            lines += [note, ""]
        for t in self.tables:
            lines += ["| " + " | ".join(t["headers"]) + " |", "|" + " --- |" * len(t["headers"])]
            lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in t["rows"]] + [""]
        return lines


class OutOfTime(BaseException):
    """A section's time limit passed. A BaseException, so the ``except Exception`` inside sections let it by."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in the main thread after ``seconds`` (SIGALRM): a long C call ends first."""

    def expire(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Report:
    """A run's sections, its budget and clock, and where its report goes."""

    title: str
    command: str
    sections: list
    budget_s: float
    out: str
    stem: str  # file name of the report, without .md / .json
    start: float = field(default_factory=time.perf_counter)
    dry_run: bool = False
    min_section_s: float = 3  # a section left with less time than this is skipped

    def write(self) -> None:
        wall = time.perf_counter() - self.start
        lines = [f"# {self.title}", ""]
        lines += [f"`{self.command}`: {wall:.0f} s used of the {self.budget_s:.0f} s budget.", ""]
        lines += ["| section | status | seconds | planned s | limit s |", "| --- | --- | ---: | ---: | ---: |"]
        for s in self.sections:
            took = "-" if s.seconds is None else f"{s.seconds:.0f}"
            limit = "-" if s.limit_s is None else f"{s.limit_s:.0f}"
            lines.append(f"| {s.title} | {s.status} | {took} | {s.plan_s:.0f} | {limit} |")
        lines.append("")
        for s in self.sections:
            lines += s.markdown()
        with open(os.path.join(self.out, f"{self.stem}.md"), "w") as f:
            f.write("\n".join(lines))
        keys = ("key", "title", "status", "seconds", "plan_s", "limit_s", "notes", "tables", "data")
        sections = [{key: getattr(s, key) for key in keys} for s in self.sections]
        data = {"title": self.title, "command": self.command, "dry_run": self.dry_run, "wall_s": wall,
                "budget_s": self.budget_s, "sections": sections}  # fmt: skip
        write_json(os.path.join(self.out, f"{self.stem}.json"), data)

    def run(self, *args) -> None:
        """Each section ``sec.run(*args, sec)`` within its deadline; the report is rewritten after each."""
        planned = sum(s.plan_s for s in self.sections) or 1.0
        scale, planned_end = self.budget_s / planned, self.start
        for sec in self.sections:
            planned_end += sec.plan_s * scale
            now = time.perf_counter()
            sec.deadline = min(planned_end, self.start + self.budget_s)
            sec.limit_s = sec.deadline - now
            if sec.limit_s < self.min_section_s:
                sec.status = "skipped: the run's time budget is spent"
                continue
            sec.status = "running"
            self.write()
            try:
                with time_limit(sec.limit_s):
                    sec.run(*args, sec)
                sec.status = "done"
            except OutOfTime:
                sec.status = f"stopped at its time limit ({sec.limit_s:.0f} s): partial"
            except Exception as error:
                sec.status = f"failed: {short_error(error)}"
                sec.data["error"] = traceback.format_exc()
            sec.seconds = time.perf_counter() - now
            gc.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            self.write()
            print(f"{sec.title}: {sec.status} ({sec.seconds:.0f} s of {sec.limit_s:.0f})", flush=True)
