"""Procrastinate runs the jobs on a real PostgreSQL: the outbox hands a job over once however
often it is swept, a real Procrastinate worker runs it, and a worker SIGKILLed mid-job has its
job retried through the stalled-job sweep only once our own lease has expired."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import pg_kit
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.jobs.model import Job, JobState
from sftpgate.storage.ports import JobSpec
from sftpgate.storage.postgres.backend import PostgresBackend
from sftpgate.storage.postgres.jobs import PgJobStore
from sftpgate.storage.postgres.queue import JobQueue, queueing_lock


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


@pytest.fixture
def db(pg: pg_kit.PgServer) -> Iterator[tuple[str, PostgresBackend]]:
    with pg.database() as url:
        b = PostgresBackend(url, size=8)
        b.migrate()
        try:
            yield url, b
        finally:
            b.close()


def upload(backend: PostgresBackend, name: str = "/a.mp4") -> int:
    s = SessionInfo(id="s1", remote_addr="192.0.2.1", remote_port=1, login="alice")
    event = Event(Op.CLOSE, s, path=name, bytes_written=1, upload=UploadState.COMPLETE)
    rule = lambda path, e: JobSpec(max_attempts=3)  # noqa: E731
    return backend.journal().record_batch([event], rule).jobs[0]


def procrastinate_jobs(url: str, job_id: int) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT id, status FROM procrastinate_jobs WHERE queueing_lock = %s ORDER BY id",
            (queueing_lock(job_id),),
        ).fetchall()


async def until(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)  # polling a condition, bounded by the deadline


def finishing_runner(store: PgJobStore, calls: list[int]) -> Callable[[Job, str], Any]:
    async def run(job: Job, owner: str) -> None:
        calls.append(job.id)
        assert await asyncio.to_thread(store.heartbeat, job.id, owner, 30, progress=0.5)
        await asyncio.to_thread(store.finish, job, owner, JobState.SUCCEEDED)

    return run


def test_a_hand_over_cut_off_after_its_claim_is_handed_over_again_once(
    db: tuple[str, PostgresBackend],
) -> None:
    url, backend = db
    store: Any = backend.jobs()
    job_id = upload(backend)

    async def scenario() -> None:
        queue = JobQueue(
            url,
            store,
            finishing_runner(store, []),
            node="n1",
            lease_seconds=30,
            hand_over_grace=0,
        )
        await queue.open()
        try:
            # A hand-over claims the row, then its process dies before Procrastinate has the
            # job: the first half of the real code path, run on its own.
            assert [row[0] for row in store.to_hand_over(time.time())] == [job_id]
            assert procrastinate_jobs(url, job_id) == []
            # The next hand-over (a sweep) finds the claim stale, with nothing in
            # Procrastinate for it, and hands it over.
            assert await queue.hand_over() == [job_id]
            assert await queue.hand_over() == []  # it waits in Procrastinate now: done
        finally:
            await queue.close()

    asyncio.run(scenario())
    assert [status for _, status in procrastinate_jobs(url, job_id)] == ["todo"]


def test_gateways_handing_over_at_once_hand_each_job_over_once(
    db: tuple[str, PostgresBackend],
) -> None:
    url, backend = db
    store: Any = backend.jobs()
    ids = [upload(backend, f"/{n}.mp4") for n in range(20)]

    async def scenario() -> list[int]:
        queues = [
            JobQueue(url, store, finishing_runner(store, []), node=f"g{n}", lease_seconds=30)
            for n in range(4)
        ]
        for queue in queues:
            await queue.open()
        try:
            handed = await asyncio.gather(*(q.hand_over() for q in queues))
        finally:
            for queue in queues:
                await queue.close()
        return [job for batch in handed for job in batch]

    assert sorted(asyncio.run(scenario())) == ids
    for job_id in ids:
        assert [status for _, status in procrastinate_jobs(url, job_id)] == ["todo"]


def test_a_procrastinate_worker_runs_the_job_once_even_when_handed_twice(
    db: tuple[str, PostgresBackend],
) -> None:
    url, backend = db
    store: Any = backend.jobs()
    job_id = upload(backend)
    calls: list[int] = []

    async def scenario() -> None:
        queue = JobQueue(url, store, finishing_runner(store, calls), node="n1", lease_seconds=30)
        await queue.open()
        worker = asyncio.create_task(queue.run_worker(2, fetch_job_polling_interval=0.1))
        try:
            assert await queue.hand_over() == [job_id]
            await until(lambda: store.get(job_id).state is JobState.SUCCEEDED)
            # A second Procrastinate job for the same row (no lock: as if handed again after
            # the first started): it finds the job finished and does nothing.
            await queue.run_task.defer_async(job_id=job_id)
            await until(
                lambda: all(status == "succeeded" for _, status in _all_jobs(url)), seconds=30
            )
        finally:
            worker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await worker
            await queue.close()

    asyncio.run(scenario())
    assert calls == [job_id]
    assert store.get(job_id).attempts == 1


def _all_jobs(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT id, status FROM procrastinate_jobs WHERE task_name = 'sftpgate.run_job'"
        ).fetchall()


# A worker process whose runner holds the job and heartbeats our lease every 0.2 s (as the
# pipeline's runner does while ffmpeg runs) until it is SIGKILLed.
_CHILD = """
import asyncio, sys
from sftpgate.storage.postgres.backend import PostgresBackend
from sftpgate.storage.postgres.queue import JobQueue

url = sys.argv[1]
store = PostgresBackend(url, size=4).jobs()

async def run(job, owner):
    while await asyncio.to_thread(store.heartbeat, job.id, owner, 1.0):
        await asyncio.sleep(0.2)

async def main():
    queue = JobQueue(url, store, run, node="child", lease_seconds=1.0)
    await queue.open()
    await queue.run_worker(1, fetch_job_polling_interval=0.1, update_heartbeat_interval=0.2)

asyncio.run(main())
"""


def test_a_sigkilled_workers_job_is_retried_only_after_our_lease_expires(
    db: tuple[str, PostgresBackend], tmp_path: Any
) -> None:
    url, backend = db
    store: Any = backend.jobs()
    job_id = upload(backend)
    calls: list[int] = []

    async def scenario() -> None:
        queue = JobQueue(
            url,
            store,
            finishing_runner(store, calls),
            node="n1",
            lease_seconds=30,
            stalled_after=0.5,
        )
        await queue.open()
        child = subprocess.Popen([sys.executable, "-c", _CHILD, url], cwd=os.getcwd())
        try:
            await queue.hand_over()
            await until(lambda: store.get(job_id).state is JobState.RUNNING)
            # Procrastinate is told the worker went quiet (its heartbeat row made an hour old),
            # but our lease is alive: never retried while its runner heartbeats (#702).
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
                )
            stalled = await queue.app.job_manager.get_stalled_jobs(queue="sftpgate")
            assert [j.task_kwargs for j in stalled] == [{"job_id": job_id}]
            assert await queue.retry_stalled() == []
            assert store.get(job_id).state is JobState.RUNNING
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
            # As Procrastinate's prune_stalled_workers would: the dead worker's row goes (the
            # case of issue #1518); the sweep still finds its job.
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DELETE FROM procrastinate_workers")
            await until(lambda: (store.get(job_id).lease_expires_at or 0) < time.time())
            assert len(await queue.retry_stalled()) == 1
            worker = asyncio.create_task(queue.run_worker(1, fetch_job_polling_interval=0.1))
            try:
                await until(lambda: store.get(job_id).state is JobState.SUCCEEDED)
            finally:
                worker.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await worker
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(30)
            await queue.close()

    asyncio.run(scenario())
    assert calls == [job_id]  # run to its end once, here
    done = store.get(job_id)
    assert done.attempts == 2  # the killed attempt, then this one
    assert [status for _, status in procrastinate_jobs(url, job_id)] == ["succeeded"]


def test_users_take_turns_in_procrastinate_and_a_user_at_the_cap_waits(
    db: tuple[str, PostgresBackend],
) -> None:
    url, backend = db
    store: Any = backend.jobs()
    alice = [upload(backend, f"/a{n}.mp4") for n in range(3)]
    s = SessionInfo(id="s2", remote_addr="192.0.2.2", remote_port=1, login="bob")
    event = Event(Op.CLOSE, s, path="/b.mp4", bytes_written=1, upload=UploadState.COMPLETE)
    (bob,) = backend.journal().record_batch([event], lambda p, e: JobSpec(max_attempts=3)).jobs

    async def scenario() -> None:
        queue = JobQueue(url, store, finishing_runner(store, []), node="n1", lease_seconds=30)
        await queue.open()
        try:
            await queue.hand_over()
        finally:
            await queue.close()

    asyncio.run(scenario())
    with psycopg.connect(url) as conn:
        order = conn.execute(
            "SELECT (args->>'job_id')::int FROM procrastinate_jobs"
            " ORDER BY priority DESC, id"  # the order Procrastinate fetches in
        ).fetchall()
    assert [row[0] for row in order] == [alice[0], bob, alice[1], alice[2]]
    # Alice's first job runs; her second, fetched meanwhile, is not leased (cap 1) and goes
    # back to the outbox; bob's is.
    first = store.lease_job(alice[0], "w/1", 30, per_user=1)
    assert first is not None
    assert store.lease_job(alice[1], "w/2", 30, per_user=1) is None
    assert store.lease_job(bob, "w/3", 30, per_user=1) is not None
    store.finish(first, "w/1", JobState.SUCCEEDED)
    assert store.lease_job(alice[1], "w/2", 30, per_user=1) is not None
