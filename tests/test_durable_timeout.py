"""`serve` never hangs a CLOSE on a journal that does not commit.

The stall is real: a second SQLite connection holds the journal's write lock
(BEGIN IMMEDIATE), so the writer waits in its own BEGIN (busy timeout 30 s,
far past ``journal.durable_timeout`` here).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from conftest import RunningGateway, asyncssh_login, start_gateway


async def upload(port: int, name: str) -> None:
    """Upload as alice with asyncssh, whose CLOSE raises the server's failure.

    (paramiko's file close swallows a failed CLOSE reply.)
    """
    async with (
        asyncssh_login(port) as conn,
        conn.start_sftp_client() as sftp,
        sftp.open(name, "wb") as f,
    ):
        await f.write(b"v" * 70_000)


@pytest.fixture
def site(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    extra = {
        "journal": {"durable_timeout": 0.5},
        "pipeline": {"enabled": True},  # an *.mp4 upload starts a job: its CLOSE is durable
        "jobs": {"workers": 0},  # jobs stay queued; their rows are what we check
    }
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        yield running
    finally:
        running.stop()


def test_a_close_behind_a_locked_journal_fails_clearly_and_is_journaled_as_an_error(
    site: RunningGateway,
) -> None:
    client = site.sftp("alice")
    site.op_rows("login")
    writer = site.gateway.writer
    assert writer is not None
    lock = sqlite3.connect(site.config.journal_path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        client.mkdir("first")
        deadline = time.monotonic() + 10
        while writer.queued:  # the writer took the mkdir and now waits on the lock
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(asyncssh.SFTPFailure, match="upload not recorded, try again"):
            asyncio.run(upload(site.port, "late.mp4"))
        assert time.monotonic() - start < 5  # the timeout, not the lock's 30 s
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()

    rows = site.wait_rows(lambda rs: any(r["status"] == "journal_timeout" for r in rs))
    (error,) = [r for r in rows if r["status"] == "journal_timeout"]
    assert (error["op"], error["path"], error["login"]) == ("close", "/late.mp4", "alice")
    assert "client was told it failed" in error["message"]
    assert site.rows("SELECT * FROM uploads") == []  # told it failed: no upload, no job
    assert site.rows("SELECT * FROM jobs") == []

    asyncio.run(upload(site.port, "again.mp4"))  # the journal is back: OK means a job
    assert [j["path"] for j in site.rows("SELECT path FROM jobs")] == ["/again.mp4"]
