"""Shared machinery for benchmarks: interleaved rounds, medians, ratios, the report.

Every comparison runs A and B alternately, each going first in every other
round (A B, B A, A B, ...), discards the warm-up round and keeps the medians:
absolute times on these machines drift 10-40% between runs, ratios of
interleaved runs hold.
"""

from __future__ import annotations

import operator
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass
class Figure:
    """One row of docs/benchmarks.md."""

    number: int
    title: str
    measured: str  # human text: "412 vs 330 MB/s"
    value: float  # what the target is checked against (a ratio, or an absolute value)
    target: str  # ">= 1.1", "<= 20 ms" ...
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        op, _, number = self.target.partition(" ")
        limit = float(number.split()[0])
        return bool(_OPS[op](self.value, limit))


def interleave(
    a: Callable[[], float], b: Callable[[], float], *, rounds: int, warmup: int = 1
) -> tuple[list[float], list[float]]:
    """Run a and b alternately ``warmup + rounds`` times; return the kept values of each.

    The warm-up rounds run A then B; the kept ones alternate who goes first
    (A B, B A, A B, ...), so neither side always runs right after the other's
    work. On the bench VM one pair of runs looked as if the side that went
    first paid more (1 GiB uploads: sftpgate 0.88-0.97 of OpenSSH with
    sftpgate first, 1.09-1.30 with OpenSSH first); a second pair showed no
    such effect (0.94-1.43 either way). Alternating costs nothing and removes
    the question (docs/benchmarks.md).
    """
    kept_a: list[float] = []
    kept_b: list[float] = []
    for index in range(warmup + rounds):
        if index < warmup or (index - warmup) % 2 == 0:
            va = a()
            vb = b()
        else:
            vb = b()
            va = a()
        if index >= warmup:
            kept_a.append(va)
            kept_b.append(vb)
    return kept_a, kept_b


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (from /proc)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine_facts() -> dict[str, str]:
    import asyncssh
    import paramiko

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "asyncssh": asyncssh.__version__,
        "paramiko": paramiko.__version__,
        "openssh": _version(["ssh", "-V"]),
        "ffmpeg": _version([shutil.which("ffmpeg") or "ffmpeg", "-version"]),
    }


def write_report(figures: list[Figure], command: str, path: Path, *, sizes: dict[str, Any]) -> str:
    """Render docs/benchmarks.md (the table, the command, versions and machine facts)."""
    facts = machine_facts()
    lines = [
        "# Benchmarks",
        "",
        "Produced by:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each pair runs",
        "interleaved, each side first in every other round (A B, B A, ...; warm-up",
        "discarded), and the table shows medians and",
        "the ratio sftpgate ÷ anchor. Sizes: "
        + ", ".join(f"{k}={v}" for k, v in sizes.items())
        + ".",
        "",
        "| # | figure | measured | ratio / value | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for fig in sorted(figures, key=lambda f: f.number):
        lines.append(
            f"| {fig.number} | {fig.title} | {fig.measured} | {fig.value:.3g} |"
            f" {fig.target} | {'yes' if fig.met else '**no**'} |"
        )
    notes = [fig for fig in figures if fig.notes]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- **{fig.number}. {fig.title}:** {fig.notes}" for fig in notes]
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    text = "\n".join(lines) + "\n"
    # A hand-written "## Findings" section (profiles, fixes) survives regeneration.
    if path.exists() and "\n## Findings" in path.read_text():
        text += "\n## Findings" + path.read_text().split("\n## Findings", 1)[1]
    path.write_text(text)
    return text


@dataclass(frozen=True)
class Options:
    """Sizes of every scenario. ``FULL`` is what the issue asks; ``SMOKE`` is for the tests."""

    rounds: int = 6  # even: each side goes first in half of them (see interleave)
    warmup: int = 1
    big_mib: int = 1024  # figures 1, 2, 10
    small_files: int = 2000  # figures 3, 9, 11, 13
    small_kib: int = 4
    short_sessions: int = 100  # figure 12: one small upload each, one after another
    concurrent: int = 300  # figure 4
    concurrent_mib: int = 1
    many: int = 1000  # figure 5
    latency_uploads: int = 200  # figure 6
    journal_ops: int = 200_000  # figure 7: sustained writes
    journal_rows: int = 1_000_000  # figure 7: query size
    pipelined_requests: int = 4000  # figure 14: requests a file is moved in
    overload_sessions: int = 256  # figure 16: sessions uploading at once
    overload_mib: int = 16
    overload_rounds: int = 2
    clip_seconds: int = 60  # figure 8
    clip_size: str = "1280x720"
    only: frozenset[int] = frozenset()  # figures asked for (empty: all)

    def wants(self, number: int) -> bool:
        return not self.only or number in self.only


FULL = Options()
SMOKE = Options(
    rounds=1,
    warmup=0,
    big_mib=2,
    small_files=10,
    short_sessions=3,
    concurrent=4,
    many=8,
    latency_uploads=5,
    journal_ops=2000,
    journal_rows=5000,
    pipelined_requests=100,
    overload_sessions=4,
    overload_mib=1,
    overload_rounds=1,
    clip_seconds=2,
    clip_size="320x240",
)
