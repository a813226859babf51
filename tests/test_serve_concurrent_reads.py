"""Requests of one session overlap: several preads in flight, replies in completion order.

READs run beside READs, stats and requests about other handles (order.py);
what depends on them keeps its order: a WRITE of a READ's handle, and a
request that runs alone (a CLOSE right behind many READs is answered after
them, with their bytes). Fault injection: alice's filesystem layer is replaced by one
whose ``read`` blocks until the test opens a gate, so the test can see how many
reads are in the pool at once. The clients are real (OpenSSH, paramiko,
asyncssh) and the files are dropped from the page cache, so reads go to the pool.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncssh.channel import SSHChannel

from conftest import RunningGateway, asyncssh_login, need_tool, start_gateway
from rawsftp import (
    CLOSE,
    MKDIR,
    OPEN,
    READ,
    STAT,
    WRITE,
    WRITE_CREATE_TRUNC,
    RawSFTP,
    s,
    u32,
    u64,
)
from sftpgate.frontdoor.fsops import OpenFile, UserFS
from sftpgate.frontdoor.handler import IN_FLIGHT as MAX_READS
from sftpgate.frontdoor.sftp import GatewaySFTPServer
from sftpgate.frontdoor.ssh import GatewaySSHServer

CHUNK = 128 * 1024  # above what is answered on the loop from the page cache: to the pool
DATA, STATUS, ATTRS, HANDLE = 103, 101, 105, 102


class Gate:
    """How many reads are in the pool at once; they wait until ``opened``."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.now = 0
        self.most = 0
        self.done = 0
        self.opened = threading.Event()

    def enter(self) -> None:
        with self.cond:
            self.now += 1
            self.most = max(self.most, self.now)
            self.cond.notify_all()
        self.opened.wait(30)

    def leave(self) -> None:
        with self.cond:
            self.now -= 1
            self.done += 1
            self.cond.notify_all()

    def wait_for(self, what: str, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: getattr(self, what) >= n, 10), (what, vars(self))


gate = Gate()


class GatedFS(UserFS):
    @staticmethod
    def read(f: OpenFile, offset: int, size: int) -> bytes:
        gate.enter()
        try:
            return UserFS.read(f, offset, size)
        finally:
            gate.leave()


channels: list[SSHChannel[bytes]] = []


class GatedForAlice(GatewaySSHServer):
    def _make_sftp_server(self, chan: SSHChannel[bytes]) -> GatewaySFTPServer:
        server = super()._make_sftp_server(chan)
        if server.ctx.user.login == "alice":
            server.fs.__class__ = GatedFS
            channels.append(chan)
        return server


@pytest.fixture
def gated(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    global gate
    gate = Gate()
    channels.clear()
    # Metadata calls in the pool, as on NFS: a STAT waits there too.
    extra = {"server": {"inline_local_metadata": False}}
    running = start_gateway(tmp_path, user_keys, server_class=GatedForAlice, extra=extra)
    try:
        yield running
    finally:
        gate.opened.set()
        running.stop()


def _open(raw: RawSFTP, path: bytes) -> bytes:
    kind, body = raw.request(OPEN, s(path), u32(1), u32(0))
    assert kind == HANDLE, body
    return body[4 : 4 + struct.unpack_from(">I", body)[0]]


def _replies(raw: RawSFTP, n: int) -> list[tuple[int, int, bytes]]:
    return [raw.reply() for _ in range(n)]


def test_reads_of_one_session_run_in_the_pool_at_once(gated: RunningGateway) -> None:
    payload = os.urandom(CHUNK * 12)
    (gated.home("alice") / "a.bin").write_bytes(payload)
    (gated.home("alice") / "b.bin").write_bytes(payload[::-1])
    raw = RawSFTP(gated.transport("alice"))
    a, b = _open(raw, b"/a.bin"), _open(raw, b"/b.bin")
    asked: dict[int, tuple[bytes, int]] = {}
    wire = b""
    for n in range(12):  # more than the cap, on two handles
        handle, want = (a, payload) if n % 2 else (b, payload[::-1])
        pktid, data = raw.framed(READ, s(handle), u64(n * CHUNK), u32(CHUNK))
        asked[pktid] = (handle, n)
        wire += data
    close_id, close = raw.framed(CLOSE, s(a))
    raw.chan.sendall(wire + close)

    gate.wait_for("most", MAX_READS)  # one at a time before: this timed out
    gate.opened.set()
    replies = _replies(raw, 13)
    assert gate.most == MAX_READS  # the cap holds
    assert [pktid for _, pktid, _ in replies[-1:]] == [close_id]  # the CLOSE waited for them
    assert replies[-1][0] == STATUS and struct.unpack_from(">I", replies[-1][2])[0] == 0
    got = {pktid: (kind, body) for kind, pktid, body in replies[:-1]}
    assert sorted(got) == sorted(asked)
    for pktid, (handle, n) in asked.items():
        kind, body = got[pktid]
        want = payload if handle == a else payload[::-1]
        assert kind == DATA
        assert body[4:] == want[n * CHUNK : (n + 1) * CHUNK]

    kind, _ = raw.request(CLOSE, s(b))
    assert kind == STATUS
    rows = gated.wait_rows(lambda rs: sum(r["op"] == "close" for r in rs) >= 2)
    closed = {r["path"]: r["bytes_read"] for r in rows if r["op"] == "close"}
    assert closed == {"/a.bin": 6 * CHUNK, "/b.bin": 6 * CHUNK}


def test_a_request_that_runs_alone_waits_for_reads(gated: RunningGateway) -> None:
    (gated.home("alice") / "a.bin").write_bytes(b"a" * CHUNK * MAX_READS)
    raw = RawSFTP(gated.transport("alice"))
    a = _open(raw, b"/a.bin")
    wire = b""
    for n in range(MAX_READS):
        wire += raw.framed(READ, s(a), u64(n * CHUNK), u32(CHUNK))[1]
    mkdir_id, mkdir = raw.framed(MKDIR, s(b"/d"), u32(0))
    read_id, read = raw.framed(READ, s(a), u64(0), u32(CHUNK))
    raw.chan.sendall(wire + mkdir + read)
    gate.wait_for("now", MAX_READS)
    gate.opened.set()
    order = [(kind, pktid) for kind, pktid, _ in _replies(raw, MAX_READS + 2)]
    # The MKDIR after the READs; the READ after it only once the MKDIR is done.
    assert order[MAX_READS:] == [(STATUS, mkdir_id), (DATA, read_id)]


def test_stats_and_other_handles_go_on_beside_a_waiting_read(gated: RunningGateway) -> None:
    (gated.home("alice") / "a.bin").write_bytes(b"a" * CHUNK)
    raw = RawSFTP(gated.transport("alice"))
    a = _open(raw, b"/a.bin")
    kind, body = raw.request(OPEN, s(b"/b.bin"), u32(WRITE_CREATE_TRUNC), u32(0))
    assert kind == HANDLE
    b = body[4:]
    read_id, read = raw.framed(READ, s(a), u64(0), u32(CHUNK))
    stat_id, stat = raw.framed(STAT, s(b"/a.bin"))  # in the pool (inline metadata off)
    write_b_id, write_b = raw.framed(WRITE, s(b), u64(0), s(b"bee"))
    raw.chan.sendall(read + stat + write_b)
    gate.wait_for("now", 1)
    # The READ waits in the pool; the STAT and another handle's WRITE are answered.
    first = _replies(raw, 2)
    assert sorted((kind, pktid) for kind, pktid, _ in first) == [
        (STATUS, write_b_id),
        (ATTRS, stat_id),
    ]
    assert gate.now == 1 and gate.done == 0
    # A WRITE of the READ's own handle waits for it, and the STAT behind it too.
    write_a_id, write_a = raw.framed(WRITE, s(a), u64(0), s(b"x"))
    stat2_id, stat2 = raw.framed(STAT, s(b"/b.bin"))
    raw.chan.sendall(write_a + stat2)
    gate.opened.set()
    rest = [(kind, pktid) for kind, pktid, _ in _replies(raw, 3)]
    assert rest[0] == (DATA, read_id)
    assert rest[1:] == [(STATUS, write_a_id), (ATTRS, stat2_id)]


def test_a_session_cut_off_mid_download_leaves_no_descriptor(gated: RunningGateway) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    (gated.home("alice") / "a.bin").write_bytes(b"a" * CHUNK * 20)
    warm = gated.sftp("alice")
    warm.listdir(".")
    gated.close_clients()
    gated.wait_rows(lambda rs: sum(r["op"] == "logout" for r in rs) >= 1, sql=_LOGOUTS)
    before = open_fds()

    raw = RawSFTP(gated.transport("alice"))
    a = _open(raw, b"/a.bin")
    raw.chan.sendall(
        b"".join(raw.framed(READ, s(a), u64(n * CHUNK), u32(CHUNK))[1] for n in range(20))
    )
    gate.wait_for("now", MAX_READS)
    gated.close_clients()  # the client is gone while its reads are in the pool
    deadline = time.monotonic() + 10
    while not channels[-1].is_closing() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert channels[-1].is_closing()
    gate.opened.set()
    gated.wait_rows(lambda rs: sum(r["op"] == "logout" for r in rs) >= 2, sql=_LOGOUTS)
    rows = gated.op_rows("close", count=1)
    # The handle was closed after the reads in flight: their bytes are counted.
    assert rows[-1]["bytes_read"] == gate.done * CHUNK
    assert gate.done >= MAX_READS
    deadline = time.monotonic() + 10
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= before


_LOGOUTS = "SELECT 'logout' AS op FROM sessions WHERE ended_at IS NOT NULL"


# -- real clients -----------------------------------------------------------------


@pytest.fixture
def big(gateway: RunningGateway) -> bytes:
    payload = os.urandom(24 * 1024 * 1024 + 12345)
    (gateway.home("alice") / "big.bin").write_bytes(payload)
    (gateway.home("bob") / "big.bin").write_bytes(payload)
    _drop_cache(gateway.home("alice") / "big.bin")
    _drop_cache(gateway.home("bob") / "big.bin")
    return payload


def _drop_cache(path: Path) -> None:
    """Out of the page cache (clean pages go at once): reads go to the pool."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _closed_bytes(gateway: RunningGateway, count: int) -> list[int]:
    rows = gateway.op_rows("close", count=count)
    return [r["bytes_read"] for r in rows if r["path"] == "/big.bin"]


def test_openssh_sftp_download_with_many_requests(
    gateway: RunningGateway, big: bytes, tmp_path: Path
) -> None:
    sftp = need_tool("sftp", "apt-get install openssh-client")
    for block in ("-B32768", "-R64"):  # 32 KiB reads; limits@openssh.com's 256 KiB
        local = tmp_path / f"got{block}.bin"
        subprocess.run(
            [
                *(sftp, "-R", "64", block, "-P", str(gateway.port)),
                *("-i", str(gateway.keys["bob"]), "-o", "StrictHostKeyChecking=no"),
                *("-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"),
                *("-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-b", "-", "bob@127.0.0.1"),
            ],
            input=f"get big.bin {local}\n",
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert local.read_bytes() == big
        _drop_cache(gateway.home("bob") / "big.bin")
    assert _closed_bytes(gateway, 2) == [len(big)] * 2


def test_paramiko_prefetch_download(gateway: RunningGateway, big: bytes, tmp_path: Path) -> None:
    client = gateway.sftp("alice")
    local = tmp_path / "got.bin"
    client.get("big.bin", str(local), max_concurrent_prefetch_requests=64)
    assert local.read_bytes() == big
    # Not exact: paramiko gives up its prefetch when it catches up with the
    # requests its thread has sent so far, reads the rest itself, and its
    # prefetch thread still asks for it: the journal counts what was sent.
    (sent,) = _closed_bytes(gateway, 1)
    assert sent >= len(big)


def test_asyncssh_download_with_many_requests(
    gateway: RunningGateway, big: bytes, tmp_path: Path
) -> None:
    local = tmp_path / "got.bin"

    async def get() -> None:
        async with asyncssh_login(gateway.port) as conn, conn.start_sftp_client() as client:
            await client.get("big.bin", str(local), block_size=256 * 1024, max_requests=64)

    gateway.loop.run(get(), timeout=120)
    assert local.read_bytes() == big
    assert _closed_bytes(gateway, 1) == [len(big)]
