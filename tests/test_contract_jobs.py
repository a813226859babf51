"""Storage contract, jobs side: scheduling (lease, heartbeat, finish, retry, release, recovery
by lease expiry) and the ledger (steps, outputs, emails, admin). Every backend in
contract_kit.BACKENDS, unchanged. Times come from the store's own clock: an expired lease is
one taken for a negative number of seconds, never a sleep."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contract_kit import BACKENDS, collect, fresh_backend, opened, session, upload
from sftpgate.errors import NotFoundError, SftpgateError
from sftpgate.events import Op
from sftpgate.jobs.model import EmailState, Job, JobState
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.ports import Backend, JobSpec, JobStore

T0 = 1_700_000_000.0


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from fresh_backend(request, tmp_path)


def _jobs(backend: Backend, *logins: str) -> list[int]:
    """One upload (and its queued job) per login, in order, one batch each."""
    ids: list[int] = []
    with opened(backend.journal()) as journal:
        for n, login in enumerate(logins):
            event = upload(session(f"s{n}", login), f"/{login}{n}.mp4", T0 + n)
            ids += journal.record_batch([event], lambda p, e: JobSpec(max_attempts=2)).jobs
    return ids


@pytest.fixture
def store(backend: Backend) -> Iterator[JobStore]:
    with opened(backend.jobs()) as jobs:
        yield jobs


def _lease(store: JobStore, owner: str = "w1", seconds: float = 60) -> Job:
    job = store.lease(owner, seconds)
    assert job is not None
    return job


# -- scheduling ----------------------------------------------------------------------


def test_a_lease_takes_the_oldest_due_job_once(backend: Backend, store: JobStore) -> None:
    first, second = _jobs(backend, "alice", "alice")
    taken = _lease(store, "w1")
    assert (taken.id, taken.state, taken.attempts, taken.lease_owner) == (
        first,
        JobState.RUNNING,
        1,
        "w1",
    )
    assert _lease(store, "w2").id == second  # never the job another owner holds
    assert store.lease("w3", 60) is None


def test_users_take_turns_and_a_per_user_cap_holds(backend: Backend, store: JobStore) -> None:
    ids = _jobs(backend, "alice", "alice", "alice", "bob")
    order = [store.lease("w", 60, per_user=1) for _ in range(3)]
    # alice's first, then bob's (his turn, though his upload is the newest), then none:
    # alice already has one running and her cap is 1.
    assert [job.id if job else None for job in order] == [ids[0], ids[3], None]


def test_heartbeat_extends_only_the_owners_lease(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice")
    job = _lease(store)
    assert store.heartbeat(job.id, "w1", 60, progress=0.5, step="transcode")
    assert not store.heartbeat(job.id, "intruder", 60)
    now = store.get(job.id)
    assert (now.progress, now.step) == (0.5, "transcode")
    assert (
        now.lease_expires_at is not None and now.lease_expires_at > (job.lease_expires_at or 0) - 1
    )


def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(
    backend: Backend, store: JobStore
) -> None:
    (job_id,) = _jobs(backend, "alice")
    lost = _lease(store, "dead-worker", seconds=-1)  # expired at once: its worker is gone
    taken = _lease(store, "w2")
    assert (taken.id, taken.attempts, taken.lease_owner) == (job_id, 2, "w2")
    # The old owner can no longer touch it.
    assert not store.heartbeat(job_id, "dead-worker", 60)
    with pytest.raises(SftpgateError):  # LeaseLost: it journals nothing either
        store.finish(
            lost, "dead-worker", JobState.SUCCEEDED, journal=(Op.CONVERTED, "/x", "ok", None)
        )
    with pytest.raises(SftpgateError):
        store.retry_later(lost, "dead-worker", "late", backoff=0)
    store.release(lost, "dead-worker")  # a no-op
    with pytest.raises(SftpgateError):
        store.mark_step(job_id, "dead-worker", "probe")
    assert store.get(job_id).state is JobState.RUNNING
    assert store.get(job_id).lease_owner == "w2"
    with opened(backend.reader()) as reader:
        assert collect(reader, JournalFilter(ops=("converted",)))[0] == []


def test_finish_ends_the_job_and_journals_its_outcome(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice")
    job = _lease(store)
    store.finish(
        job,
        "w1",
        JobState.SUCCEEDED,
        outcome="converted",
        journal=(Op.CONVERTED, "/converted/alice0.flv", "ok", None),
    )
    done = store.get(job.id)
    assert (done.state, done.outcome, done.progress, done.lease_owner) == (
        JobState.SUCCEEDED,
        "converted",
        1,
        None,
    )
    assert done.finished_at is not None
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter(ops=("converted",)))
    assert [(r["path"], r["path2"], r["login"]) for r in rows] == [
        ("/alice0.mp4", "/converted/alice0.flv", "alice")
    ]


def test_retry_later_backs_off_then_marks_dead(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice")
    job = _lease(store)
    assert store.retry_later(job, "w1", "ffmpeg crashed", backoff=3600) is JobState.QUEUED
    assert store.lease("w1", 60) is None  # not due for an hour
    assert store.get(job.id).last_error == "ffmpeg crashed"
    with pytest.raises(SftpgateError):  # LeaseLost: w1 gave it back already
        store.retry_later(job, "w1", "again", backoff=0)
    store_job = store.get(job.id)
    assert store_job.state is JobState.QUEUED and store_job.next_run_at > job.created_at + 3000


def test_the_last_attempt_makes_it_dead(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice")  # max_attempts 2
    job = _lease(store)
    assert store.retry_later(job, "w1", "one", backoff=0) is JobState.QUEUED
    job = _lease(store)
    assert job.attempts == 2
    assert store.retry_later(job, "w1", "two", backoff=0) is JobState.DEAD
    assert store.get(job.id).state is JobState.DEAD
    assert store.lease("w1", 60) is None


def test_release_gives_the_job_back_without_counting_the_attempt(
    backend: Backend, store: JobStore
) -> None:
    _jobs(backend, "alice")
    job = _lease(store)
    store.release(job, "w1")
    back = store.get(job.id)
    assert (back.state, back.attempts, back.lease_owner) == (JobState.QUEUED, 0, None)
    assert _lease(store, "w2").attempts == 1


def test_pid_is_recorded_for_the_owner_and_cleared(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice")
    job = _lease(store)
    store.set_pid(job.id, "other", 999, "x")
    assert store.get(job.id).pid is None
    store.set_pid(job.id, "w1", 4242, "sftpgate-job-1")
    assert (store.get(job.id).pid, store.get(job.id).pid_marker) == (4242, "sftpgate-job-1")
    store.clear_pid(job.id)
    assert store.get(job.id).pid is None


# -- the ledger ------------------------------------------------------------------------


def test_steps_leave_markers_and_merge_data(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice")
    job = _lease(store)
    store.mark_step(job.id, "w1", "probe", data={"source": {"codec": "h264"}})
    failed = store.mark_step(job.id, "w1", "transcode", error="boom")
    assert not failed.done("transcode") and failed.steps["transcode"]["error"] == "boom"
    done = store.mark_step(job.id, "w1", "probe", finished=True, data={"outputs": {"flv": "a.flv"}})
    assert done.done("probe") and done.step == "probe"
    assert done.data == {"source": {"codec": "h264"}, "outputs": {"flv": "a.flv"}}
    assert store.get(job.id).data == done.data


def test_same_content_finds_the_earlier_job(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice", "alice")
    first, second = _lease(store), _lease(store)
    assert store.claim_content(first, "w1", "ab" * 32, window=3600, now=first.created_at) is None
    earlier = store.claim_content(second, "w1", "ab" * 32, window=3600, now=second.created_at)
    assert earlier is not None and earlier.id == first.id
    assert store.get(first.id).data["sha256"] == "ab" * 32


def test_emails_are_rate_limited_into_a_digest_sent_once(backend: Backend, store: JobStore) -> None:
    _jobs(backend, "alice", "alice", "alice")
    jobs = [_lease(store) for _ in range(3)]
    now = jobs[0].created_at + 10
    log_id = store.reserve_email(jobs[0], "w1", limit=1, window=3600, now=now)
    assert log_id is not None and store.get(jobs[0].id).email_state is EmailState.SENDING
    store.set_email_state(jobs[0].id, "w1", EmailState.SENT)
    # Over the limit: the others wait for a digest.
    for job in jobs[1:]:
        assert store.reserve_email(job, "w1", limit=1, window=3600, now=now) is None
        assert store.get(job.id).email_state is EmailState.DIGEST
        store.finish(job, "w1", JobState.SUCCEEDED)
    assert store.digests_due(limit=1, window=3600, now=now) == []  # the slot is taken
    later = now + 3601
    assert store.digests_due(limit=1, window=3600, now=later) == ["alice"]
    claimed = store.claim_digest("alice", limit=1, window=3600, now=later)
    assert claimed is not None
    digest_id, told = claimed
    assert sorted(j.id for j in told) == sorted(j.id for j in jobs[1:])
    assert store.claim_digest("alice", limit=1, window=3600, now=later) is None
    store.digest_sent(digest_id, told, EmailState.SENT, None)
    assert {store.get(j.id).email_state for j in jobs} == {EmailState.SENT}


def test_an_email_cut_off_while_sending_is_flagged_never_resent(
    backend: Backend, store: JobStore
) -> None:
    _jobs(backend, "alice", "alice")
    first, second = _lease(store), _lease(store)
    log_id = store.reserve_email(first, "w1", limit=5, window=3600, now=first.created_at)
    assert log_id is not None
    store.finish(first, "w1", JobState.SUCCEEDED)  # ...and the process died mid-send
    other = store.reserve_email(second, "w1", limit=5, window=3600, now=second.created_at)
    assert other is not None
    store.unreserve_email(second, "w1", other, "421 try later")
    assert store.get(second.id).email_state is EmailState.NONE
    assert store.recover_emails() == [first.id]
    assert store.get(first.id).email_state is EmailState.UNCERTAIN


def test_admins_retry_cancel_list_and_get(backend: Backend, store: JobStore) -> None:
    a, b = _jobs(backend, "alice", "bob")
    with pytest.raises(NotFoundError):
        store.get(a + b + 100)
    with pytest.raises(SftpgateError):
        store.retry(a)  # queued: nothing to retry
    cancelled = store.cancel(a)
    assert cancelled.state is JobState.CANCELLED
    with pytest.raises(SftpgateError):
        store.cancel(a)
    again = store.retry(a)
    assert (again.state, again.attempts) == (JobState.QUEUED, 0)
    assert [j.id for j in store.list(login="bob")] == [b]
    assert [j.id for j in store.list(states=("queued",), limit=1)] == [b]
    assert [j.id for j in store.list()] == [a, b]


def test_upload_time_is_the_uploads_journal_time(backend: Backend, store: JobStore) -> None:
    (job_id,) = _jobs(backend, "alice")
    assert store.upload_time(store.get(job_id).upload_id) == T0
    assert store.upload_time(None) is None
    assert store.upload_time(10**9) is None


def test_a_job_records_the_node_of_its_upload(backend: Backend, store: JobStore) -> None:
    with opened(backend.journal()) as journal:
        (job_id,) = journal.record_batch(
            [upload(session("s", "alice", "gw-7"), "/x.mp4", T0)], lambda p, e: JobSpec(3)
        ).jobs
    assert store.get(job_id).node == "gw-7"


def test_queue_stats_count_queued_and_running_and_date_the_oldest_queued(
    backend: Backend, store: JobStore
) -> None:
    empty = store.queue_stats()
    assert (empty.queued, empty.running, empty.oldest_queued_at) == (0, 0, None)
    first, second, third = _jobs(backend, "alice", "bob", "carol")
    stats = store.queue_stats()
    assert (stats.queued, stats.running) == (3, 0)
    assert stats.oldest_queued_at == min(store.get(i).created_at for i in (first, second, third))
    taken = _lease(store, "w1")
    stats = store.queue_stats()
    assert (stats.queued, stats.running) == (2, 1)
    left = [store.get(i) for i in (first, second, third) if i != taken.id]
    assert stats.oldest_queued_at == min(j.created_at for j in left)
    store.finish(taken, "w1", JobState.SUCCEEDED, outcome="converted")
    store.cancel(left[0].id)
    stats = store.queue_stats()
    assert (stats.queued, stats.running, stats.oldest_queued_at) == (1, 0, left[1].created_at)


# -- a poison job: its worker stops every time (killed, out of memory, its host lost) -------


def test_a_job_whose_worker_keeps_stopping_goes_dead_after_its_last_attempt(
    backend: Backend, store: JobStore
) -> None:
    (job_id,) = _jobs(backend, "alice")  # max_attempts 2
    _lease(store, "host-a:101:aa/0", seconds=-1)  # its worker died: the lease ran out
    assert store.bury_abandoned() == []  # an attempt left: taken over, as before
    second = _lease(store, "host-b:202:bb/1", seconds=-1)  # ...and that worker died too
    assert (second.id, second.attempts) == (job_id, 2)
    store.mark_step(job_id, "host-b:202:bb/1", "transcode")
    store.set_pid(job_id, "host-b:202:bb/1", 4242, "ffmpeg:sftpgate-job-x")
    assert store.lease("w3", 60) is None  # never given to a third worker to kill
    (dead,) = store.bury_abandoned()
    assert (dead.id, dead.state, dead.attempts, dead.lease_owner) == (
        job_id,
        JobState.DEAD,
        2,
        None,
    )
    assert dead.last_error is not None
    assert "stopped without finishing it 2 times" in dead.last_error
    assert "last on host-b, pid 202, at transcode" in dead.last_error
    # Its leftover ffmpeg is still known, for the burier to kill.
    assert (dead.pid, dead.pid_marker) == (4242, "ffmpeg:sftpgate-job-x")
    assert dead.finished_at is not None
    assert store.bury_abandoned() == []  # buried once
    assert store.lease("w3", 60) is None
    assert store.get(job_id).state is JobState.DEAD
    # Its last worker, were it only stalled, is fenced: it can change nothing.
    assert not store.heartbeat(job_id, "host-b:202:bb/1", 60)
    with pytest.raises(SftpgateError):
        store.mark_step(job_id, "host-b:202:bb/1", "sidecar")
    with pytest.raises(SftpgateError):
        store.finish(second, "host-b:202:bb/1", JobState.SUCCEEDED)
    # An admin may still retry it: its attempts start again.
    again = store.retry(job_id)
    assert (again.state, again.attempts) == (JobState.QUEUED, 0)


def test_a_poison_job_is_buried_once_however_many_race(backend: Backend) -> None:
    ids = _jobs(backend, "alice", "bob", "carol", "dave")
    with opened(backend.jobs()) as one, opened(backend.jobs()) as other:
        for n in range(2):
            for _ in ids:
                _lease(one if n else other, f"gone:{n}:ff/0", seconds=-1)
        # Two workers (each its own store, on its own thread) look at the same moment.
        start = threading.Barrier(2)

        def bury(store: JobStore) -> list[Job]:
            start.wait(10)
            return store.bury_abandoned()

        with ThreadPoolExecutor(2) as pool:
            found = [f.result() for f in [pool.submit(bury, one), pool.submit(bury, other)]]
    buried = [job.id for jobs in found for job in jobs]
    assert sorted(buried) == sorted(ids)  # each exactly once, to one caller
    assert all(job.state is JobState.DEAD for jobs in found for job in jobs)


def test_released_attempts_never_count_towards_death(backend: Backend, store: JobStore) -> None:
    (job_id,) = _jobs(backend, "alice")  # max_attempts 2
    for n in range(5):  # five clean stops (drains) in a row
        store.release(_lease(store, f"w{n}"), f"w{n}")
    assert store.get(job_id).attempts == 0
    _lease(store, "dies", seconds=-1)  # then one worker dies holding it
    assert store.bury_abandoned() == []
    taken = _lease(store, "w9")
    assert (taken.id, taken.attempts, taken.state) == (job_id, 2, JobState.RUNNING)
    store.release(taken, "w9")  # a drain on the last attempt: still alive
    assert store.bury_abandoned() == []
    assert (store.get(job_id).state, store.get(job_id).attempts) == (JobState.QUEUED, 1)


def test_a_job_failing_by_exception_still_follows_its_backoff(
    backend: Backend, store: JobStore
) -> None:
    (job_id,) = _jobs(backend, "alice")  # max_attempts 2
    _lease(store, "dies", seconds=-1)  # a worker died once
    taken = _lease(store, "w2")
    assert taken.attempts == 2
    assert store.retry_later(taken, "w2", "smtp down", backoff=3600) is JobState.DEAD
    assert store.bury_abandoned() == []  # dead by its exception, not buried again
    assert store.get(job_id).last_error == "smtp down"
    other = _jobs(backend, "bob")[0]
    first = _lease(store, "w1")
    assert first.id == other
    assert store.retry_later(first, "w1", "ffmpeg crashed", backoff=3600) is JobState.QUEUED
    assert store.bury_abandoned() == []
    waiting = store.get(other)
    assert waiting.state is JobState.QUEUED and waiting.next_run_at > waiting.created_at + 3000
    assert store.lease("w1", 60) is None  # it waits out its backoff


def test_a_buried_jobs_error_keeps_an_earlier_failure(backend: Backend, store: JobStore) -> None:
    (job_id,) = _jobs(backend, "alice")  # max_attempts 2
    first = _lease(store, "w1")
    store.retry_later(first, "w1", "smtp down", backoff=0)  # a failure, by exception
    _lease(store, "odd-owner", seconds=-1)  # then its worker stopped on the last attempt
    (dead,) = store.bury_abandoned()
    assert dead.id == job_id and dead.last_error is not None
    assert dead.last_error.startswith("its worker stopped without finishing it on its last")
    assert "(2 of 2; last held by odd-owner, at its start)" in dead.last_error
    assert dead.last_error.endswith("; before: smtp down")
