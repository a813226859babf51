"""The PostgreSQL job store against a real PostgreSQL: leases taken with FOR UPDATE SKIP LOCKED
by racing workers, per-user caps under races, recovery by lease expiry, the ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import pg_kit
from sftpgate.errors import NotFoundError, SftpgateError
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.jobs.model import EmailState, JobState
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.ports import JobSpec
from sftpgate.storage.postgres.backend import PostgresBackend
from sftpgate.storage.postgres.jobs import LeaseLost


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


@pytest.fixture
def backend(pg: pg_kit.PgServer) -> Iterator[PostgresBackend]:
    with pg.database() as url:
        b = PostgresBackend(url, size=12)
        b.migrate()
        try:
            yield b
        finally:
            b.close()


def uploads(backend: PostgresBackend, login: str, count: int) -> list[int]:
    s = SessionInfo(id=f"s-{login}", remote_addr="192.0.2.1", remote_port=1, login=login)
    events = [
        Event(Op.CLOSE, s, path=f"/{n}.mp4", bytes_written=1, upload=UploadState.COMPLETE)
        for n in range(count)
    ]
    rule = lambda path, event: JobSpec(max_attempts=2)  # noqa: E731
    return list(backend.journal().record_batch(events, rule).jobs)


def test_racing_workers_never_lease_the_same_job(backend: PostgresBackend) -> None:
    ids = uploads(backend, "alice", 30) + uploads(backend, "bob", 30)
    store = backend.jobs()

    def drain(worker: int) -> list[int]:
        got = []
        while (job := store.lease(f"w{worker}", 60)) is not None:
            got.append(job.id)
        return got

    with ThreadPoolExecutor(6) as pool:
        taken = [i for got in pool.map(drain, range(6)) for i in got]
    assert sorted(taken) == sorted(ids)  # every job once


def test_per_user_cap_holds_when_workers_race(backend: PostgresBackend) -> None:
    uploads(backend, "alice", 10)
    uploads(backend, "bob", 1)
    store = backend.jobs()
    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda n: store.lease(f"w{n}", 60, per_user=1), range(8)))
    leased = sorted(j.login for j in jobs if j is not None)
    assert leased == ["alice", "bob"]


def test_users_take_turns(backend: PostgresBackend) -> None:
    uploads(backend, "alice", 3)
    uploads(backend, "bob", 2)
    store = backend.jobs()
    order = []
    while (job := store.lease("w", 60)) is not None:
        order.append(job.login)
    assert order == ["alice", "bob", "alice", "bob", "alice"]


def test_a_dead_workers_job_is_taken_over_after_its_lease_and_its_finish_refused(
    backend: PostgresBackend,
) -> None:
    (job_id,) = uploads(backend, "alice", 1)
    store = backend.jobs()
    first = store.lease("dead", 0.2)
    assert first is not None and first.id == job_id
    assert store.lease("live", 60) is None  # the lease still holds
    deadline = time.monotonic() + 10
    while (second := store.lease("live", 60)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)  # waiting for the lease to expire: the behaviour under test
    assert second.id == job_id and second.attempts == 2
    assert not store.heartbeat(job_id, "dead", 60)
    with pytest.raises(LeaseLost):
        store.finish(first, "dead", JobState.SUCCEEDED)
    with pytest.raises(LeaseLost):
        store.mark_step(job_id, "dead", "probe")
    assert store.heartbeat(job_id, "live", 60, progress=0.5, step="transcode")
    store.finish(second, "live", JobState.SUCCEEDED, journal=(Op.CONVERTED, "/c/0.flv", "ok", None))
    done = store.get(job_id)
    assert (done.state, done.progress, done.step) == (JobState.SUCCEEDED, 1, "done")
    rows: list[dict[str, Any]] = []
    backend.reader().scan(JournalFilter(ops=("converted",)), rows.append)
    assert [(r["path"], r["path2"], r["login"]) for r in rows] == [("/0.mp4", "/c/0.flv", "alice")]


def test_retry_later_backs_off_then_dies_and_an_admin_retries(backend: PostgresBackend) -> None:
    (job_id,) = uploads(backend, "alice", 1)
    store = backend.jobs()
    job = store.lease("w", 60)
    assert job is not None
    assert store.retry_later(job, "w", "boom", backoff=3600) is JobState.QUEUED
    assert store.lease("w", 60) is None  # not due yet
    with pytest.raises(LeaseLost):
        store.retry_later(job, "w", "again", backoff=0)
    with backend._pool.connection() as conn:
        conn.execute("UPDATE jobs SET next_run_at = 0 WHERE id = %s", (job_id,))
    job = store.lease("w", 60)
    assert job is not None and job.attempts == 2
    assert store.retry_later(job, "w", "boom", backoff=0) is JobState.DEAD
    with pytest.raises(SftpgateError):
        store.cancel(job_id)
    again = store.retry(job_id)
    assert (again.state, again.attempts) == (JobState.QUEUED, 0)
    cancelled = store.cancel(job_id)
    assert cancelled.state is JobState.CANCELLED
    with pytest.raises(NotFoundError):
        store.get(999_999)


def test_release_gives_the_attempt_back(backend: PostgresBackend) -> None:
    uploads(backend, "alice", 1)
    store = backend.jobs()
    job = store.lease("w", 60)
    assert job is not None
    store.release(job, "w")
    again = store.lease("w2", 60)
    assert again is not None and again.attempts == 1


def test_steps_content_and_emails_are_kept_as_on_sqlite(backend: PostgresBackend) -> None:
    a, b = uploads(backend, "alice", 2)
    store = backend.jobs()
    first, second = store.lease("w1", 60), store.lease("w2", 60)
    assert first is not None and second is not None
    marked = store.mark_step(first.id, "w1", "probe", finished=True, data={"width": 320})
    assert marked.done("probe") and marked.data["width"] == 320
    assert store.claim_content(first, "w1", "f00d", 3600, time.time()) is None
    twin = store.claim_content(second, "w2", "f00d", 3600, time.time())
    assert twin is not None and twin.id == first.id
    log_id = store.reserve_email(first, "w1", limit=1, window=3600, now=time.time())
    assert log_id is not None and store.get(first.id).email_state is EmailState.SENDING
    assert store.reserve_email(second, "w2", limit=1, window=3600, now=time.time()) is None
    assert store.get(second.id).email_state is EmailState.DIGEST
    store.finish(store.get(first.id), "w1", JobState.SUCCEEDED)
    store.finish(store.get(second.id), "w2", JobState.SUCCEEDED)
    assert store.recover_emails() == [first.id]  # cut off while sending: never resent
    assert store.digests_due(limit=1, window=3600, now=time.time()) == []
    assert store.digests_due(limit=2, window=3600, now=time.time()) == ["alice"]
    claimed = store.claim_digest("alice", limit=2, window=3600, now=time.time())
    assert claimed is not None and [j.id for j in claimed[1]] == [b]
    store.digest_sent(claimed[0], claimed[1], EmailState.SENT, None)
    assert store.get(b).email_state is EmailState.SENT
    assert [j.id for j in store.list(states=("succeeded",), login="alice")] == [a, b]
