"""``server.processes: 2``: a real ``sftpgate serve`` with a supervisor and two gateway processes
on one port, driven by real paramiko sessions, checked in the journal it wrote."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest
from test_leases import WorkerProcess
from test_serve_process import ServeProcess

from conftest import PASSWORDS, free_port, write_config
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp

SESSIONS = 20
UPLOADS_PER_SESSION = 10  # 200 uploads
LOGIN_LINE = re.compile(
    r"\[(\d+)\] sftpgate\.frontdoor\.ssh: session=\S+ login=alice .*\blogin alice from"
)


def wait_for(
    lines: list[str], pattern: re.Pattern[str], seen: int, timeout: float
) -> re.Match[str]:
    """The first of ``lines`` from ``seen`` on matching ``pattern``; waits for it to come."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lines[seen:]:
            found = pattern.search(line)
            if found:
                return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern.pattern!r} in the log: {''.join(lines[seen:])[-3000:]}")


def upload_session(port: int, index: int) -> None:
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.connect(username="alice", password=PASSWORDS["alice"])
        client = paramiko.SFTPClient.from_transport(t)
        assert client is not None
        for n in range(UPLOADS_PER_SESSION):
            with client.open(f"in/s{index:02d}-{n:02d}.mp4", "wb") as f:
                # Different bytes each: the same content again would be a duplicate, no job.
                f.write(f"not a video {index} {n}\n".encode() * 64)
    finally:
        t.close()


def login_ok(port: int) -> bool:
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.connect(username="alice", password=PASSWORDS["alice"])
        return True
    except (paramiko.SSHException, OSError):
        return False
    finally:
        t.close()


def test_two_processes_share_the_port_journal_each_upload_once_and_run_each_job_once(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    """And a `sftpgate worker` beside them takes jobs too, never one another worker holds."""
    extra = pipeline_settings(smtp.port)
    extra["server"] = {"processes": 2}
    # Each upload its own job, two at once: the point is how often a job runs, not fairness.
    extra["jobs"].update(dedupe_window=0, per_user_queue=1000, per_user_running=2)
    extra["email"] = {"enabled": False}
    config = write_config(tmp_path, user_keys, extra)
    (tmp_path / "homes" / "alice" / "in").mkdir(parents=True)
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    worker: WorkerProcess | None = None
    try:
        wait_for(serve.lines, re.compile(r"sftpgate: listening on .*\(2 processes\)"), 0, 60)
        worker = WorkerProcess(config)
        with ThreadPoolExecutor(SESSIONS) as pool:
            list(pool.map(lambda i: upload_session(port, i), range(SESSIONS)))

        # The kernel spread the sessions over both processes.
        pids = {m.group(1) for line in serve.lines if (m := LOGIN_LINE.search(line))}
        assert len(pids) == 2, f"one process took every session: {pids}"

        rows = wait_jobs(
            tmp_path / "state" / "journal.sqlite3",
            lambda rows: settled(rows, SESSIONS * UPLOADS_PER_SESSION),
            timeout=240,
        )
        assert len(rows) == SESSIONS * UPLOADS_PER_SESSION
        assert len({r["path"] for r in rows}) == len(rows)
        assert all(r["state"] == "succeeded" and r["outcome"] == "rejected" for r in rows)
        assert all(r["attempts"] == 1 for r in rows), [r for r in rows if r["attempts"] != 1]
        # Both the supervisor's workers and the one beside them ran jobs, each its own.
        ran = re.compile(r"job (\d+): ")
        by_serve = {m.group(1) for line in serve.lines if (m := ran.search(line))}
        by_worker = {m.group(1) for line in worker.lines if (m := ran.search(line))}
        assert not by_serve & by_worker
        assert len(by_serve | by_worker) == len(rows)
        # Which side won each job above is the scheduler's choice; that each side takes jobs
        # is shown with the other one frozen (SIGSTOP, while idle: it holds no lease).
        for frozen, index in ((worker.proc.pid, SESSIONS), (serve.proc.pid, SESSIONS + 1)):
            os.kill(frozen, signal.SIGSTOP)
            try:
                upload_session(port, index)
                rows = wait_jobs(
                    tmp_path / "state" / "journal.sqlite3",
                    lambda rows, n=index + 1: settled(rows, n * UPLOADS_PER_SESSION),
                    timeout=120,
                )
            finally:
                os.kill(frozen, signal.SIGCONT)
        assert all(r["attempts"] == 1 for r in rows), [r for r in rows if r["attempts"] != 1]
        last = [str(i) for i in sorted(r["id"] for r in rows)]
        fresh_serve = set(last[-2 * UPLOADS_PER_SESSION : -UPLOADS_PER_SESSION])
        fresh_worker = set(last[-UPLOADS_PER_SESSION:])
        by_serve = {m.group(1) for line in serve.lines if (m := ran.search(line))}
        by_worker = {m.group(1) for line in worker.lines if (m := ran.search(line))}
        assert fresh_serve <= by_serve and fresh_worker <= by_worker
        assert not by_serve & by_worker
        # No job was taken from a live worker or had its ffmpeg killed, on either side.
        for log in ("".join(serve.lines), worker.log()):
            assert "taken over" not in log and "killed leftover" not in log

        # A child killed as a crash would be: the port keeps answering, the child comes back.
        match = wait_for(
            serve.lines, re.compile(r"gateway process 1 \(pid (\d+)\) listening"), 0, 5
        )
        seen = len(serve.lines)
        os.kill(int(match.group(1)), signal.SIGKILL)
        wait_for(
            serve.lines, re.compile(r"gateway process 1 \(pid \d+\) ended with SIGKILL"), seen, 30
        )
        assert all(login_ok(port) for _ in range(6)), "the port stopped answering"
        wait_for(
            serve.lines,
            re.compile(rf"gateway process 1 \(pid (?!{match.group(1)}\b)\d+\) listening"),
            seen,
            60,
        )
        assert all(login_ok(port) for _ in range(6))
    finally:
        if worker is not None:
            assert worker.stop() == 0
        assert serve.stop() == 0

    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    try:
        uploads = db.execute(
            "SELECT path, COUNT(*) FROM uploads WHERE state = 'complete' GROUP BY path"
        ).fetchall()
        assert len(uploads) == (SESSIONS + 2) * UPLOADS_PER_SESSION
        assert all(count == 1 for _, count in uploads)
        closes = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT path) FROM operations "
            "WHERE op = 'close' AND path LIKE '%/in/s%'"
        ).fetchone()
        assert closes == ((SESSIONS + 2) * UPLOADS_PER_SESSION,) * 2
        # Every session, from either process, journaled once with its logout.
        sessions = db.execute(
            "SELECT COUNT(*) FROM sessions WHERE login = 'alice' AND ended_at IS NOT NULL"
        ).fetchone()[0]
        assert sessions >= SESSIONS + 12
    finally:
        db.close()


@pytest.mark.parametrize("value", ["auto", 3])
def test_processes_key_takes_a_count_or_auto(
    tmp_path: Path, user_keys: dict[str, Path], value: object
) -> None:
    from sftpgate.config import load_config

    config = load_config(write_config(tmp_path, user_keys, {"server": {"processes": value}}))
    expected = max(1, os.cpu_count() or 1) if value == "auto" else value
    assert config.server.processes == expected


def test_sighup_reaches_every_process_and_sigterm_stops_them_all(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config = write_config(tmp_path, user_keys, {"server": {"processes": 2}})
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    try:
        wait_for(serve.lines, re.compile(r"sftpgate: listening on .*\(2 processes\)"), 0, 60)
        children = {
            m.group(1)
            for line in serve.lines
            if (m := re.search(r"gateway process \d \(pid (\d+)\) listening", line))
        }
        assert len(children) == 2
        seen = len(serve.lines)
        serve.proc.send_signal(signal.SIGHUP)
        wait_for(serve.lines, re.compile(r"supervisor reloaded"), seen, 10)
        reloaded = re.compile(r"\[(\d+)\] sftpgate\.gateway: reloaded")
        deadline = time.monotonic() + 10
        pids: set[str] = set()
        while pids != children and time.monotonic() < deadline:
            pids = {m.group(1) for line in serve.lines[seen:] if (m := reloaded.search(line))}
            time.sleep(0.05)
        assert pids == children
    finally:
        assert serve.stop() == 0
    for pid in children:  # the supervisor waited for each: none outlives it
        assert not Path(f"/proc/{pid}").exists()
