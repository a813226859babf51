"""Stopping `sftpgate serve` / `sftpgate worker` (real processes, real clients).

First SIGTERM: the listener closes at once, open sessions go on (an upload in flight
completes) up to server.drain_timeout, running jobs are released (ffmpeg stopped, the
attempt not counted), exit 0. A second SIGTERM stops at once (exit 143) and loses
nothing durable.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from test_leases import WorkerProcess, lease_config, transcoding
from test_pipeline_durability import processes_with, upload_with_paramiko
from test_sdnotify import gateway_children
from test_serve_process import ServeProcess

import pg_kit
from conftest import PASSWORDS, free_port, start_gateway, write_config
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from sftpgate.storage.postgres.backend import PostgresBackend

MiB = 1024 * 1024
CHUNK = 32 * 1024


def chunks(total: int, digest: Any) -> Iterator[bytes]:
    """``total`` bytes made as they are sent (never all in memory), fed to ``digest``."""
    block = hashlib.sha256(b"sftpgate").digest() * (CHUNK // 32)
    for n in range(total // CHUNK):
        piece = n.to_bytes(8, "big") + block[8:]
        digest.update(piece)
        yield piece


def login(port: int) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    t = paramiko.Transport(("127.0.0.1", port))
    t.connect(username="alice", password=PASSWORDS["alice"])
    client = paramiko.SFTPClient.from_transport(t)
    assert client is not None
    return t, client


def refused(port: int) -> bool:
    """A new TCP connection to the port is refused outright."""
    with socket.socket() as s:
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def rows(journal: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(journal)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def logged(serve: ServeProcess, text: str) -> bool:
    return any(text in line for line in serve.lines)


@pytest.fixture
def port() -> int:
    return free_port()


def test_sigterm_during_a_200_mib_upload_lets_it_complete_and_refuses_new_connections(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    config = write_config(tmp_path, user_keys)
    journal = tmp_path / "state" / "journal.sqlite3"
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    target = tmp_path / "homes" / "alice" / "big.bin"
    digest = hashlib.sha256()
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            t, client = login(port)
            try:
                with client.open("big.bin", "wb") as f:
                    f.set_pipelined(True)
                    for piece in chunks(200 * MiB, digest):
                        f.write(piece)
            finally:
                t.close()
        except BaseException as exc:
            errors.append(exc)

    uploader = threading.Thread(target=upload)
    try:
        uploader.start()
        wait_for(lambda: target.exists() and target.stat().st_size >= 8 * MiB, 60, "8 MiB")
        serve.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: logged(serve, "no new connections"), 10, "the drain")
        assert refused(port), "a new connection was accepted during the drain"
        assert target.stat().st_size < 200 * MiB, "the upload finished before the signal"
        uploader.join(120)
        assert not uploader.is_alive() and errors == []
        assert serve.proc.wait(60) == 0
    finally:
        serve.stop()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest.hexdigest()
    (upload_row,) = rows(journal, "SELECT * FROM uploads WHERE path LIKE '%big.bin'")
    assert (upload_row["state"], upload_row["bytes"]) == ("complete", 200 * MiB)
    assert logged(serve, "every session ended")


def test_second_sigterm_exits_within_2_s_and_journals_the_open_upload_incomplete(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    config = write_config(tmp_path, user_keys)
    journal = tmp_path / "state" / "journal.sqlite3"
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    t, client = login(port)
    try:
        f = client.open("cut.bin", "wb")
        f.write(b"x" * 100_000)
        f.flush()
        serve.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: logged(serve, "no new connections"), 10, "the drain")
        assert serve.proc.poll() is None  # draining: the session holds it
        client.stat("cut.bin")  # and the session still works
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        code = serve.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        t.close()
        serve.stop()
    assert code == 128 + signal.SIGTERM
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
    assert logged(serve, "stopping at once (second signal)")
    ops = rows(journal, "SELECT op, message FROM operations ORDER BY id")
    if "logout" not in [r["op"] for r in ops]:
        # On a loaded machine a forced stop may not see the session's end in its half
        # second, or the 1.5 s limit cuts the last flush: then the next start's sweep ends
        # the session (journal/sweep.py). Either way nothing is lost.
        again = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
        try:
            wait_for(
                lambda: any(
                    r["op"] == "logout" for r in rows(journal, "SELECT op FROM operations")
                ),
                30,
                "the sweep at start",
            )
        finally:
            assert again.stop() == 0
        ops = rows(journal, "SELECT op, message FROM operations ORDER BY id")
        (logout,) = [r for r in ops if r["op"] == "logout"]
        assert "ended without closing this session" in logout["message"]
    # Nothing durable lost: the login, the cut upload (incomplete, no job) and the logout.
    (upload_row,) = rows(journal, "SELECT * FROM uploads WHERE path LIKE '%cut.bin'")
    assert upload_row["state"] == "incomplete"
    ended = [r["op"] for r in ops if r["op"] in ("login", "disconnect", "logout")]
    assert ended in (["login", "disconnect", "logout"], ["login", "logout"])
    for cut in (r for r in ops if r["op"] == "disconnect"):
        assert cut["message"] == "server stopping: stopping at once (second signal)"


def test_a_session_past_drain_timeout_is_disconnected_and_serve_exits_0(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    config = write_config(tmp_path, user_keys, {"server": {"drain_timeout": 1}})
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    t, client = login(port)
    try:
        client.listdir(".")
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            client.listdir(".")
    finally:
        t.close()
        serve.stop()
    assert logged(serve, "server.drain_timeout (1 s) passed; 1 session cut")
    assert logged(serve, "disconnecting alice from 127.0.0.1")
    journal = tmp_path / "state" / "journal.sqlite3"
    ops = rows(journal, "SELECT op, message FROM operations WHERE op IN ('disconnect', 'logout')")
    assert [r["op"] for r in ops] == ["disconnect", "logout"]
    assert ops[0]["message"] == "server stopping: server.drain_timeout (1 s) passed"


def test_a_connection_still_logging_in_does_not_hold_the_drain(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    """A client that failed a password and sits there is no session: the drain (60 s
    here) ends at once and the connection is cut with the rest."""
    config = write_config(tmp_path, user_keys)
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        with pytest.raises(paramiko.AuthenticationException):
            t.connect(username="alice", password="wrong")
        assert t.is_active()
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0
        assert time.monotonic() - started < 10
    finally:
        t.close()
        serve.stop()
    assert logged(serve, "every session ended")


def test_with_two_processes_every_child_stops_accepting_and_open_sessions_go_on(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    config = write_config(tmp_path, user_keys, {"server": {"processes": 2}})
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    sessions = [login(port) for _ in range(4)]  # SO_REUSEPORT spreads them over both
    try:
        serve.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: sum(logged_n(serve, "no new connections")) >= 2, 15, "both drains")
        for _ in range(5):
            assert refused(port)
        for n, (_, client) in enumerate(sessions):
            with client.open(f"after-{n}.txt", "w") as f:
                f.write("written during the drain")
        assert serve.proc.poll() is None
        for t, _ in sessions:
            t.close()
        assert serve.proc.wait(30) == 0
    finally:
        for t, _ in sessions:
            t.close()
        serve.stop()
    for n in range(4):
        assert (tmp_path / "homes" / "alice" / f"after-{n}.txt").read_text() == (
            "written during the drain"
        )


def test_second_sigterm_to_the_supervisor_stops_it_and_its_children_within_2_s(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    config = write_config(tmp_path, user_keys, {"server": {"processes": 2}})
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    children = gateway_children(serve.proc.pid)
    assert len(children) == 2
    t, client = login(port)
    try:
        client.listdir(".")
        serve.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: sum(logged_n(serve, "no new connections")) >= 2, 15, "both drains")
        assert serve.proc.poll() is None  # the session holds its process's drain
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        code = serve.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        t.close()
        serve.stop()
    assert code == 128 + signal.SIGTERM
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 5, "children")


def logged_n(serve: ServeProcess, text: str) -> list[bool]:
    return [text in line for line in serve.lines]


def test_sigterm_during_a_transcode_releases_the_job_and_a_restart_finishes_it_once(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    smtp = SmtpServer().start()
    # -readrate 1 (lease_config): ffmpeg reads the clip at its own pace, so a 20 s clip
    # keeps it busy (and nearly idle) long enough to be caught mid-run; the restart
    # runs without it.
    config = lease_config(tmp_path, user_keys, smtp.port, workers=1, lease=10)
    journal = tmp_path / "state" / "journal.sqlite3"
    env = {"SFTPGATE_SERVER__PORT": str(port)}
    clip = make_clip(tmp_path / "long.mp4", "mp4", seconds=20)
    serve = ServeProcess(config, env)
    try:
        upload_with_paramiko(port, clip, "long.mp4")
        (job,) = wait_jobs(journal, transcoding(0.05), timeout=60)
        marker, attempts = job["pid_marker"], job["attempts"]
        assert attempts == 1 and processes_with(marker)
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0
    finally:
        serve.stop()
    (job,) = wait_jobs(journal, lambda r: True)
    # Released: queued again, this attempt not counted, no lease, ffmpeg gone.
    assert (job["state"], job["attempts"], job["lease_owner"], job["pid"]) == (
        "queued",
        0,
        None,
        None,
    ), job
    assert processes_with(marker) == []
    assert smtp.inbox.messages == []
    assert logged(serve, f"job {job['id']}: released at shutdown")

    # The restart at full speed: only what happens to the job matters now.
    data = yaml.safe_load(config.read_text())
    data["pipeline"]["input_args"] = []
    config.write_text(yaml.safe_dump(data))
    again = ServeProcess(config, env)
    try:
        (job,) = wait_jobs(journal, settled, timeout=90)
    finally:
        again.stop()
        smtp.stop()
    assert (job["state"], job["outcome"], job["email_state"], job["attempts"]) == (
        "succeeded",
        "converted",
        "sent",
        1,
    ), job
    assert len(smtp.inbox.messages) == 1
    assert (tmp_path / "homes" / "alice" / "converted" / "long.flv").exists()


def test_worker_sigterm_releases_its_job_without_counting_the_attempt(
    tmp_path: Path, user_keys: dict[str, Path], port: int
) -> None:
    smtp = SmtpServer().start()
    config = lease_config(tmp_path, user_keys, smtp.port, workers=1, lease=10)
    data = yaml.safe_load(config.read_text())
    data["jobs"]["workers"] = 0  # serve only journals; the worker process runs the job
    config.write_text(yaml.safe_dump(data))
    worker_config = tmp_path / "worker.yaml"
    data["jobs"]["workers"] = 1
    worker_config.write_text(yaml.safe_dump(data))
    journal = tmp_path / "state" / "journal.sqlite3"
    clip = make_clip(tmp_path / "long.mp4", "mp4", seconds=20)
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    worker = None
    try:
        upload_with_paramiko(port, clip, "long.mp4")
        worker = WorkerProcess(worker_config)
        (job,) = wait_jobs(journal, transcoding(0.05), timeout=60)
        marker = job["pid_marker"]
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0
        (job,) = wait_jobs(journal, lambda r: True)
        assert (job["state"], job["attempts"], job["lease_owner"]) == ("queued", 0, None)
        assert processes_with(marker) == []
        assert "released at shutdown" in worker.log()
    finally:
        if worker is not None:
            worker.kill()
        serve.stop()
        smtp.stop()


@pytest.fixture(scope="module")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


def test_on_postgresql_a_worker_sigterm_releases_its_job_and_another_finishes_it_once(
    pg: pg_kit.PgServer, tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    """Procrastinate's own stop waits for a running job to end (a whole transcode); ours
    cancels it at once: ffmpeg killed, the row released with the attempt not counted and
    handed over again, and the next worker finishes it once."""
    smtp = SmtpServer().start()
    with pg.database() as url:
        backend = PostgresBackend(url, size=2)
        backend.migrate()
        settings = pipeline_settings(smtp.port, input_args=["-readrate", "1"])
        jobs = {**settings["jobs"], "workers": 0, "lease_seconds": 10}
        running = start_gateway(
            tmp_path, user_keys, extra={**settings, "database": {"url": url}, "jobs": jobs}
        )
        data = yaml.safe_load((tmp_path / "config.yaml").read_text())
        data["jobs"]["workers"] = 1
        worker_config = tmp_path / "worker.yaml"
        worker_config.write_text(yaml.safe_dump(data))
        first = WorkerProcess(worker_config)
        second: WorkerProcess | None = None
        try:
            clip = make_clip(tmp_path / "long.mp4", "mp4", seconds=20)
            running.sftp("alice").put(str(clip), "/long.mp4")
            wait_for(lambda: bool(backend.jobs().list()[0].pid_marker), 60, "ffmpeg")
            (job,) = backend.jobs().list()
            marker = job.pid_marker
            assert marker is not None and processes_with(marker) and job.attempts == 1
            started = time.monotonic()
            first.proc.send_signal(signal.SIGTERM)
            assert first.proc.wait(30) == 0
            assert time.monotonic() - started < 10, "the stop waited for the transcode"
            job = backend.jobs().get(job.id)
            assert (job.state.value, job.attempts, job.lease_owner) == ("queued", 0, None)
            assert processes_with(marker) == []
            assert "released at shutdown" in first.log()
            # The rest at full speed: only what happens to the job matters now.
            data["pipeline"]["input_args"] = []
            worker_config.write_text(yaml.safe_dump(data))
            second = WorkerProcess(worker_config)
            wait_for(
                lambda: backend.jobs().get(job.id).state.value not in ("queued", "running"),
                120,
                "the job to end",
            )
            job = backend.jobs().get(job.id)
            assert (job.state.value, job.outcome, job.email_state.value, job.attempts) == (
                "succeeded",
                "converted",
                "sent",
                1,
            ), job
        finally:
            first.kill()
            if second is not None:
                second.stop()
            running.stop()
            backend.close()
            smtp.stop()
    assert len(smtp.inbox.to("alice@example.org")) == 1
