"""Write-behind: WRITE replies don't wait for the disk, but nothing is promised falsely.

The full-disk cases use a real full disk: a small tmpfs mounted over alice's
home (the suite runs as root, as CI does).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from conftest import RunningGateway, asyncssh_login, small_disk, start_gateway
from sftpgate.frontdoor.writebehind import WriteBudget, WriteQueue, coalesce, write_chunks

# -- the batch writer ----------------------------------------------------------


def test_coalesce_joins_contiguous_runs_and_keeps_order() -> None:
    chunks = [(0, b"ab"), (2, b"cd"), (10, b"x"), (11, b"y"), (0, b"Z")]
    assert coalesce(chunks) == [(0, [b"ab", b"cd"]), (10, [b"x", b"y"]), (0, [b"Z"])]
    assert coalesce([]) == []


def test_write_chunks_writes_more_buffers_than_one_pwritev_takes(tmp_path: Path) -> None:
    # 3,000 contiguous 100-byte chunks: three pwritev calls (IOV_MAX is 1024),
    # then an overlapping rewrite at offset 5 that must land last.
    data = [bytes([i % 251]) * 100 for i in range(3000)]
    chunks = [(i * 100, d) for i, d in enumerate(data)] + [(5, b"LAST")]
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        written, error = write_chunks(fd, chunks)
    finally:
        os.close(fd)
    assert error is None
    assert written == 300_000 + 4
    expected = bytearray(b"".join(data))
    expected[5:9] = b"LAST"
    assert path.read_bytes() == bytes(expected)


def test_write_chunks_reports_what_it_wrote_before_the_error(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        written, error = write_chunks(fd, [(0, b"abc")])
    finally:
        os.close(fd)
    assert written == 0
    assert isinstance(error, OSError)


# -- through the gateway ------------------------------------------------------


@pytest.fixture
def full_disk_home(tmp_path: Path) -> Iterator[Path]:
    """alice's home on a 64 KiB tmpfs."""
    with small_disk(tmp_path / "homes" / "alice", "64k") as home:
        yield home


async def _write_then_close(port: int, path: str, data: bytes) -> str:
    """One WRITE (asyncssh sends it whole; raises unless answered OK), then CLOSE's error."""
    async with (
        asyncssh_login(port) as conn,
        conn.start_sftp_client() as sftp,
    ):
        f = await sftp.open(path, "wb")
        await f.write(data)
        try:
            await f.close()
        except asyncssh.SFTPError as exc:
            return str(exc.reason)
        return ""


def test_a_write_that_fails_after_its_ok_reply_fails_the_close(
    tmp_path: Path, user_keys: dict[str, Path], full_disk_home: Path
) -> None:
    running = start_gateway(tmp_path, user_keys, users={"alice": {"home": str(full_disk_home)}})
    try:
        data = os.urandom(200 * 1024)  # one 200 KiB WRITE onto a 64 KiB disk
        close_error = asyncio.run(_write_then_close(running.port, "big.mp4", data))

        # The WRITE was answered OK before the disk said no; the CLOSE carries the
        # failure (asyncssh lowers the code to FX_FAILURE for SFTP v3 clients).
        assert close_error == "No space left on filesystem"  # sftp-server's words
        rows = running.wait_rows(lambda rs: any(r["op"] == "close" for r in rs))
        writes = [r for r in rows if r["op"] == "write"]
        close = next(r for r in rows if r["op"] == "close")
        assert [w["status"] for w in writes] == ["no_space_on_filesystem"]
        assert close["status"] == "no_space_on_filesystem"
        assert running.rows("SELECT * FROM uploads") == []  # no job could start from it
        assert close["message"].startswith("write failed: ")
        assert 0 < close["bytes_written"] < len(data)

        # The gateway keeps serving: make room, upload again, all of it arrives.
        sftp = running.sftp("alice")
        sftp.remove("big.mp4")
        sftp.putfo(io.BytesIO(b"s" * 4096), "small.mp4")
        assert (full_disk_home / "small.mp4").read_bytes() == b"s" * 4096
    finally:
        running.stop()


def test_a_pipelined_upload_onto_a_full_disk_is_an_error_for_the_client(
    tmp_path: Path, user_keys: dict[str, Path], full_disk_home: Path
) -> None:
    running = start_gateway(tmp_path, user_keys, users={"alice": {"home": str(full_disk_home)}})
    try:
        sftp = running.sftp("alice")
        with pytest.raises(OSError):  # paramiko raises on the first bad reply it reads
            sftp.putfo(io.BytesIO(os.urandom(1024 * 1024)), "big.mp4")
        close = running.op_rows("close")[0]
        assert running.rows("SELECT * FROM uploads") == []
        assert close["message"].startswith("write failed: ")
        assert any(
            r["op"] == "write" and r["status"] == "no_space_on_filesystem" for r in running.rows()
        )
    finally:
        running.stop()


def test_a_path_request_sees_every_write_answered_before_it(gateway: RunningGateway) -> None:
    sftp = gateway.sftp("alice")
    data = os.urandom(3 * 1024 * 1024)
    with sftp.open("growing.bin", "wb") as f:
        f.set_pipelined(True)  # replies are not read until the STAT below
        for start in range(0, len(data), 32768):
            f.write(data[start : start + 32768])
        # Same session, handle still open: STAT by path and FSTAT both see it all.
        assert sftp.stat("growing.bin").st_size == len(data)
        assert f.stat().st_size == len(data)
    assert (gateway.home("alice") / "growing.bin").read_bytes() == data


def test_reads_on_a_read_write_handle_see_queued_writes(gateway: RunningGateway) -> None:
    sftp = gateway.sftp("alice")
    with sftp.open("rw.bin", "w+") as f:
        f.write(b"hello world")
        f.seek(0)
        assert f.read(11) == b"hello world"


def test_a_write_on_a_read_only_handle_is_refused(gateway: RunningGateway) -> None:
    (gateway.home("alice") / "ro.bin").write_bytes(b"keep")

    async def write_read_only() -> None:
        # paramiko refuses this itself; asyncssh's client sends the WRITE.
        async with (
            asyncssh_login(gateway.port) as conn,
            conn.start_sftp_client() as sftp,
            sftp.open("ro.bin", "rb") as f,
        ):
            await f.write(b"nope")

    with pytest.raises(asyncssh.SFTPError):
        asyncio.run(write_read_only())
    assert (gateway.home("alice") / "ro.bin").read_bytes() == b"keep"
    write = next(r for r in gateway.op_rows("write"))
    assert write["status"] == "failure"


def test_a_small_write_reaches_the_disk_without_waiting_for_the_close(
    gateway: RunningGateway,
) -> None:
    # Under 256 KiB waits briefly for more or for the CLOSE, never indefinitely.
    sftp = gateway.sftp("alice")
    local = gateway.home("alice") / "idle.bin"
    with sftp.open("idle.bin", "wb") as f:
        f.write(b"z" * 4096)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and local.stat().st_size < 4096:
            time.sleep(0.01)
        assert local.read_bytes() == b"z" * 4096  # the handle is still open


def test_a_write_past_the_bound_waits_for_a_batch_not_the_whole_queue(tmp_path: Path) -> None:
    path = tmp_path / "bounded"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    data = [os.urandom(16384) for _ in range(200)]
    peaks: list[int] = []

    async def upload() -> None:
        loop = asyncio.get_running_loop()

        async def run_io(fn: Any, *args: Any) -> Any:
            return await loop.run_in_executor(None, fn, *args)

        queue = WriteQueue(fd, run_io, WriteBudget(1 << 30), per_handle_limit=65536)
        for i, chunk in enumerate(data):
            await queue.add(i * 16384, chunk)
            peaks.append(queue._queued)
        assert await queue.close() is None
        assert queue.written == 200 * 16384 and queue.error is None

    asyncio.run(upload())
    assert max(peaks) <= 65536  # never more than the bound once add() returns
    assert any(p > 0 for p in peaks)  # ...and writes did queue: it is not write-through
    assert path.read_bytes() == b"".join(data)
