"""Smoke test of bench/scenarios/postgres.py (figures 18, 19) at SMOKE sizes: right, not fast.

It starts the bench's own durable PostgreSQL (bench/pgserver.py), so it fails, never skips,
when the README's setup (scripts/setup.sh: Debian's postgresql) has not been run.
"""

from __future__ import annotations

import math
import os
import time

import pytest

from bench.common import SMOKE
from bench.scenarios import postgres
from bench.servers import running_servers


# bench/servers.py leaves each `sftpgate serve` stderr pipe for the garbage collector
@pytest.mark.filterwarnings("ignore:unclosed file <_io.TextIOWrapper:ResourceWarning")
def test_postgres_figures_18_and_19_smoke() -> None:
    if os.geteuid() != 0:
        pytest.fail("the bench creates a system user and runs a private sshd: run this as root")
    start = time.monotonic()
    with running_servers() as servers:
        figures = postgres.run(servers, SMOKE)
    elapsed = time.monotonic() - start

    assert [f.number for f in figures] == [18, 19]
    for fig in figures:
        assert math.isfinite(fig.value) and fig.value > 0, fig
        assert isinstance(fig.met, bool)  # the target parses
        assert fig.measured.strip() and fig.notes.strip()
        # durable, as SQLite's synchronous=full: otherwise the comparison means nothing
        settings = fig.extra["postgres"]
        assert (settings["fsync"], settings["synchronous_commit"]) == ("on", "on"), settings

    writes, close = figures
    # every round wrote every event as one row (checked inside), on both sides
    assert len(writes.extra["postgres_ops_s"]) == len(writes.extra["sqlite_ops_s"]) == SMOKE.rounds
    assert all(r > 0 for r in writes.extra["postgres_ops_s"] + writes.extra["sqlite_ops_s"])
    assert writes.extra["ratio"] > 0

    per_side = SMOKE.warmup + SMOKE.latency_uploads
    assert close.extra["uploads"] == (per_side, per_side)
    # each tiny *.mp4 became one job that a worker started and finished
    assert close.extra["states"] == ["succeeded"]  # rejected (not a video) is a finished job
    assert len(close.extra["postgres_start_ms"]) == SMOKE.latency_uploads
    assert len(close.extra["sqlite_start_ms"]) == SMOKE.latency_uploads
    phases = close.extra["postgres_phases_ms"]
    assert list(phases) == ["write", "commit+claim", "defer", "fetch", "lease"]
    assert list(close.extra["sqlite_phases_ms"]) == ["write", "commit+lease"]
    # the job went through Procrastinate: its own events are there for every upload
    assert all(math.isfinite(v) for v in phases.values()), phases
    assert elapsed < 90, f"the smoke run took {elapsed:.1f} s"
