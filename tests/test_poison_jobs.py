"""A poison job never goes round for ever: a job whose worker stops every time it runs it
(killed, out of memory, its host lost) is taken over after each lease expiry only until it
has used ``jobs.max_attempts``; then it is ``dead``, its leftover ffmpeg killed, the admin
told once, and it is never run again. Released attempts (clean stops) never count.

The store's side (both backends) is in tests/test_contract_jobs.py; here the pool's side on
both backends (a real aiosmtpd, a real leftover process) and real `sftpgate worker`
processes SIGKILLed mid-transcode."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from test_leases import WorkerProcess, converted_rows, held_by, lease_config, one_row
from test_pipeline_durability import processes_with, upload_with_paramiko
from test_postgres_procrastinate import _CHILD, until
from test_serve_process import start_serve, stop_serve

import pg_kit
from conftest import free_port, write_config
from contract_kit import BACKENDS, fresh_backend, opened, session, upload
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # the fixture
from sftpgate.config import load_config
from sftpgate.jobs.model import EmailState, JobState
from sftpgate.jobs.worker import WorkerPool
from sftpgate.storage.ports import Backend, JobSpec
from sftpgate.storage.postgres.backend import PostgresBackend
from sftpgate.storage.postgres.queue import JobQueue, queueing_lock

ADMIN = "admin@example.org"


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from fresh_backend(request, tmp_path)


def _wait(condition: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_racing_pools_bury_a_poison_job_once_kill_its_leftover_and_tell_the_admin_once(
    backend: Backend, tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    extra = pipeline_settings(smtp.port)
    extra["email"] = {"admin": ADMIN}
    config = load_config(write_config(tmp_path, user_keys, extra))
    with opened(backend.journal()) as journal:
        (job_id,) = journal.record_batch(
            [upload(session("s1", "alice"), "/poison.mp4", time.time())],
            lambda path, event: JobSpec(max_attempts=2),
        ).jobs
    marker = f"ffmpeg:sftpgate-job-{job_id}-{secrets.token_hex(4)}"
    # A real leftover (it leads its own group, as ffmpeg does): the last worker's "ffmpeg".
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", marker], start_new_session=True
    )
    try:
        with opened(backend.jobs()) as one, opened(backend.jobs()) as other:
            pools = [WorkerPool(config, one), WorkerPool(config, other)]  # type: ignore[arg-type]
            first = one.lease("host:101:aa/0", -1)  # its worker killed: the lease ran out
            assert first is not None and first.attempts == 1
            owner = "host:202:bb/0"
            last = other.lease(owner, -1)  # taken over, and that worker killed too
            assert last is not None and (last.id, last.attempts) == (job_id, 2)
            # It died while sending the user's email, with its ffmpeg running.
            assert one.reserve_email(last, owner, limit=10, window=3600, now=time.time())
            one.set_pid(job_id, owner, leftover.pid, marker)

            async def race() -> list[list[Any]]:
                return await asyncio.gather(*(pool.bury_abandoned() for pool in pools))

            found = asyncio.run(race())
            assert [job.id for jobs in found for job in jobs] == [job_id]
            assert leftover.wait(10) == -signal.SIGKILL
            dead = one.get(job_id)
            assert (dead.state, dead.attempts, dead.lease_owner, dead.pid) == (
                JobState.DEAD,
                2,
                None,
                None,
            )
            # Never resent to the user: it may have gone out.
            assert dead.email_state is EmailState.UNCERTAIN
            assert dead.last_error is not None
            assert "stopped without finishing it 2 times" in dead.last_error
            assert "last on host, pid 202" in dead.last_error
            (message,) = smtp.inbox.messages  # sent before bury_abandoned returned
            assert message["To"] == ADMIN
            body = message.get_body(("plain",)).get_content()
            assert "/poison.mp4" in body and "stopped without finishing it" in body
            # Later rounds find nothing: no second email, never leased again.
            assert asyncio.run(race()) == [[], []]
            assert one.lease("w", 60) is None and other.lease("w", 60) is None
            assert len(smtp.inbox.messages) == 1
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_a_worker_sigkilled_mid_job_every_time_leaves_the_job_dead_with_one_admin_email(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    smtp = SmtpServer().start()
    config = lease_config(tmp_path, user_keys, smtp.port, workers=1, lease=4)
    data = yaml.safe_load(config.read_text())
    data["jobs"]["max_attempts"] = 2
    data["email"] = {"admin": ADMIN}
    config.write_text(yaml.safe_dump(data))
    serve_config = tmp_path / "serve.yaml"
    data["jobs"]["workers"] = 0  # the gateway only journals; `sftpgate worker` runs jobs
    serve_config.write_text(yaml.safe_dump(data))
    port = free_port()
    journal = tmp_path / "state" / "journal.sqlite3"
    serve = start_serve(serve_config, {"SFTPGATE_SERVER__PORT": str(port)})
    workers: list[WorkerProcess] = []
    try:
        upload_with_paramiko(port, make_clip(tmp_path / "slow.mp4", "mp4", seconds=8), "p.mp4")
        markers: list[str] = []
        for _ in range(2):  # both attempts: each worker SIGKILLed while its ffmpeg runs
            worker = WorkerProcess(config)
            workers.append(worker)

            def running_here(rows: list[dict[str, Any]], worker: WorkerProcess = worker) -> bool:
                return (
                    held_by(worker.id)(rows)
                    and rows[0]["pid"] is not None
                    and rows[0]["pid_marker"] not in markers
                )

            (job,) = wait_jobs(journal, running_here, timeout=60)
            markers.append(job["pid_marker"])
            worker.kill()
        assert job["attempts"] == 2
        # The next worker proves the last one dead (this host), and buries its job.
        last = WorkerProcess(config)
        workers.append(last)
        (job,) = wait_jobs(journal, settled, timeout=60)
        assert (job["state"], job["attempts"], job["lease_owner"]) == ("dead", 2, None), job
        assert "stopped without finishing it 2 times" in job["last_error"]
        _wait(lambda: len(smtp.inbox.messages) >= 1)
        _wait(lambda: not any(processes_with(m) for m in markers))  # no leftover ffmpeg
        assert last.stop() == 0  # and it waited for nothing more
        (message,) = smtp.inbox.messages
        assert message["To"] == ADMIN
        assert "/p.mp4" in message.get_body(("plain",)).get_content()
        (job,) = wait_jobs(journal, lambda rows: True)
        assert (job["state"], job["attempts"]) == ("dead", 2)  # never run again
        assert converted_rows(journal) == 0
        assert "is dead" in last.log() and "attempt 3" not in last.log()
        assert one_row(journal, "SELECT count(*) FROM jobs WHERE state != 'dead'")[0] == 0
    finally:
        for worker in workers:
            worker.kill()
        stop_serve(serve)
        smtp.stop()


def test_on_procrastinate_a_poison_job_is_not_retried_again_and_ends_dead(
    request: pytest.FixtureRequest, tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    extra = pipeline_settings(smtp.port)
    extra["email"] = {"admin": ADMIN}
    config = load_config(write_config(tmp_path, user_keys, extra))
    server = pg_kit.session_server(request.config)
    with server.database() as url:
        backend = PostgresBackend(url, size=4)
        backend.migrate()
        store: Any = backend.jobs()
        with opened(backend.journal()) as journal:
            (job_id,) = journal.record_batch(
                [upload(session("s1", "alice"), "/poison.mp4", time.time())],
                lambda path, event: JobSpec(max_attempts=2),
            ).jobs

        def statuses() -> list[str]:
            with psycopg.connect(url) as conn:
                rows = conn.execute(
                    "SELECT status FROM procrastinate_jobs WHERE queueing_lock = %s"
                    " OR args->>'job_id' = %s ORDER BY id",
                    (queueing_lock(job_id), str(job_id)),
                ).fetchall()
            return [str(row[0]) for row in rows]

        async def killed_while_running(queue: JobQueue, attempt: int) -> None:
            """A Procrastinate worker process takes the job, and is SIGKILLed holding it."""
            child = subprocess.Popen([sys.executable, "-c", _CHILD, url])
            try:
                await until(
                    lambda: (
                        (job := store.get(job_id)).attempts == attempt
                        and job.state is JobState.RUNNING
                        and (job.lease_owner or "").startswith(f"child:{child.pid}:")
                    )
                )
            finally:
                child.kill()
                child.wait(30)
            # As Procrastinate's prune_stalled_workers would: the dead worker's row goes.
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DELETE FROM procrastinate_workers")
            await until(lambda: (store.get(job_id).lease_expires_at or 0) < time.time())

        async def scenario() -> None:
            never: list[int] = []

            async def runner(job: Any, owner: str) -> None:
                never.append(job.id)

            # No grace: a job whose Procrastinate job ended would be handed over at once.
            queue = JobQueue(
                url, store, runner, node="n1", lease_seconds=30, stalled_after=0, hand_over_grace=0
            )
            await queue.open()
            try:
                assert await queue.hand_over() == [job_id]
                await killed_while_running(queue, 1)
                assert len(await queue.retry_stalled()) == 1  # an attempt left: run again
                await killed_while_running(queue, 2)
                # Out of attempts: Procrastinate's job is ended, not retried; nothing is
                # handed over again.
                assert await queue.retry_stalled() == []
                assert statuses() == ["failed"]
                await queue.sweep()
                assert statuses() == ["failed"]
                assert store.lease_job(job_id, "w/pq0", 30) is None
                # The pool's keepalive buries it, and tells the admin once.
                pool = WorkerPool(config, store)
                (dead,) = await pool.bury_abandoned()
                assert await pool.bury_abandoned() == []
                assert (dead.id, dead.state, dead.attempts) == (job_id, JobState.DEAD, 2)
                await queue.sweep()
                assert statuses() == ["failed"]
            finally:
                await queue.close()
            assert never == []

        try:
            asyncio.run(scenario())
            assert "stopped without finishing it 2 times" in (store.get(job_id).last_error or "")
            assert [m["To"] for m in smtp.inbox.messages] == [ADMIN]
        finally:
            store.close()
            backend.close()
