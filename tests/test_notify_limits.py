"""Emails to one user are rate-limited: beyond N a window, one digest; durable, never twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import start_gateway
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.jobs.model import EmailState, JobState
from sftpgate.jobs.store import JobStore
from sftpgate.jobs.worker import WorkerPool
from sftpgate.journal.store import connect, record_batch
from sftpgate.notify.message import header_safe
from sftpgate.storage.ports import JobSpec

HOUR = 3600.0


class Clock:
    """A clock the test moves by hand (the email windows' time)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_header_safe_turns_every_line_break_and_control_into_a_space() -> None:
    assert header_safe("a\r\nb\x00c\u2028d\x85e\tf é.jpg") == "a  b c d e f é.jpg"


# -- the ledger (a real SQLite journal, no gateway) ----------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    db = tmp_path / "journal.db"
    conn = connect(db, synchronous="normal")
    session = SessionInfo(id="s", remote_addr="127.0.0.1", remote_port=1, login="alice")
    events = [
        Event(Op.CLOSE, session, path=f"/c{n}.mp4", bytes_written=1, upload=UploadState.COMPLETE)
        for n in range(4)
    ]
    record_batch(conn, events, lambda path, ev: JobSpec(max_attempts=5))
    conn.close()
    opened = JobStore(db, synchronous="normal")
    try:
        yield opened
    finally:
        opened.close()


def test_beyond_the_limit_notices_wait_for_a_digest_until_the_window_frees_a_slot(
    store: JobStore,
) -> None:
    leased = [store.lease(f"w{n}", 60) for n in range(4)]
    jobs = [job for job in leased if job is not None]
    assert len(jobs) == 4
    at = [0.0, 10.0, 20.0]
    got = [store.reserve_email(job, f"w{n}", 2, HOUR, at[n]) for n, job in enumerate(jobs[:3])]
    assert got[0] is not None and got[1] is not None and got[2] is None
    assert store.get(jobs[2].id).email_state is EmailState.DIGEST
    for n, job in enumerate(jobs[:3]):
        store.finish(job, f"w{n}", JobState.SUCCEEDED)
    assert store.digests_due(2, HOUR, 30.0) == []  # two sent within the hour
    assert store.digests_due(2, HOUR, HOUR + 1) == ["alice"]  # the first left the window
    # While a digest waits, a newer notice joins it instead of jumping ahead.
    assert store.reserve_email(jobs[3], "w3", 2, HOUR, HOUR + 1) is None


def test_a_digest_cut_off_by_a_crash_is_flagged_never_sent_twice(store: JobStore) -> None:
    leased = [store.lease(f"w{n}", 60) for n in range(2)]
    jobs = [job for job in leased if job is not None]
    assert len(jobs) == 2
    assert store.reserve_email(jobs[0], "w0", 1, HOUR, 0.0) is not None
    assert store.reserve_email(jobs[1], "w1", 1, HOUR, 1.0) is None
    store.set_email_state(jobs[0].id, "w0", EmailState.SENT)  # the first went out
    for n, job in enumerate(jobs):
        store.finish(job, f"w{n}", JobState.SUCCEEDED)
    claimed = store.claim_digest("alice", 1, HOUR, HOUR + 1)
    assert claimed is not None and [j.id for j in claimed[1]] == [jobs[1].id]
    # The gateway dies here, between "sending" and "sent" (a crash no real part
    # can be made to have at this line; the store is simply not told the end).
    reopened = JobStore(store.path, synchronous="normal")
    try:
        assert reopened.recover_emails() == [jobs[1].id]
        assert reopened.get(jobs[1].id).email_state is EmailState.UNCERTAIN
        assert reopened.digests_due(1, HOUR, 10 * HOUR) == []
        assert reopened.claim_digest("alice", 1, HOUR, 10 * HOUR) is None
    finally:
        reopened.close()


# -- real gateway, real SMTP, the workers' clock injected ----------------------------


def test_over_the_rate_limit_one_digest_goes_out_once_smtp_is_back(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    extra = pipeline_settings(smtp.port, thumbnails=1)
    extra["jobs"].update({"workers": 0, "dedupe_window": 0})  # the test runs the pool
    extra["email"] = {"rate_limit": 2, "rate_window": HOUR}
    running = start_gateway(tmp_path, user_keys, extra=extra)
    clock = Clock()
    pool: WorkerPool | None = None
    back: SmtpServer | None = None
    try:
        clip = make_clip(tmp_path / "tiny.mp4", "mp4", seconds=0.4, size="64x48", audio=False)
        alice = running.sftp("alice")
        for n in range(4):
            alice.put(str(clip), f"clip-{n}.mp4")
        config = replace(running.config, jobs=replace(running.config.jobs, workers=2))
        store = JobStore(running.config.journal_path, synchronous="normal")
        pool = WorkerPool(config, store, clock=clock)
        running.loop.run(pool.start())
        rows = wait_jobs(running, lambda rs: settled(rs, 4))
        assert sorted(r["email_state"] for r in rows) == ["digest", "digest", "sent", "sent"]
        assert len(smtp.inbox.messages) == 2

        # The hour passes while the mail server is down: the digest is tried,
        # fails, and its notices wait again (its slot given back).
        smtp.stop()
        clock.now += HOUR + 1
        wait_jobs(
            running,
            lambda rs: (
                sum(
                    r["email_state"] == "digest" and "email:" in (r["last_error"] or "") for r in rs
                )
                == 2
            ),
        )
        assert len(running.rows("SELECT * FROM email_log")) == 2

        back = SmtpServer(port=smtp.port, inbox=smtp.inbox).start()
        rows = wait_jobs(running, lambda rs: all(r["email_state"] == "sent" for r in rs))
    finally:
        if pool is not None:
            running.loop.run(pool.stop())
            pool.store.close()
        running.stop()
        if back is not None:
            back.stop()
    messages = smtp.inbox.to("alice@example.org")
    assert len(messages) == 3
    digest = messages[-1]
    assert digest["Subject"] == "Your uploads: 2 updates"
    text = digest.get_body(preferencelist=("plain",))
    assert text is not None
    log = running.rows("SELECT kind, jobs FROM email_log ORDER BY id")
    assert [r["kind"] for r in log] == ["single", "single", "digest"]
    told = [r["path"] for r in rows if r["id"] in json.loads(log[-1]["jobs"])]
    assert len(told) == 2
    for path in told:
        assert f"{path}: converted: /converted/" in text.get_content()
