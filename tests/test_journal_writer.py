"""The group-commit writer: batching, durability before the reply, surviving a bad disk."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import fill, small_disk
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.journal.writer import JournalUnavailable, JournalWriter

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
