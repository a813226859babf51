"""``metrics.listen``: a real ``sftpgate serve`` process scraped over real HTTP while real
paramiko sessions log in (and fail to), upload and download, and the pipeline runs jobs that
email a real aiosmtpd; ``/readyz`` follows SMTP down and back; the listener refuses what an
operations port must refuse. Once more with ``server.processes: 2``: one listener sums every
process, and a killed gateway's sessions stop counting."""

from __future__ import annotations

import http.client
import io
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paramiko
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_process import ServeProcess

from conftest import PASSWORDS, free_port, write_config
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp

T = TypeVar("T")

# Every family /metrics must show from the first scrape (names as the parser gives them).
FAMILIES = {
    "sftpgate_sessions_active",
    "sftpgate_sessions",
    "sftpgate_logins",
    "sftpgate_received_bytes",
    "sftpgate_sent_bytes",
    "sftpgate_uploads",
    "sftpgate_operations",
    "sftpgate_journal_batch_records",
    "sftpgate_journal_commit_duration_seconds",
    "sftpgate_journal_commit_failures",
    "sftpgate_journal_writable",
    "sftpgate_job_outcomes",
    "sftpgate_pipeline_step_duration_seconds",
    "sftpgate_emails",
    "sftpgate_jobs_queued",
    "sftpgate_jobs_running",
    "sftpgate_jobs_oldest_queued_age_seconds",
    "sftpgate_bans_active",
    "sftpgate_storage_up",
    "sftpgate_process_cpu_seconds",
    "sftpgate_process_resident_memory_bytes",
    "process_cpu_seconds",
    "process_resident_memory_bytes",
}
LOGIN_LINE = re.compile(r"\[(\d+)\] sftpgate\.frontdoor\.ssh: .*\blogin alice from")


class Scrape:
    """One /metrics answer, parsed by prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        found = [
            s.value
            for family in self.families.values()
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert found, f"no sample {name}{labels} in:\n{self.text}"
        return sum(found)


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> Scrape:
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    return Scrape(body)


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    """Poll ``probe`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"never: {what} (last: {last!r})")


def login(port: int, password: str = PASSWORDS["alice"]) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.connect(username="alice", password=password)
    except BaseException:
        t.close()
        raise
    return t


def failed_login(port: int) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        login(port, "not-her-password")


def sftp_of(t: paramiko.Transport) -> paramiko.SFTPClient:
    client = paramiko.SFTPClient.from_transport(t)
    assert client is not None
    return client


def _answers(port: int) -> bool:
    try:
        return http_get(port, "/healthz")[0] == 200
    except OSError:  # refused: no place yet
        return False


def ready(port: int) -> tuple[int, str]:
    return http_get(port, "/readyz")


def test_serve_metrics_move_with_sessions_uploads_and_jobs_and_readyz_follows_smtp(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    extra = pipeline_settings(smtp.port)
    metrics_port = free_port()
    extra["metrics"] = {"listen": f"127.0.0.1:{metrics_port}", "request_timeout": 1}
    config = write_config(tmp_path, user_keys, extra)
    journal = tmp_path / "state" / "journal.sqlite3"
    clip = make_clip(tmp_path / "holiday-secret.mp4", "mp4", seconds=1, size="160x120")
    other = make_clip(tmp_path / "second-secret.mp4", "mp4", seconds=1, size="176x144")
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    try:
        assert http_get(metrics_port, "/healthz") == (200, "ok\n")
        status, body = ready(metrics_port)
        assert status == 200 and body.startswith("ready\n"), body
        assert "accepting: ok" in body and "journal: ok" in body and "smtp: ok" in body, body
        first = scrape(metrics_port)
        assert set(first.families) >= FAMILIES, FAMILIES - set(first.families)
        assert first.value("sftpgate_storage_up") == 1
        assert first.value("sftpgate_process_cpu_seconds_total", process="serve") > 0

        failed_login(port)
        # bob offers carol's key: refused, and he leaves: one failed publickey login.
        wrong_key = paramiko.Ed25519Key.from_private_key_file(str(user_keys["carol"]))
        with (
            paramiko.Transport(("127.0.0.1", port)) as refused,
            pytest.raises(paramiko.AuthenticationException),
        ):
            refused.connect(username="bob", pkey=wrong_key)
        t = login(port)
        client = sftp_of(t)
        client.put(str(clip), "holiday-secret.mp4")
        with client.open("holiday-secret.mp4", "rb") as f:
            assert len(f.read()) == clip.stat().st_size
        # While the session is open, it is active.
        wait_until(
            lambda: scrape(metrics_port).value("sftpgate_sessions_active") == 1, "a session active"
        )
        t.close()
        wait_jobs(journal, settled)
        wait_until(lambda: len(smtp.inbox.messages) == 1, "one email")
        second = wait_until(
            lambda: (
                s
                if (s := scrape(metrics_port)).value("sftpgate_emails_total", result="sent") == 1
                and s.value("sftpgate_sessions_active") == 0
                # The database's numbers are read at most once a second: wait out a stale one.
                and s.value("sftpgate_jobs_queued") == 0
                else None
            ),
            "the email and the logout counted, the queue read after the job",
        )
        size = clip.stat().st_size
        assert second.value("sftpgate_sessions_total") == 1
        assert second.value("sftpgate_logins_total", method="password", result="ok") == 1
        assert second.value("sftpgate_logins_total", method="password", result="failed") == 1
        assert second.value("sftpgate_logins_total", method="publickey", result="failed") == 1
        assert second.value("sftpgate_logins_total", method="publickey", result="ok") == 0
        assert second.value("sftpgate_received_bytes_total") == size
        assert second.value("sftpgate_sent_bytes_total") == size
        assert second.value("sftpgate_uploads_total", state="complete") == 1
        assert second.value("sftpgate_operations_total", op="close", status="ok") == 2
        assert second.value("sftpgate_operations_total", op="login_failed") == 2
        assert second.value("sftpgate_journal_batch_records_count") > first.value(
            "sftpgate_journal_batch_records_count"
        )
        assert second.value("sftpgate_journal_batch_records_sum") >= 5  # login ... logout
        assert second.value("sftpgate_journal_commit_duration_seconds_count") > 0
        assert second.value("sftpgate_journal_writable") == 1
        assert second.value("sftpgate_job_outcomes_total", outcome="succeeded") == 1
        for step in ("probe", "transcode", "sidecar", "email"):
            assert (
                second.value(
                    "sftpgate_pipeline_step_duration_seconds_count", step=step, result="ok"
                )
                == 1
            ), step
        assert second.value("sftpgate_jobs_queued") == 0
        assert second.value("sftpgate_jobs_oldest_queued_age_seconds") == 0
        assert second.value("sftpgate_bans_active") == 0
        assert second.value("process_cpu_seconds_total") > first.value("process_cpu_seconds_total")
        # A login or a file name is never a label: a client cannot mint series.
        for text in (first.text, second.text):
            assert "alice" not in text and "secret" not in text and "127.0.0.1" not in text

        # SMTP down: the next job's email fails, /readyz says so; back up: ready again.
        smtp.stop()
        t = login(port)
        sftp_of(t).put(str(other), "second-secret.mp4")
        t.close()
        status, body = wait_until(
            lambda: (r := ready(metrics_port))[0] == 503 and r, "503 while SMTP is down"
        )
        assert "smtp: FAIL" in body and "journal: ok" in body and "workers: ok" in body, body
        assert "alice" not in body
        down = scrape(metrics_port)
        assert down.value("sftpgate_emails_total", result="transient_failure") >= 1
        assert down.value("sftpgate_job_outcomes_total", outcome="retried") >= 1
        smtp.start()
        status, body = wait_until(lambda: (r := ready(metrics_port))[0] == 200 and r, "ready")
        assert "smtp: ok: last email sent" in body, body
        wait_until(lambda: len(smtp.inbox.messages) == 2, "the retried email")
        assert scrape(metrics_port).value("sftpgate_job_outcomes_total", outcome="succeeded") == 2

        # An operations port, still hostile input.
        assert http_get(metrics_port, "/metrics", "POST")[0] == 405
        assert http_get(metrics_port, "/metrics", "DELETE")[0] == 405
        assert http_get(metrics_port, "/")[0] == 404
        assert http_get(metrics_port, "/../../etc/passwd")[0] == 404
        assert http_get(metrics_port, "/metrics/")[0] == 404
        status, _ = http_get(metrics_port, "/metrics", "HEAD")
        assert status == 200
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=30) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
            started = time.monotonic()
            assert slow.recv(100) == b""  # closed by the server, not by our timeout
            assert time.monotonic() - started < 10
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=30) as huge:
            huge.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
            answer = huge.recv(200)
            assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer
            assert b"Traceback" not in answer

        # SIGTERM with a session open: the drain takes no one new, and /readyz says so
        # (a balancer asking it sends no one here) while /healthz still answers.
        t = login(port)
        serve.proc.send_signal(signal.SIGTERM)
        status, body = wait_until(
            lambda: (r := ready(metrics_port))[0] == 503 and r, "not ready while draining"
        )
        assert "accepting: FAIL: draining" in body, body
        assert http_get(metrics_port, "/healthz") == (200, "ok\n")
        t.close()
        assert serve.proc.wait(60) == 0, "".join(serve.lines)[-3000:]
    finally:
        serve.stop()  # after an exit: only reaps it and closes its pipe


def test_two_processes_one_listener_sums_them_and_forgets_a_killed_ones_sessions(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    extra = pipeline_settings(smtp.port)
    extra["server"] = {"processes": 2}
    metrics_port = free_port()
    extra["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    config = write_config(tmp_path, user_keys, extra)
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    sessions: list[paramiko.Transport] = []
    try:
        wait_until(lambda: any("(2 processes)" in line for line in serve.lines), "two processes up")
        folder = tmp_path / "state" / "metrics"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        status, body = ready(metrics_port)
        assert status == 200 and "gateways: ok: 2 of 2" in body, body
        first = scrape(metrics_port)
        assert set(first.families) >= FAMILIES, FAMILIES - set(first.families)
        for name in ("supervisor", "gateway-0", "gateway-1"):
            assert first.value("sftpgate_process_resident_memory_bytes", process=name) > 0

        failed_login(port)
        # Sessions until both gateway processes hold some (the kernel spreads them).
        while True:
            t = login(port)
            sessions.append(t)
            data = f"not a video {len(sessions)}\n".encode() * 50
            sftp_of(t).putfo(io.BytesIO(data), f"v{len(sessions)}.mp4")
            pids = [m.group(1) for line in serve.lines if (m := LOGIN_LINE.search(line))]
            if len(sessions) >= 4 and len(set(pids)) == 2 and len(pids) == len(sessions):
                break
            assert len(sessions) < 40, "one process took every session"
        count = len(sessions)
        both = wait_until(
            lambda: (
                s
                if (s := scrape(metrics_port)).value("sftpgate_sessions_active") == count
                else None
            ),
            f"{count} sessions active, summed over both processes",
        )
        assert both.value("sftpgate_logins_total", method="password", result="failed") == 1
        rows = wait_jobs(tmp_path / "state" / "journal.sqlite3", lambda r: settled(r, count))
        assert all(r["outcome"] == "rejected" for r in rows)
        jobs = wait_until(
            lambda: (
                s
                if (s := scrape(metrics_port)).value(
                    "sftpgate_job_outcomes_total", outcome="succeeded"
                )
                == count
                else None
            ),
            "every job counted by the supervisor's workers",
        )
        assert jobs.value("sftpgate_uploads_total", state="complete") == count
        assert jobs.value("sftpgate_emails_total", result="sent") >= 1
        # The supervisor runs workers but no journal writer: the least over the writers is 1.
        status, body = ready(metrics_port)
        assert status == 200 and "journal: ok" in body, body
        assert jobs.value("sftpgate_pipeline_step_duration_seconds_count", step="probe") == count

        # SIGKILL the process holding the first session: its sessions stop counting as
        # active (its live gauge is dropped), its counters stay.
        victim = int(pids[0])
        lost = pids.count(pids[0])
        os.kill(victim, signal.SIGKILL)
        after = wait_until(
            lambda: (
                s
                if (s := scrape(metrics_port)).value("sftpgate_sessions_active") == count - lost
                else None
            ),
            "the killed process's sessions dropped",
        )
        assert after.value("sftpgate_sessions_total") == count
        assert after.value("sftpgate_logins_total", method="password", result="ok") == count
        wait_until(lambda: "gateways: ok: 2 of 2" in ready(metrics_port)[1], "restarted")
        for t in sessions:
            t.close()
        wait_until(
            lambda: scrape(metrics_port).value("sftpgate_sessions_active") == 0, "all logged out"
        )
        assert "alice" not in scrape(metrics_port).text
    finally:
        for t in sessions:
            t.close()
        assert serve.stop() == 0, "".join(serve.lines)[-3000:]


def test_hostile_event_values_never_become_labels() -> None:
    """A tap's record (a user's process writes it) may hold anything: label values stay in
    their closed sets, a malformed record is not counted, a byte count must be one."""
    from sftpgate import metrics
    from sftpgate.events import Event, Op, SessionInfo

    metrics.configure(None)
    who = SessionInfo("s", "192.0.2.1", 22, login="alice", auth_method="x" * 300)
    metrics.record_events(
        [
            Event(Op.LOGIN_FAILED, who, status="permission_denied"),
            Event(Op.CLOSE, who, path="/etc/passwd", status="evil\nlabel", bytes_written=-5),
            Event(Op.CLOSE, who, bytes_written=2**63, bytes_read=7),
            Event("rm -rf", who),  # type: ignore[arg-type]  # not an Op: not counted
            Event(Op.STAT, who, status=["unhashable"]),  # type: ignore[arg-type]
        ]
    )
    text = metrics.Exposition().render().decode()
    got = Scrape(text)
    assert got.value("sftpgate_logins_total", method="other", result="failed") == 1
    assert got.value("sftpgate_operations_total", op="close", status="other") == 1
    assert got.value("sftpgate_operations_total", op="close", status="ok") == 1
    assert got.value("sftpgate_operations_total", op="stat", status="other") == 1
    assert got.value("sftpgate_received_bytes_total") == 0
    assert got.value("sftpgate_sent_bytes_total") == 7
    assert "alice" not in text and "passwd" not in text and "evil" not in text
    assert "rm -rf" not in text and "xxx" not in text


def test_a_worker_serves_its_own_numbers_on_worker_listen_beside_a_gateway(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    """One config, two roles on one host: serve on metrics.listen, worker on worker_listen."""
    from test_leases import WorkerProcess

    extra = pipeline_settings(smtp.port)
    serve_port, worker_port = free_port(), free_port()
    extra["metrics"] = {
        "listen": f"127.0.0.1:{serve_port}",
        "worker_listen": f"127.0.0.1:{worker_port}",
    }
    config = write_config(tmp_path, user_keys, extra)
    port = free_port()
    # The gateway runs no workers here: the worker process takes every job.
    serve = ServeProcess(
        config, {"SFTPGATE_SERVER__PORT": str(port), "SFTPGATE_JOBS__WORKERS": "0"}
    )
    worker = WorkerProcess(config)
    try:
        t = login(port)
        sftp_of(t).putfo(io.BytesIO(b"not a video\n" * 100), "fake.mp4")
        t.close()
        wait_jobs(tmp_path / "state" / "journal.sqlite3", settled)
        done = wait_until(
            lambda: (
                s
                if (s := scrape(worker_port)).value("sftpgate_emails_total", result="sent") == 1
                else None
            ),
            "the worker's email counted",
        )
        assert done.value("sftpgate_job_outcomes_total", outcome="succeeded") == 1
        assert done.value("sftpgate_pipeline_step_duration_seconds_count", step="probe") == 1
        assert done.value("sftpgate_jobs_queued") == 0
        assert done.value("sftpgate_process_cpu_seconds_total", process="worker") > 0
        assert "sftpgate_bans_active" not in done.families  # a gateway's number, not a worker's
        status, body = ready(worker_port)
        assert status == 200 and "workers: ok: running" in body and "journal" not in body, body
        gateway = scrape(serve_port)
        assert gateway.value("sftpgate_sessions_total") == 1
        assert gateway.value("sftpgate_uploads_total", state="complete") == 1
        assert gateway.value("sftpgate_job_outcomes_total", outcome="succeeded") == 0
        status, body = ready(serve_port)
        assert status == 200 and "workers: ok: none run in this process" in body, body
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        assert serve.stop() == 0, "".join(serve.lines)[-3000:]


def test_queue_and_bans_are_read_through_the_postgresql_ports(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    """On PostgreSQL the scrape reads the queue and the bans there (every node's): a job
    waiting with no worker anywhere, and a ban another gateway wrote."""
    import pg_kit
    from conftest import start_gateway
    from sftpgate.defender import Ban
    from sftpgate.storage.postgres.backend import PostgresBackend

    metrics_port = free_port()
    with pg_kit.shared_server() as pg, pg.database() as url:
        backend = PostgresBackend(url, size=2)
        backend.migrate()
        running = None
        try:
            # Jobs are handed over to Procrastinate, and no worker runs anywhere: they wait.
            running = start_gateway(
                tmp_path,
                user_keys,
                extra={
                    "database": {"url": url},
                    "pipeline": {"enabled": True},
                    "jobs": {"workers": 0},
                    "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
                },
            )
            now = time.time()
            bans = backend.bans()
            bans.upsert([Ban("198.51.100.7", now + 3600, 1, "another gateway's", now)])
            bans.close()
            sftp = running.sftp("alice")
            sftp.putfo(io.BytesIO(b"waiting\n" * 100), "waits.mp4")
            got = wait_until(
                lambda: s if (s := scrape(metrics_port)).value("sftpgate_jobs_queued") else None,
                "the queued job seen",
            )
            assert got.value("sftpgate_storage_up") == 1
            assert got.value("sftpgate_jobs_queued") == 1
            assert got.value("sftpgate_jobs_running") == 0
            assert got.value("sftpgate_bans_active") == 1
            waited = wait_until(
                lambda: (
                    s
                    if (s := scrape(metrics_port)).value("sftpgate_jobs_oldest_queued_age_seconds")
                    >= 1.5
                    else None
                ),
                "the oldest job's age grows",
            )
            assert waited.value("sftpgate_jobs_oldest_queued_age_seconds") < 120
            assert "198.51.100.7" not in waited.text
            status, body = ready(metrics_port)
            assert status == 200 and "workers: ok: none run in this process" in body, body
        finally:
            if running is not None:
                running.stop()
            backend.close()


def test_the_listener_caps_its_connections_and_a_closed_one_frees_a_place() -> None:
    from conftest import LoopThread
    from sftpgate import metrics
    from sftpgate.metrics_http import MAX_CONNECTIONS, MetricsServer

    loop = LoopThread()
    server = MetricsServer("127.0.0.1:0", metrics.Exposition(), {}, idle_limit=60)
    loop.run(server.start())
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        # Each is accepted (and counted) before the next: one request through the last.
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[-1].recv(100).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as extra:
            assert extra.recv(100) == b""  # over the cap: closed at once
        held.pop(0).close()
        wait_until(lambda: _answers(server.port), "a place freed by a close (within a second)")
    finally:
        for sock in held:
            sock.close()
        loop.run(server.stop())
        loop.close()


@pytest.mark.parametrize("address", ["9222", "host:", ":9222", "host:99999", "host:port", "a:-1"])
def test_a_metrics_address_that_is_not_host_port_is_refused_naming_the_key(
    tmp_path: Path, user_keys: dict[str, Path], address: str
) -> None:
    from sftpgate.config import load_config
    from sftpgate.errors import ConfigError

    config = write_config(tmp_path, user_keys, {"metrics": {"worker_listen": address}})
    with pytest.raises(
        ConfigError, match=r"config\.yaml: metrics\.worker_listen: must be host:port"
    ):
        load_config(config, environ={})


def test_readyz_fails_while_the_journal_disk_is_full_and_recovers_when_it_has_room(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    """A real full disk (a small tmpfs) under the journal of a real serve process."""
    from conftest import fill, small_disk

    metrics_port = free_port()
    with small_disk(tmp_path / "disk", "8m") as disk:
        extra = {
            "journal": {"path": str(disk / "journal.sqlite3"), "synchronous": "normal"},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        }
        config = write_config(tmp_path, user_keys, extra)
        port = free_port()
        serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
        try:
            assert ready(metrics_port)[0] == 200
            filler = fill(disk)
            t = login(port)  # its records cannot be committed now
            _, body = wait_until(
                lambda: (r := ready(metrics_port))[0] == 503 and r, "not ready on a full disk"
            )
            assert "journal: FAIL: a journal writer's last commit failed" in body, body
            full = scrape(metrics_port)
            assert full.value("sftpgate_journal_writable") == 0
            assert full.value("sftpgate_journal_commit_failures_total") >= 1
            filler.unlink()  # room again: the writer's next retry commits
            wait_until(lambda: ready(metrics_port)[0] == 200, "ready once it has room", 60)
            t.close()
            wait_until(
                lambda: scrape(metrics_port).value("sftpgate_sessions_total") == 1,
                "the held-back login counted once committed",
            )
        finally:
            assert serve.stop() == 0, "".join(serve.lines)[-3000:]
