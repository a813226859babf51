"""journal.synchronous: full — an upload that starts a job is fsync'd before the commit
its CLOSE reply waits for.

``os.fsync`` is replaced by a recorder for the test: it notes which file each
call was for and whether that upload was already in the journal at the time.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from conftest import RunningGateway, asyncssh_login, start_gateway

real_fsync = os.fsync


class FsyncRecorder:
    """Stands in for os.fsync: records (file name, upload rows for it so far)."""

    def __init__(self, journal: Path, fail: Callable[[str], bool] = lambda name: False) -> None:
        self.journal = journal
        self.fail = fail
        self.calls: list[tuple[str, int]] = []

    def __call__(self, fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if self.fail(name):
            self.calls.append((name, -1))
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)
        self.calls.append((name, self._uploads(name)))

    def _uploads(self, name: str) -> int:
        conn = sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT count(*) FROM uploads WHERE path = ?", ("/" + name,)
            ).fetchone()
            return int(row[0])
        finally:
            conn.close()

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def _gateway(tmp: Path, keys: dict[str, Path], synchronous: str) -> RunningGateway:
    # Jobs are created (pipeline on) but never run (no workers): only the CLOSE matters here.
    extra: dict[str, Any] = {
        "journal": {"synchronous": synchronous},
        "pipeline": {"enabled": True},
        "jobs": {"workers": 0},
    }
    return start_gateway(tmp, keys, extra=extra)


@pytest.fixture
def full(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = _gateway(tmp_path, user_keys, "full")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def normal(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = _gateway(tmp_path, user_keys, "normal")
    try:
        yield running
    finally:
        running.stop()


def put(gw: RunningGateway, name: str, data: bytes = b"v" * 5000) -> None:
    client = gw.sftp("alice")
    with client.open(name, "wb") as f:
        f.write(data)
    client.close()


def jobs(gw: RunningGateway) -> list[str]:
    return [r["path"] for r in gw.rows("SELECT path FROM jobs ORDER BY id")]


def test_full_fsyncs_a_job_upload_before_its_commit_and_only_that(
    full: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = FsyncRecorder(full.config.journal_path)
    monkeypatch.setattr(os, "fsync", recorder)
    put(full, "clip.mp4")
    # Synced once, when its upload row did not exist yet; committed (with its job) by the reply.
    assert recorder.calls == [("clip.mp4", 0)]
    assert jobs(full) == ["/clip.mp4"]
    put(full, "notes.txt")  # starts no job: nothing waits for the disk
    assert recorder.names() == ["clip.mp4"]


def test_full_fsyncs_a_temporary_name_at_its_close_before_the_rename_completes_it(
    full: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = FsyncRecorder(full.config.journal_path)
    monkeypatch.setattr(os, "fsync", recorder)
    client = full.sftp("alice")
    with client.open("clip.mp4.filepart", "wb") as f:
        f.write(b"v" * 5000)
    assert recorder.names() == ["clip.mp4.filepart"]
    client.posix_rename("clip.mp4.filepart", "clip.mp4")
    client.close()
    assert jobs(full) == ["/clip.mp4"]
    assert recorder.names() == ["clip.mp4.filepart"]


def test_normal_never_fsyncs_uploads(
    normal: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = FsyncRecorder(normal.config.journal_path)
    monkeypatch.setattr(os, "fsync", recorder)
    put(normal, "clip.mp4")
    assert jobs(normal) == ["/clip.mp4"]
    assert recorder.calls == []


def test_a_failed_fsync_fails_the_close_and_starts_nothing(
    full: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = FsyncRecorder(full.config.journal_path, fail=lambda name: name == "clip.mp4")
    monkeypatch.setattr(os, "fsync", recorder)

    async def upload() -> None:  # paramiko's close() ignores an error reply; asyncssh's doesn't
        async with asyncssh_login(full.port) as conn, conn.start_sftp_client() as client:
            f = await client.open("clip.mp4", "wb")
            await f.write(b"v" * 5000)
            with pytest.raises(asyncssh.SFTPFailure, match="Input/output error"):
                await f.close()

    asyncio.run(upload())
    assert recorder.names() == ["clip.mp4"]
    (close,) = full.op_rows("close")
    assert close["status"] != "ok"
    assert full.rows("SELECT * FROM uploads WHERE state = 'complete'") == []
    assert jobs(full) == []


def test_bench_figure_13_compares_full_with_normal_smoke() -> None:
    if os.geteuid() != 0:
        pytest.fail("the bench creates a system user and runs a private sshd: run as root")
    from bench.common import SMOKE
    from bench.scenarios import durability
    from bench.servers import running_servers

    with running_servers() as servers:
        (figure,) = durability.run(servers, SMOKE)
        assert not any(servers.sftpgate.home.iterdir()), "a round left files behind"
    assert figure.number == 13 and "full ÷ normal" in figure.title
    assert math.isfinite(figure.value) and figure.value > 0
    assert figure.measured.endswith("files/s")
