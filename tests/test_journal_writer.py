"""The group-commit writer: batching, durability before the reply, surviving a bad disk."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import fill, small_disk
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.journal.store import connect, record_batch
from sftpgate.journal.writer import JournalUnavailable, JournalWriter
from sftpgate.storage.ports import JobSpec

SESSION = SessionInfo(id="s1", remote_addr="127.0.0.1", remote_port=5000, login="alice")


def count(path: Path, table: str = "operations") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
    finally:
        conn.close()


def test_many_events_are_committed_in_few_batches(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "j.sqlite3", synchronous="full")
    writer.start()
    for i in range(5000):
        writer.emit(Event(Op.STAT, SESSION, path=f"/f{i}"))
    writer.close()
    assert count(tmp_path / "j.sqlite3") == 5000
    assert writer.committed == 5000
    assert writer.batches < 100, "events should be group-committed, not one commit each"


def test_a_durable_emit_commits_at_once_with_the_plain_events_before_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite3"
    writer = JournalWriter(path, interval=600)  # plain records alone would wait 10 minutes
    writer.start()

    async def session() -> None:
        writer.emit(Event(Op.OPEN, SESSION, path="/v.mp4"))
        close = Event(
            Op.CLOSE, SESSION, path="/v.mp4", bytes_written=1, upload=UploadState.COMPLETE
        )
        await asyncio.wait_for(writer.emit_durable(close), 10)

    try:
        asyncio.run(session())
        conn = sqlite3.connect(path)
        try:
            ops = [r[0] for r in conn.execute("SELECT op FROM operations ORDER BY id")]
        finally:
            conn.close()
        assert ops == ["open", "close"]  # one batch, in emission order
    finally:
        writer.close()


def test_a_lone_plain_event_is_committed_after_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    writer = JournalWriter(path, interval=0.05)
    writer.start()
    try:
        writer.emit(Event(Op.MKDIR, SESSION, path="/d"))  # wakes the idle writer
        deadline = time.monotonic() + 10
        while count(path) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count(path) == 1
        writer.emit(Event(Op.RMDIR, SESSION, path="/d"))  # and again, once it slept again
        while count(path) == 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count(path) == 2
    finally:
        writer.close()


def test_close_commits_what_is_queued_without_waiting_for_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    writer = JournalWriter(path, interval=600)
    writer.start()
    for i in range(10):
        writer.emit(Event(Op.STAT, SESSION, path=f"/f{i}"))
    writer.close(timeout=10)
    assert count(path) == 10


def test_emit_durable_returns_only_after_the_row_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    writer = JournalWriter(path)
    writer.start()

    async def upload() -> int:
        await writer.emit_durable(
            Event(Op.CLOSE, SESSION, path="/v.mp4", bytes_written=10, upload=UploadState.COMPLETE)
        )
        return count(path, "uploads")  # read by another connection, right after

    try:
        assert asyncio.run(upload()) == 1
    finally:
        writer.close()


def test_a_full_disk_fails_durable_emits_and_loses_no_plain_record(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        path = disk / "j.sqlite3"
        writer = JournalWriter(path, interval=0.01)
        writer.start()
        try:
            filler = fill(disk)  # a real full disk, under the running writer
            for i in range(3000):
                writer.emit(Event(Op.STAT, SESSION, path=f"/{'x' * 200}/{i}"))

            async def upload() -> None:
                close = Event(
                    Op.CLOSE, SESSION, path="/v.mp4", bytes_written=1, upload=UploadState.COMPLETE
                )
                await asyncio.wait_for(writer.emit_durable(close), 10)

            with pytest.raises(JournalUnavailable, match="full"):
                asyncio.run(upload())  # that client is told: its upload is not recorded
            filler.unlink()  # room again: the writer's retries get the plain records in
            deadline = time.monotonic() + 30
            while writer.committed < 3000 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            writer.close()
        assert count(path) == 3000
        assert count(path, "uploads") == 0


def test_a_failing_database_fails_durable_emits_instead_of_hanging(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    writer = JournalWriter(path)
    writer.start()
    # Fault injection: a schema broken under the writer (the full-disk case is
    # the test above, on a real full disk).
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE uploads")
    conn.commit()
    conn.close()

    async def upload() -> None:
        await asyncio.wait_for(
            writer.emit_durable(
                Event(
                    Op.CLOSE, SESSION, path="/v.mp4", bytes_written=1, upload=UploadState.COMPLETE
                )
            ),
            10,
        )

    try:
        with pytest.raises(JournalUnavailable):
            asyncio.run(upload())
        writer.emit(Event(Op.MKDIR, SESSION, path="/still-journaled"))
    finally:
        writer.close()
    assert count(path) >= 1


def test_a_batch_numbers_its_rows_and_links_each_upload_to_its_close(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    conn = connect(path)
    hooked: list[str] = []

    def rule(final: str, event: Event) -> JobSpec | None:
        # Pure: told each complete upload's final name; the store writes the job.
        hooked.append(final)
        return JobSpec(max_attempts=3) if final == "/c.mp4" else None

    other = SessionInfo(id="s2", remote_addr="127.0.0.1", remote_port=5001, login="bob")
    first = [
        Event(Op.LOGIN, SESSION),
        Event(Op.OPEN, SESSION, path="/a.mp4"),
        Event(Op.CLOSE, SESSION, path="/a.mp4", bytes_written=5, upload=UploadState.COMPLETE),
        Event(Op.CLOSE, other, path="/b.mp4", bytes_written=2, upload=UploadState.INCOMPLETE),
        Event(Op.MKDIR, SESSION, path="/dir", key="k1"),
    ]
    second = [
        Event(Op.MKDIR, SESSION, path="/dir", key="k1"),  # delivered twice: skipped
        Event(Op.RENAME, other, path="/c.part", path2="/c.mp4", upload=UploadState.COMPLETE),
        Event(Op.LOGOUT, SESSION),
    ]
    try:
        assert record_batch(conn, first, rule).jobs == ()
        started = record_batch(conn, second, rule).jobs
        jobs = [(r["id"], r["upload_id"], r["path"]) for r in conn.execute("SELECT * FROM jobs")]
        ops = [
            (r["id"], r["op"], r["path"])
            for r in conn.execute("SELECT id, op, path FROM operations ORDER BY id")
        ]
        uploads = [
            (r["id"], r["path"], r["state"], r["operation_id"])
            for r in conn.execute("SELECT * FROM uploads ORDER BY id")
        ]
        sessions = [
            (r["id"], r["ended_at"] is not None) for r in conn.execute("SELECT * FROM sessions")
        ]
    finally:
        conn.close()
    assert ops == [
        (1, "login", None),
        (2, "open", "/a.mp4"),
        (3, "close", "/a.mp4"),
        (4, "close", "/b.mp4"),
        (5, "mkdir", "/dir"),
        (6, "rename", "/c.part"),
        (7, "logout", None),
    ]
    assert uploads == [
        (1, "/a.mp4", "complete", 3),
        (2, "/b.mp4", "incomplete", 4),
        (3, "/c.mp4", "complete", 6),  # a rename's upload has the new name
    ]
    assert hooked == ["/a.mp4", "/c.mp4"]
    assert jobs == [(started[0], 3, "/c.mp4")]  # committed with its upload
    assert sessions == [("s1", True)]


@pytest.mark.parametrize("size", [1, 3, 4, 63, 64, 65, 150, 300])
def test_a_batch_of_any_size_goes_in_whole_through_a_few_statements(
    tmp_path: Path, size: int
) -> None:
    # Rows go in by multi-row INSERTs of 64, 16, 4 and 1 rows: every size
    # must come out whole, in order, each upload linked to its own close.
    conn = connect(tmp_path / "j.sqlite3")
    statements: list[str] = []
    events = [
        Event(
            Op.CLOSE,
            SESSION,
            path=f"/f{i}.bin",
            bytes_written=i,
            upload=UploadState.COMPLETE if i % 3 == 0 else None,
        )
        for i in range(size)
    ]
    try:
        record_batch(conn, [Event(Op.OPEN, SESSION, path="/before")])
        conn.set_trace_callback(statements.append)
        record_batch(conn, events)
        conn.set_trace_callback(None)
        ops = [
            (r["id"], r["path"], r["bytes_written"])
            for r in conn.execute("SELECT * FROM operations WHERE id > 1 ORDER BY id")
        ]
        uploads = [
            (r["path"], r["bytes"], r["operation_id"])
            for r in conn.execute("SELECT * FROM uploads ORDER BY id")
        ]
    finally:
        conn.close()
    assert ops == [(i + 2, f"/f{i}.bin", i) for i in range(size)]
    assert uploads == [(f"/f{i}.bin", i, i + 2) for i in range(0, size, 3)]
    inserts = [s for s in statements if s.lstrip().startswith("INSERT INTO operations")]
    # 64s, then at most three each of 16, 4 and 1
    assert len(inserts) == size // 64 + (size % 64) // 16 + (size % 16) // 4 + size % 4


def test_after_commit_runs_only_for_a_commit_that_started_jobs(tmp_path: Path) -> None:
    # The hook wakes the workers: a commit of plain records must not wake them.
    woken: list[int] = []
    writer = JournalWriter(
        tmp_path / "j.sqlite3",
        interval=0.01,
        on_upload=lambda path, event: JobSpec(max_attempts=3) if path.endswith(".mp4") else None,
        after_commit=lambda: woken.append(writer.batches),
    )
    writer.start()

    async def emit() -> None:
        await writer.emit_durable(Event(Op.MKDIR, SESSION, path="/plain"))
        await writer.emit_durable(
            Event(Op.CLOSE, SESSION, path="/a.txt", bytes_written=1, upload=UploadState.COMPLETE)
        )
        assert woken == []  # an upload no rule wants starts nothing
        await writer.emit_durable(
            Event(Op.CLOSE, SESSION, path="/v.mp4", bytes_written=1, upload=UploadState.COMPLETE)
        )

    try:
        asyncio.run(emit())
    finally:
        writer.close()
    assert len(woken) == 1
