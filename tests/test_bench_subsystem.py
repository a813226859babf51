"""Smoke test of bench/scenarios/subsystem.py (figures 10-12): tiny sizes, correctness only."""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
from pathlib import Path

import pytest

from bench.common import SMOKE
from bench.scenarios import subsystem, transfer
from bench.servers import Endpoint, SubsystemSite, clean_home, running_servers


def test_subsystem_figures_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the subsystem benchmark creates a system user and runs two private sshds: "
            "run this test as root"
        )
    seen: dict[str, list[dict[str, int]]] = {}

    def recording_clean(endpoint: Endpoint) -> None:
        # what each round left in the home (useradd's dot files aside), before it is emptied
        files = {
            p.name: p.stat().st_size
            for p in endpoint.home.iterdir()
            if p.is_file() and not p.name.startswith(".")
        }
        seen.setdefault(endpoint.name, []).append(files)
        clean_home(endpoint)

    # Every round empties the home through transfer.run_round (shared by all figures).
    monkeypatch.setattr(transfer, "clean_home", recording_clean)
    with running_servers() as servers:
        figures = subsystem.run(servers, SMOKE)
        assert not any(servers.openssh.home.iterdir()), "a round left files behind"
        site = servers.workdir / "subsystem"
        assert not any((site / "spool").iterdir()), "the daemon missed events: taps spooled them"
        journal = site / "state" / "journal.sqlite3"
        with contextlib.closing(sqlite3.connect(journal)) as db:
            uploads = db.execute("SELECT login, path, bytes, state FROM uploads").fetchall()
            sessions = db.execute(
                "SELECT login, auth_method FROM sessions WHERE ended_at IS NOT NULL"
            ).fetchall()
        login = servers.login

    assert [f.number for f in figures] == [10, 11, 12]
    for fig in figures:
        assert fig.title.startswith("OpenSSH front door (sftpgate subsystem): "), fig
        assert math.isfinite(fig.value) and fig.value > 0, fig
        assert fig.measured.strip() and "target ours" in fig.notes.lower(), fig
        assert fig.target.startswith(">= "), fig
        assert isinstance(fig.met, bool)

    rounds = SMOKE.rounds + SMOKE.warmup
    size = SMOKE.small_kib * 1024
    big = {subsystem.BIG: SMOKE.big_mib * 1024 * 1024}
    small = {f"small-{i:05d}": size for i in range(SMOKE.small_files)}
    short = {f"session-{i:05d}": size for i in range(SMOKE.short_sessions)}
    expected = [big] * rounds + [small] * rounds + [short] * rounds
    assert seen == {"subsystem": expected, "openssh": expected}

    # the tapped side journaled every upload of every round, complete, and every session
    every = {**big, **small, **short}
    assert len(uploads) == rounds * len(every)
    assert {(lg, path, state) for lg, path, _, state in uploads} == {
        (login, f"/{name}", "complete") for name in every
    }
    assert all(nbytes == every[path[1:]] for _, path, nbytes, _ in uploads)
    assert sessions == [(login, "openssh")] * rounds * (2 + SMOKE.short_sessions)


def test_journal_check_fails_when_rows_are_missing_or_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subsystem, "JOURNAL_TIMEOUT", 0.2)
    journal = tmp_path / "journal.sqlite3"
    (tmp_path / "spool").mkdir()
    site = SubsystemSite(Endpoint("subsystem", 0, tmp_path, 0), journal, tmp_path / "spool", 0)
    check = subsystem._Journal(site)
    with contextlib.closing(sqlite3.connect(journal)) as db:

        def add(path: str, state: str) -> None:
            db.execute("INSERT INTO uploads (path, state) VALUES (?, ?)", (path, state))
            db.commit()

        db.execute("CREATE TABLE uploads (id INTEGER PRIMARY KEY, path TEXT, state TEXT)")
        db.execute("CREATE TABLE sessions (id TEXT, ended_at REAL)")
        add("/a", "complete")
        since = check.mark()
        add("/b", "complete")
        with pytest.raises(RuntimeError, match="1 upload rows for 2 files"):
            check.wait(since, [Path("a"), Path("b")])  # /a is from before the mark
        check.wait(since, [Path("b")])
        add("/c", "incomplete")
        with pytest.raises(RuntimeError, match="not complete"):
            check.wait(since, [Path("b"), Path("c")])
    assert len(check.lags) == 1
