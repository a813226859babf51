"""The journal writer survives any record, and a durable emit never waits for good.

Poison records are real ones that SQLite or the store cannot write (an int
too big to bind, a field of the wrong type, attrs that are no JSON, a lone
surrogate); the stall is a real lock: another connection holding a write
transaction, which makes the writer's BEGIN IMMEDIATE wait (its busy timeout
is 30 s, far past the durable timeout under test).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.journal.writer import (
    STATUS_SET_ASIDE,
    STATUS_TIMEOUT,
    JournalTimeout,
    JournalUnavailable,
    JournalWriter,
)
from sftpgate.storage.ports import JobSpec

SESSION = SessionInfo(id="s1", remote_addr="127.0.0.1", remote_port=5000, login="alice")


def rows(path: Path, sql: str = "SELECT * FROM operations ORDER BY id") -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], timeout: float = 10) -> None:
    """Poll ``check`` (the writer is a thread: there is nothing to await)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, JournalWriter]]:
    path = tmp_path / "j.sqlite3"
    writer = JournalWriter(path, interval=0.01, durable_timeout=0.5)
    writer.start()
    try:
        yield path, writer
    finally:
        writer.close()


def poison() -> list[Event]:
    """Records no SQLite row can hold, each for its own reason."""
    return [
        Event(Op.CLOSE, SESSION, path="/big", bytes_written=2**70),  # OverflowError on bind
        Event(Op.STAT, SESSION, path="/d", duration="x"),  # type: ignore[arg-type]
        Event(Op.SETSTAT, SESSION, path="/a", attrs={"s": {1, 2}}),  # no JSON for a set
        Event(Op.MKDIR, SESSION, path="/\ud800"),  # no UTF-8 for a lone surrogate
        Event(Op.OPEN, SESSION, path={"nested": [1, {"x": 2}]}),  # type: ignore[arg-type]
    ]


def test_poison_records_are_set_aside_and_the_rest_of_their_batch_commits(
    journal: tuple[Path, JournalWriter],
) -> None:
    path, writer = journal
    bad = poison()
    good = [Event(Op.REMOVE, SESSION, path=f"/ok{i}") for i in range(50)]
    mixed = good[:10] + bad[:2] + good[10:30] + bad[2:] + good[30:]
    for event in mixed:  # emitted together: one batch
        writer.emit(event)
    wait_until(lambda: writer.committed >= len(mixed))
    got = rows(path)
    assert [r["path"] for r in got if r["op"] == "remove"] == [e.path for e in good]  # in order
    errors = [r for r in got if r["status"] == STATUS_SET_ASIDE]
    assert len(errors) == len(bad) == writer.set_aside
    assert {r["op"] for r in errors} == {"close", "stat", "setstat", "mkdir", "open"}
    assert all(len(r["message"]) <= 300 for r in errors)
    assert any("OverflowError" in r["message"] for r in errors)
    assert [r["path"] for r in errors if r["op"] == "close"] == ["/big"]
    assert [r["path"] for r in errors if r["op"] == "open"] == [None]  # not echoed
    # The writer goes on: a later record commits, with nothing retried in a loop.
    writer.emit(Event(Op.RMDIR, SESSION, path="/after"))
    wait_until(lambda: any(r["path"] == "/after" for r in rows(path)))


def test_a_poison_durable_record_fails_its_client_and_leaves_an_error_row(
    journal: tuple[Path, JournalWriter],
) -> None:
    path, writer = journal
    close = Event(
        Op.CLOSE,
        SESSION,
        path="/v.mp4",
        bytes_written=2**64,
        upload=UploadState.COMPLETE,
    )

    async def upload() -> None:
        writer.emit(Event(Op.OPEN, SESSION, path="/v.mp4"))
        await writer.emit_durable(close)

    with pytest.raises(JournalUnavailable, match="not journaled: OverflowError"):
        asyncio.run(upload())
    wait_until(lambda: len(rows(path)) == 2)
    assert [(r["op"], r["status"]) for r in rows(path)] == [
        ("open", "ok"),
        ("close", STATUS_SET_ASIDE),
    ]
    assert rows(path, "SELECT * FROM uploads") == []


def test_a_record_that_breaks_a_job_rule_does_not_block_newer_uploads(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"

    def on_upload(final: str, event: Event) -> JobSpec | None:
        if "poison" in final:
            raise ValueError("a rule that cannot take this upload")
        return None

    writer = JournalWriter(path, on_upload=on_upload, durable_timeout=5)
    writer.start()

    async def uploads() -> list[str]:
        outcomes = []
        for name in ("/a.mp4", "/poison.mp4", "/b.mp4"):
            close = Event(
                Op.CLOSE, SESSION, path=name, bytes_written=1, upload=UploadState.COMPLETE
            )
            try:
                await writer.emit_durable(close)
                outcomes.append("ok")
            except JournalUnavailable:
                outcomes.append("failed")
        return outcomes

    try:
        assert asyncio.run(uploads()) == ["ok", "failed", "ok"]
    finally:
        writer.close()
    assert [r["path"] for r in rows(path, "SELECT path FROM uploads ORDER BY id")] == [
        "/a.mp4",
        "/b.mp4",
    ]


@pytest.fixture
def locked(journal: tuple[Path, JournalWriter]) -> Iterator[sqlite3.Connection]:
    """A second connection holding the journal's write lock (BEGIN IMMEDIATE) until released."""
    path, _ = journal
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def test_emit_durable_times_out_behind_a_locked_journal_and_journals_an_error_instead(
    journal: tuple[Path, JournalWriter], locked: sqlite3.Connection
) -> None:
    path, writer = journal
    writer.emit(Event(Op.MKDIR, SESSION, path="/first"))
    wait_until(lambda: writer.queued == 0)  # taken: the writer now waits on the lock
    close = Event(Op.CLOSE, SESSION, path="/v.mp4", bytes_written=9, upload=UploadState.COMPLETE)

    async def upload() -> float:
        start = time.monotonic()
        with pytest.raises(JournalTimeout, match=r"did not commit within 0\.5 s"):
            await writer.emit_durable(close)
        return time.monotonic() - start

    assert 0.5 <= asyncio.run(upload()) < 5  # the client hears within the timeout, not 30 s
    locked.execute("ROLLBACK")  # the lock goes: the writer catches up
    wait_until(lambda: len(rows(path)) == 2)
    assert [(r["op"], r["path"], r["status"]) for r in rows(path)] == [
        ("mkdir", "/first", "ok"),
        ("close", "/v.mp4", STATUS_TIMEOUT),  # its client was told: no upload, no job
    ]
    assert rows(path, "SELECT * FROM uploads") == []


def test_a_durable_record_whose_commit_outlasts_the_timeout_is_flagged_when_it_lands(
    journal: tuple[Path, JournalWriter], locked: sqlite3.Connection
) -> None:
    path, writer = journal
    close = Event(Op.CLOSE, SESSION, path="/v.mp4", bytes_written=9, upload=UploadState.COMPLETE)

    async def upload() -> None:
        await writer.emit_durable(close)  # taken at once, then stuck on the lock

    with pytest.raises(JournalTimeout):
        asyncio.run(upload())
    locked.execute("ROLLBACK")
    wait_until(lambda: len(rows(path)) == 2)
    got = rows(path)
    assert [(r["op"], r["status"]) for r in got] == [("close", "ok"), ("close", STATUS_TIMEOUT)]
    assert "client was told it failed" in got[1]["message"]
    assert len(rows(path, "SELECT * FROM uploads")) == 1
