"""Jobs are fair across users and bounded per user: turns, caps, refusals, same content once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import PASSWORDS, RunningGateway, asyncssh_login, start_gateway
from hostile_kit import Bystander
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.jobs.store import JobStore
from sftpgate.jobs.worker import WorkerPool
from sftpgate.journal.store import connect, record_batch
from sftpgate.sftp.policy import NOTHING_UNDER_TEMP
from sftpgate.storage.ports import JobSpec


def until_rounds(bystander: Bystander, count: int, timeout: float = 30) -> None:
    """Wait until the bystander has done ``count`` rounds (so the attack overlapped them)."""
    deadline = time.monotonic() + timeout
    while len(bystander.rounds) < count and time.monotonic() < deadline:
        time.sleep(0.05)


# -- the queue itself (a real SQLite journal, no gateway) ------------------------


def _uploads(db: Path, logins: list[str], cap: int | None = None) -> None:
    """Journal one completed upload per entry of ``logins``, each with its job, in order."""
    conn = connect(db, synchronous="normal")
    events = [
        Event(
            Op.CLOSE,
            SessionInfo(id=f"s{n}", remote_addr="127.0.0.1", remote_port=1, login=login),
            path=f"/clip{n}.mp4",
            bytes_written=10,
            upload=UploadState.COMPLETE,
        )
        for n, login in enumerate(logins)
    ]
    for event in events:  # one transaction each, so the cap sees the jobs before it
        record_batch(conn, [event], lambda path, ev: JobSpec(max_attempts=5, queue_cap=cap))
    conn.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    db = tmp_path / "journal.db"
    connect(db).close()
    opened = JobStore(db, synchronous="normal")
    try:
        yield opened
    finally:
        opened.close()


def test_users_take_turns_so_a_late_upload_is_leased_before_a_long_backlog(
    store: JobStore,
) -> None:
    _uploads(store.path, ["alice"] * 20 + ["bob"])
    first = store.lease("w0", 60, per_user=None)
    second = store.lease("w1", 60, per_user=None)
    third = store.lease("w2", 60, per_user=None)
    assert first is not None and second is not None and third is not None
    # alice went first (oldest job), then bob's turn although 19 of alice's are older.
    assert [first.login, second.login, third.login] == ["alice", "bob", "alice"]


def test_a_user_at_the_running_cap_waits_while_others_go(store: JobStore) -> None:
    _uploads(store.path, ["alice"] * 5 + ["bob"] * 2)
    taken = [store.lease(f"w{i}", 60, per_user=1) for i in range(4)]
    assert [job.login if job else None for job in taken] == ["alice", "bob", None, None]
    running = store.list(states=("running",))
    assert sorted(job.login for job in running) == ["alice", "bob"]


def test_uploads_over_the_queue_cap_are_recorded_refused_and_told_once(store: JobStore) -> None:
    _uploads(store.path, ["alice"] * 5 + ["bob"], cap=3)
    jobs = store.list()
    alice = [job for job in jobs if job.login == "alice"]
    assert [job.outcome for job in alice] == [None, None, None, "refused", "refused"]
    assert "3 of your uploads are already waiting (at most 3)" in alice[3].data["refused"]
    # The first refusal of the backlog is told (email none), the next not (skipped).
    assert [job.email_state.value for job in alice[3:]] == ["none", "skipped"]
    # Nothing is lost: every upload has its job row; bob is not affected by alice's cap.
    assert [job.outcome for job in jobs if job.login == "bob"] == [None]


# -- against a real gateway --------------------------------------------------------


@pytest.fixture
def fair(tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer) -> Iterator[RunningGateway]:
    extra = pipeline_settings(smtp.port, thumbnails=1)
    extra["jobs"].update({"workers": 2, "per_user_running": 1, "dedupe_window": 0})
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        yield running
    finally:
        running.stop()


def test_a_second_users_clip_finishes_promptly_while_the_first_has_50_jobs_queued(
    fair: RunningGateway, smtp: SmtpServer, tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "tiny.mp4", "mp4", seconds=0.4, size="64x48", audio=False)
    alice = fair.sftp("alice")
    for n in range(50):
        alice.put(str(clip), f"backlog-{n:02d}.mp4")
    with Bystander(fair.port, "carol", PASSWORDS["carol"]) as bystander:
        started = time.monotonic()
        fair.sftp("bob", key=True).put(str(clip), "mine.mp4")
        rows = wait_jobs(
            fair,
            lambda rs: any(r["login"] == "bob" and r["state"] == "succeeded" for r in rs),
            timeout=60,
        )
        took = time.monotonic() - started
        until_rounds(bystander, 3)
    waiting = [r for r in rows if r["login"] == "alice" and r["state"] in ("queued", "running")]
    # Bob's clip did not wait for alice's backlog: most of it is still there.
    assert len(waiting) >= 25, f"only {len(waiting)} of alice's jobs still waiting"
    assert took < 20, f"bob's clip took {took:.1f} s behind alice's backlog"
    assert sum(r["state"] == "running" and r["login"] == "alice" for r in rows) <= 1
    (bob,) = [r for r in rows if r["login"] == "bob"]
    assert (bob["outcome"], bob["attempts"]) == ("converted", 1)
    assert len(smtp.inbox.to("bob@example.org")) == 1
    bystander.check(most=3.0, at_least=3)


def test_over_the_cap_one_refusal_email_and_every_refusal_journaled(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    extra = pipeline_settings(smtp.port, thumbnails=1)
    # No embedded workers: the uploads queue up; the test's own pool runs them after.
    extra["jobs"].update({"workers": 0, "per_user_queue": 2, "dedupe_window": 0})
    running = start_gateway(tmp_path, user_keys, extra=extra)
    pool: WorkerPool | None = None
    try:
        clip = make_clip(tmp_path / "tiny.mp4", "mp4", seconds=0.4, size="64x48", audio=False)
        alice = running.sftp("alice")
        for n in range(5):
            alice.put(str(clip), f"up-{n}.mp4")
        assert [r["outcome"] for r in running.rows("SELECT * FROM jobs ORDER BY id")] == [
            None,
            None,
            "refused",
            "refused",
            "refused",
        ]
        store = JobStore(running.config.journal_path, synchronous="normal")
        config = replace(running.config, jobs=replace(running.config.jobs, workers=2))
        pool = WorkerPool(config, store)
        running.loop.run(pool.start())
        rows = wait_jobs(running, lambda rs: settled(rs, 5))
    finally:
        if pool is not None:
            running.loop.run(pool.stop())
            pool.store.close()
        running.stop()
    assert [(r["state"], r["outcome"]) for r in rows] == [
        ("succeeded", "converted"),
        ("succeeded", "converted"),
        ("failed", "refused"),
        ("failed", "refused"),
        ("failed", "refused"),
    ]
    assert [r["email_state"] for r in rows[2:]] == ["sent", "skipped", "skipped"]
    subjects = sorted(m["Subject"] for m in smtp.inbox.to("alice@example.org"))
    assert len(subjects) == 3 and sum("too many uploads waiting" in s for s in subjects) == 1
    refusals = running.rows("SELECT * FROM operations WHERE op = 'rejected' ORDER BY id")
    assert [(r["path"], r["status"]) for r in refusals] == [
        (f"/up-{n}.mp4", "refused") for n in (2, 3, 4)
    ]
    assert all("already waiting" in r["message"] for r in refusals)


# -- the same content again, and the hard-link + rename flood ------------------------


def test_same_content_again_is_one_job_and_a_link_rename_flood_makes_none(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    extra = pipeline_settings(smtp.port, thumbnails=1)
    running = start_gateway(tmp_path, user_keys, extra=extra)
    flood = 200  # the 1,000 in 5 s, cut to 200 to keep the suite bounded
    try:
        clip = make_clip(tmp_path / "v.mp4", "mp4", seconds=0.4, size="64x48", audio=False)
        alice = running.sftp("alice")
        alice.put(str(clip), "v.mp4")
        alice.put(str(clip), "again.mp4")  # the same bytes under another name

        async def link_and_rename() -> None:
            async with asyncssh_login(running.port) as conn, conn.start_sftp_client() as sftp:
                for n in range(flood):
                    await sftp.link("v.mp4", "x.tmp")  # hardlink@openssh.com
                    await sftp.posix_rename("x.tmp", f"{n}.mp4")

        with Bystander(running.port, "carol", PASSWORDS["carol"]) as bystander:
            started = time.monotonic()
            running.loop.run(link_and_rename(), timeout=120)
            took = time.monotonic() - started
            rows = wait_jobs(running, lambda rs: settled(rs, 2))
            until_rounds(bystander, 3)
        renames = running.wait_rows(
            lambda rs: sum(r["op"] == "rename" for r in rs) >= flood,
            timeout=30,
        )
    finally:
        running.stop()
    assert took < 60
    assert [(r["path"], r["state"], r["outcome"]) for r in rows] == [
        ("/v.mp4", "succeeded", "converted"),
        ("/again.mp4", "succeeded", "duplicate"),
    ]
    assert rows[1]["email_state"] == "skipped"
    (message,) = smtp.inbox.messages  # one email, for the first upload
    assert "v.mp4" in message["Subject"]
    flood_renames = [r for r in renames if r["op"] == "rename"]
    assert len(flood_renames) == flood
    assert all(r["message"] == NOTHING_UNDER_TEMP for r in flood_renames)
    uploads = running.rows("SELECT path FROM uploads WHERE state = 'complete'")
    assert [u["path"] for u in uploads if u["path"].endswith(".mp4")] == [
        "/v.mp4",
        "/again.mp4",
    ]
    duplicate = running.rows("SELECT * FROM operations WHERE status = 'duplicate'")
    assert [(r["op"], r["path"], r["path2"]) for r in duplicate] == [
        ("converted", "/again.mp4", "/converted/v.flv")
    ]
    bystander.check(most=3.0, at_least=3)
