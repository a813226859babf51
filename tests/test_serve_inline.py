"""Quick filesystem calls on local homes run on the event loop; a slow one sends all to the pool.

The homes here are on the test machine's local disk (or a tmpfs), so the
gateway may run creates, small write batches and closes inline. The
filesystem layer below is the real one, wrapped only to record which thread
each call ran on; the one fault injected (a mkdir made slow, standing for ext4
waiting on its journal, which a test can't cause on demand) says so.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest
from asyncssh import SFTPAttrs
from asyncssh.channel import SSHChannel

from conftest import RunningGateway, start_gateway
from rawsftp import OPEN, READ, RawSFTP, s, u32, u64
from sftpgate.frontdoor.fsops import OpenFile, UserFS
from sftpgate.frontdoor.inline import SMALL_WRITE, InlineGuard, NotQuick
from sftpgate.frontdoor.sftp import GatewaySFTPServer
from sftpgate.frontdoor.ssh import GatewaySSHServer
from sftpgate.frontdoor.writebehind import Chunk, write_chunks
from sftpgate.sftp.constants import MAX_IO

# (call, bytes, thread name) of every recorded call, in order
calls: list[tuple[str, int, str]] = []
SLOW_MKDIR = 0.05


def _record(name: str, size: int = 0) -> None:
    calls.append((name, size, threading.current_thread().name))


class RecordingFS(UserFS):
    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs, *, quick: bool = False) -> OpenFile:
        try:
            opened = super().open(path, pflags, attrs, quick=quick)
        except NotQuick:
            _record("not quick")
            raise
        _record("open")
        return opened

    @staticmethod
    def read(f: OpenFile, offset: int, size: int) -> bytes:
        _record("read", size)
        return UserFS.read(f, offset, size)

    @staticmethod
    def read_cached(f: OpenFile, offset: int, size: int) -> bytes | None:
        data = UserFS.read_cached(f, offset, size)
        _record("cached read" if data is not None else "not cached", len(data or b""))
        return data

    @staticmethod
    def write_chunks(fd: int, chunks: list[Chunk]) -> tuple[int, OSError | None]:
        _record("write", sum(len(data) for _, data in chunks))
        return write_chunks(fd, chunks)

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        _record("mkdir")
        if path.endswith(b"slow"):
            time.sleep(SLOW_MKDIR)  # fault injection: a local disk stalling one call
        super().mkdir(path, attrs)


class Recording(GatewaySSHServer):
    def _make_sftp_server(self, chan: SSHChannel[bytes]) -> GatewaySFTPServer:
        server = super()._make_sftp_server(chan)
        server.fs.__class__ = RecordingFS
        return server


@pytest.fixture
def recorded(tmp_path: Path, user_keys: dict[str, Path]) -> Any:
    calls.clear()
    running = start_gateway(tmp_path, user_keys, server_class=Recording)
    try:
        yield running
    finally:
        running.stop()
        calls.clear()


def _pooled(thread: str) -> bool:
    return thread.startswith("fs_")  # the gateway's thread pool


def test_small_uploads_run_inline_on_a_local_home(recorded: RunningGateway) -> None:
    sftp = recorded.sftp("alice")
    for i in range(3):
        sftp.putfo(io.BytesIO(b"x" * 4096), f"small {i}.bin")
    sftp.mkdir("folder")
    assert [(name, size) for name, size, _ in calls] == [
        ("open", 0),
        ("write", 4096),
        ("open", 0),
        ("write", 4096),
        ("open", 0),
        ("write", 4096),
        ("mkdir", 0),
    ]
    assert not [c for c in calls if _pooled(c[2])], calls
    for i in range(3):
        assert (recorded.home("alice") / f"small {i}.bin").read_bytes() == b"x" * 4096
    rows = recorded.wait_rows(lambda r: sum(x["op"] == "close" for x in r) == 3)
    assert [r["bytes_written"] for r in rows if r["op"] == "close"] == [4096] * 3


def test_writes_of_bigger_files_stay_in_the_pool(recorded: RunningGateway) -> None:
    sftp = recorded.sftp("alice")
    payload = bytes(range(256)) * 4096 * 2  # 2 MiB
    sftp.putfo(io.BytesIO(payload), "big.bin")
    writes = [c for c in calls if c[0] == "write"]
    assert sum(size for _, size, _ in writes) == len(payload)
    # inline only while the file is still small; then everything in the pool
    done = 0
    for _, size, thread in writes:
        done += size
        assert _pooled(thread) == (done > SMALL_WRITE), writes
    assert (recorded.home("alice") / "big.bin").read_bytes() == payload


def test_nothing_runs_inline_when_turned_off(tmp_path: Path, user_keys: dict[str, Path]) -> None:
    calls.clear()
    running = start_gateway(
        tmp_path,
        user_keys,
        extra={"server": {"inline_local_changes": False}},
        server_class=Recording,
    )
    try:
        sftp = running.sftp("alice")
        sftp.putfo(io.BytesIO(b"x" * 4096), "small.bin")
        sftp.mkdir("folder")
        assert [c[0] for c in calls] == ["open", "write", "mkdir"]
        assert all(_pooled(thread) for _, _, thread in calls), calls
    finally:
        running.stop()
        calls.clear()


def test_a_slow_inline_call_sends_every_call_to_the_pool_for_a_while(
    recorded: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    guard = recorded.gateway.inline_guard
    assert guard.first_cooldown == 1.0
    alice = recorded.sftp("alice")
    bob: paramiko.SFTPClient = recorded.sftp("bob", key=True)
    with caplog.at_level(logging.WARNING, logger="sftpgate.frontdoor.inline"):
        alice.mkdir("slow")  # held the loop once, for SLOW_MKDIR
    assert guard.trips == 1
    assert "mkdir took" in caplog.text and "thread pool for the next 1 s" in caplog.text
    calls.clear()
    bob.putfo(io.BytesIO(b"b" * 4096), "during.bin")  # another user: the guard is shared
    alice.mkdir("quick")
    assert [c[0] for c in calls] == ["open", "write", "mkdir"]
    assert all(_pooled(thread) for _, _, thread in calls), calls

    time.sleep(guard.first_cooldown)
    calls.clear()
    alice.mkdir("after")
    assert [(c[0], _pooled(c[2])) for c in calls] == [("mkdir", False)]
    assert guard.trips == 1
    assert (recorded.home("alice") / "slow").is_dir()
    assert (recorded.home("bob") / "during.bin").read_bytes() == b"b" * 4096


def test_the_guard_trips_on_slow_calls_that_waited() -> None:
    # The guard's clock and wait counter, driven by hand.
    now, slept = [100.0], [0]
    guard = InlineGuard(
        slow=0.002, first_cooldown=1, cooldown=30, clock=lambda: now[0], waits=lambda: slept[0]
    )
    assert guard.allowed()
    before = guard.start()
    now[0] += 0.0015
    slept[0] += 1
    guard.observe(before, "open")  # quick, even though it slept
    assert guard.allowed() and guard.trips == 0
    before = guard.start()
    now[0] += 0.01
    guard.observe(before, "open")  # slow, but never slept: another process had the CPU
    assert guard.allowed() and guard.trips == 0
    before = guard.start()
    now[0] += 0.01
    slept[0] += 1
    guard.observe(before, "open")  # slow and waited: a busy disk
    assert not guard.allowed() and guard.trips == 1
    now[0] += 0.9
    assert not guard.allowed()
    now[0] += 0.2
    assert guard.allowed()


def _slow_call(guard: InlineGuard, now: list[float], slept: list[int]) -> float:
    """One slow call that waited; how long inline calls are then off."""
    before = guard.start()
    now[0] += 0.01
    slept[0] += 1
    guard.observe(before, "create")
    off = 0.0
    while not guard.allowed():
        now[0] += 0.5
        off += 0.5
    return off


def test_a_disk_that_stays_busy_keeps_calls_in_the_pool_longer_each_time() -> None:
    now, slept = [100.0], [0]
    guard = InlineGuard(
        slow=0.002, first_cooldown=1, cooldown=30, clock=lambda: now[0], waits=lambda: slept[0]
    )
    # Each slow call comes right after the last cooldown: 1, 2, 4, ... up to 30 s.
    assert [_slow_call(guard, now, slept) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    # A slow call long after the last cooldown ended is a new episode: 1 s again.
    now[0] += 31
    assert _slow_call(guard, now, slept) == 1
    assert guard.trips == 8


def test_truncating_a_big_file_runs_in_the_pool(recorded: RunningGateway) -> None:
    # Opening with truncation frees the old data's blocks: slow for a big file.
    big = recorded.home("alice") / "video.mp4"
    big.write_bytes(b"v" * (SMALL_WRITE + 1))
    small = recorded.home("alice") / "note.txt"
    small.write_bytes(b"n" * 100)
    sftp = recorded.sftp("alice")
    sftp.putfo(io.BytesIO(b"new"), "video.mp4")  # paramiko opens with TRUNC
    sftp.putfo(io.BytesIO(b"new"), "note.txt")
    opens = [(name, _pooled(thread)) for name, _, thread in calls if name != "write"]
    # The inline open of the big file stops before truncating; the pool does it.
    assert opens == [("not quick", False), ("open", True), ("open", False)]
    assert big.read_bytes() == b"new" and small.read_bytes() == b"new"
    rows = recorded.wait_rows(lambda r: sum(x["op"] == "close" for x in r) == 2)
    assert [(r["op"], r["path"], r["status"]) for r in rows if r["op"] == "open"] == [
        ("open", "/video.mp4", "ok"),
        ("open", "/note.txt", "ok"),
    ]


def test_reads_the_page_cache_holds_are_answered_on_the_loop_the_rest_in_the_pool(
    recorded: RunningGateway,
) -> None:
    payload = os.urandom(300_000)
    path = recorded.home("alice") / "cached.bin"
    path.write_bytes(payload)  # just written: in the page cache
    sftp = recorded.sftp("alice")
    calls.clear()
    assert sftp.open("cached.bin").read() == payload
    cached = [c for c in calls if c[0] == "cached read"]
    assert sum(size for _, size, _ in cached) == len(payload)
    assert not [c for c in cached if _pooled(c[2])], calls
    # Out of the cache: the same reads go to the pool (RWF_NOWAIT said EAGAIN).
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    calls.clear()
    assert sftp.open("cached.bin").read() == payload
    pooled = [c for c in calls if c[0] == "read" and _pooled(c[2])]
    assert pooled, calls
    rows = recorded.wait_rows(lambda r: sum(x["op"] == "close" for x in r) >= 2)
    assert [r["bytes_read"] for r in rows if r["op"] == "close"][-2:] == [len(payload)] * 2


def test_a_read_longer_than_the_limit_gets_the_limit(recorded: RunningGateway) -> None:
    # Nothing may make the gateway allocate what a client asks for: 1 GiB here.
    (recorded.home("alice") / "big.bin").write_bytes(b"z" * (MAX_IO * 2))
    raw = RawSFTP(recorded.transport("alice"))
    kind, body = raw.request(OPEN, s(b"/big.bin"), u32(1), u32(0))
    assert kind == 102  # HANDLE
    handle = body[4 : 4 + struct.unpack_from(">I", body)[0]]
    kind, body = raw.request(READ, s(handle), u64(0), u32(1 << 30))
    assert kind == 103  # DATA
    assert struct.unpack_from(">I", body)[0] == MAX_IO
