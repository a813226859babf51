"""`sftpgate serve` on `database.url: postgresql://…` (a real PostgreSQL, a real gateway, paramiko,
real ffmpeg and aiosmtpd): the journal, quota usage and bans live in PostgreSQL, and
Procrastinate runs the pipeline's jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml

import pg_kit
from conftest import start_gateway
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.cli.main import main
from sftpgate.defender import Ban
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.postgres.backend import PostgresBackend


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


@pytest.fixture
def backend(pg: pg_kit.PgServer) -> Iterator[tuple[str, PostgresBackend]]:
    with pg.database() as url:
        b = PostgresBackend(url, size=2)
        b.migrate()
        try:
            yield url, b
        finally:
            b.close()


def test_serve_journals_a_session_and_its_upload_in_postgresql(
    tmp_path: Path, user_keys: dict[str, Path], backend: tuple[str, PostgresBackend]
) -> None:
    url, b = backend
    running = start_gateway(
        tmp_path, user_keys, extra={"database": {"url": url}, "server": {"quota_bytes": 10**9}}
    )
    try:
        sftp = running.sftp("alice")
        with sftp.open("/clip.bin", "wb") as f:
            f.write(b"x" * 5000)
        assert sftp.stat("/clip.bin").st_size == 5000
        running.close_clients()
    finally:
        running.stop()  # the writer commits what it holds before it stops
    rows: list[dict[str, Any]] = []
    b.reader().scan(JournalFilter(user="alice"), rows.append)
    ops = [r["op"] for r in rows]
    assert ops[0] == "login" and ops[-1] == "logout"
    close = next(r for r in rows if r["op"] == "close")
    assert (close["path"], close["bytes_written"]) == ("/clip.bin", 5000)
    with b._pool.connection() as conn:
        upload = conn.execute("SELECT path, bytes, state FROM uploads").fetchall()
        usage = conn.execute("SELECT bytes FROM quota_usage WHERE login = 'alice'").fetchone()
    assert upload == [{"path": "/clip.bin", "bytes": 5000, "state": "complete"}]
    assert usage is not None and usage["bytes"] >= 5000  # quotas count in PostgreSQL


def test_a_ban_in_postgresql_keeps_its_address_out_of_a_gateway(
    tmp_path: Path, user_keys: dict[str, Path], backend: tuple[str, PostgresBackend]
) -> None:
    url, b = backend
    now = time.time()
    # As another gateway on the same database would have written it.
    b.bans().upsert([Ban("127.0.0.1", now + 3600, 1, "another gateway's ban", now)])
    # Loopback is safelisted by default: the test takes it off the list.
    extra = {"database": {"url": url}, "defender": {"safelist": []}}
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        with pytest.raises((paramiko.SSHException, EOFError, ConnectionError)):
            running.sftp("alice")
    finally:
        running.stop()


def test_an_upload_on_postgresql_is_converted_by_procrastinate_and_emailed_once(
    tmp_path: Path,
    user_keys: dict[str, Path],
    backend: tuple[str, PostgresBackend],
    smtp: SmtpServer,
) -> None:
    url, b = backend
    extra = {**pipeline_settings(smtp.port), "database": {"url": url}}
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        clip = make_clip(tmp_path / "clip.mp4", "mp4", seconds=1)
        running.sftp("alice").put(str(clip), "/holiday.mp4")
        # The CLOSE reply came after the upload and its job committed, in PostgreSQL.
        assert [j.path for j in b.jobs().list()] == ["/holiday.mp4"]
        deadline = time.monotonic() + 90
        while (job := b.jobs().list()[0]).state.value in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)  # polling the job's state, bounded by the deadline
        assert (job.state.value, job.outcome, job.email_state.value) == (
            "succeeded",
            "converted",
            "sent",
        ), job
        assert (running.home("alice") / "converted" / "holiday.flv").stat().st_size > 0
        assert len(smtp.inbox.to("alice@example.org")) == 1
        with b._pool.connection() as conn:
            handed = conn.execute(
                "SELECT status FROM procrastinate_jobs WHERE queueing_lock = %s",
                (f"sftpgate-job-{job.id}",),
            ).fetchall()
        assert handed == [{"status": "succeeded"}]  # Procrastinate ran it, once
        # A reload (SIGHUP) reaches the Procrastinate-driven pool and its pipeline.
        running.gateway.reload(running.config)
        assert running.gateway.workers is not None
        assert running.gateway.workers.pipeline.config is running.config
    finally:
        running.stop()


def test_a_gateway_without_workers_hands_jobs_over_at_once_and_sftpgate_worker_runs_them(
    tmp_path: Path,
    user_keys: dict[str, Path],
    backend: tuple[str, PostgresBackend],
    smtp: SmtpServer,
) -> None:
    url, b = backend
    settings = pipeline_settings(smtp.port)
    extra = {**settings, "database": {"url": url}, "jobs": {**settings["jobs"], "workers": 0}}
    running = start_gateway(tmp_path, user_keys, extra=extra)
    worker = None
    try:
        clip = make_clip(tmp_path / "clip.mp4", "mp4", seconds=1)
        running.sftp("alice").put(str(clip), "/a.mp4")
        (job,) = b.jobs().list()
        # No worker runs anywhere yet: the gateway itself handed the job to Procrastinate.
        deadline = time.monotonic() + 10
        while not _procrastinate_rows(b, job.id):
            assert time.monotonic() < deadline, "the gateway never handed its job over"
            time.sleep(0.05)  # polling for the hand-over, bounded by the deadline
        assert _procrastinate_rows(b, job.id) == [{"status": "todo"}]
        # A worker host: `sftpgate worker` with the same config (workers on).
        cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
        cfg["jobs"]["workers"] = 1
        (tmp_path / "worker.yaml").write_text(yaml.safe_dump(cfg))
        worker = subprocess.Popen(
            [sys.executable, "-m", "sftpgate", "worker", "-c", str(tmp_path / "worker.yaml")],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while (job := b.jobs().get(job.id)).state.value in ("queued", "running"):
            assert time.monotonic() < deadline, job
            assert worker.poll() is None, "sftpgate worker exited"
            time.sleep(0.1)  # polling the job's state, bounded by the deadline
        assert (job.state.value, job.email_state.value) == ("succeeded", "sent"), job
        assert _procrastinate_rows(b, job.id) == [{"status": "succeeded"}]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(30)
        running.stop()
    assert len(smtp.inbox.to("alice@example.org")) == 1


def _procrastinate_rows(b: PostgresBackend, job_id: int) -> list[dict[str, Any]]:
    with b._pool.connection() as conn:
        return conn.execute(
            "SELECT status FROM procrastinate_jobs WHERE queueing_lock = %s",
            (f"sftpgate-job-{job_id}",),
        ).fetchall()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_jobs_cancel_on_postgresql_stops_the_running_ffmpeg_and_sends_nothing(
    tmp_path: Path,
    user_keys: dict[str, Path],
    backend: tuple[str, PostgresBackend],
    smtp: SmtpServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, b = backend
    # -readrate 1: ffmpeg takes as long as the clip plays, so the cancel lands mid-run.
    extra = {
        **pipeline_settings(smtp.port, input_args=["-readrate", "1"]),
        "database": {"url": url},
    }
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        clip = make_clip(tmp_path / "long.mp4", "mp4", seconds=20)
        running.sftp("alice").put(str(clip), "/long.mp4")
        deadline = time.monotonic() + 60
        while (job := b.jobs().list()[0]).pid is None or not job.pid_marker:
            assert time.monotonic() < deadline, job
            time.sleep(0.05)  # polling for ffmpeg to start, bounded by the deadline
        marker = job.pid_marker
        assert _processes_with(marker), "ffmpeg should be running"
        cfg = str(tmp_path / "config.yaml")
        assert main(["jobs", "-c", cfg, "cancel", str(job.id)]) == 0
        assert f"job {job.id}: cancelled" in capsys.readouterr().out
        deadline = time.monotonic() + 30
        while _processes_with(marker):
            assert time.monotonic() < deadline, "ffmpeg outlived the cancel"
            time.sleep(0.05)  # polling for ffmpeg to go, bounded by the deadline
        done = b.jobs().get(job.id)
        assert done.state.value == "cancelled" and done.email_state.value == "none"
        assert not (running.home("alice") / "converted" / "long.flv").exists()
    finally:
        running.stop()
    assert smtp.inbox.messages == []
