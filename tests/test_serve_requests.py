"""How requests reach the handler: pipelined, dribbled, cut short, run eagerly.

The gateway takes SFTP requests straight from the channel's data (see
frontdoor/handler.py); these tests speak raw SFTP over a paramiko channel so
they can send what real clients send only sometimes: many requests in one
write, a request split over many SSH packets, an end in the middle of one.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest

from conftest import RunningGateway, asyncssh_login, start_gateway
from rawsftp import (
    CLOSE,
    FX_OK,
    OPEN,
    READ,
    STAT,
    WRITE,
    WRITE_CREATE_TRUNC,
    RawSFTP,
    frame,
    s,
    u32,
    u64,
)
from sftpgate.frontdoor.channel import SFTPSession
from sftpgate.frontdoor.eager import start_eagerly

HANDLE, DATA, ATTRS, STATUS = 102, 103, 105, 101


def handle_of(body: bytes) -> bytes:
    return body[4 : 4 + struct.unpack_from(">I", body)[0]]


@pytest.fixture(params=["inline", "pool"])
def any_gateway(request: pytest.FixtureRequest, tmp_path: Path, user_keys: dict[str, Path]) -> Any:
    # "pool": every filesystem call goes to the thread pool (what an NFS home
    # gets), so every request waits and runs as a task; "inline": most finish
    # inside the data callback.
    off = {"inline_local_metadata": False, "inline_local_changes": False}
    extra = {"server": off} if request.param == "pool" else None
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        yield running
    finally:
        running.stop()


def test_pipelined_requests_are_each_answered(any_gateway: RunningGateway) -> None:
    raw = RawSFTP(any_gateway.transport("alice"))
    names = [f"f{i}.bin".encode() for i in range(20)]
    # Twenty creates and stats in one channel write: each answered. The OPENs
    # in order (each runs alone); the STATs may overlap (order.py), and their
    # replies come as they finish, each naming its request.
    batch = [raw.framed(OPEN, s(n), u32(WRITE_CREATE_TRUNC), u32(0)) for n in names]
    batch += [raw.framed(STAT, s(b"/" + n)) for n in names]
    raw.chan.sendall(b"".join(data for _, data in batch))
    replies = [raw.reply() for _ in batch]
    opens, stats = replies[: len(names)], replies[len(names) :]
    assert [(kind, reply_id) for kind, reply_id, _ in opens] == [
        (HANDLE, request_id) for request_id, _ in batch[: len(names)]
    ]
    handles = [handle_of(body) for _, _, body in opens]
    assert sorted(reply_id for _, reply_id, _ in stats) == [i for i, _ in batch[len(names) :]]
    assert {kind for kind, _, _ in stats} == {ATTRS}
    # Then every file's writes and its close in one write: a close must see its writes.
    batch = []
    for name, handle in zip(names, handles, strict=True):
        batch += [raw.framed(WRITE, s(handle), u64(i * 3), s(name[:3])) for i in range(4)]
        batch.append(raw.framed(CLOSE, s(handle)))
    raw.chan.sendall(b"".join(data for _, data in batch))
    for request_id, _ in batch:
        kind, reply_id, body = raw.reply()
        assert (kind, reply_id, struct.unpack_from(">I", body)[0]) == (STATUS, request_id, FX_OK)
    home = any_gateway.home("alice")
    for name in names:
        assert (home / name.decode()).read_bytes() == name[:3] * 4
    rows = any_gateway.op_rows("close", count=len(names))
    assert sorted(r["bytes_written"] for r in rows) == [12] * len(names)


class _Replies(asyncssh.SSHClientSession[bytes]):
    """What the gateway sends on a raw sftp channel, as it arrives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data
        self.arrived.set()

    async def take(self) -> tuple[int, int, bytes]:
        """The next reply: (type, request id, body after the id)."""
        while len(self.data) < 4 or len(self.data) < 4 + struct.unpack_from(">I", self.data)[0]:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)
        size = struct.unpack_from(">I", self.data)[0]
        payload = bytes(self.data[4 : 4 + size])
        del self.data[: 4 + size]
        return payload[0], struct.unpack_from(">I", payload, 1)[0], payload[5:]


def test_replies_wait_for_a_small_client_window_and_stay_whole(
    gateway: RunningGateway,
) -> None:
    # asyncssh's client ends the connection if a server sends past its window
    # ("Window exceeded"). A 4 KiB window and 1 KiB packets, and the client
    # reads nothing until the whole batch is sent: most replies wait in the
    # gateway's channel, and a small one must not overtake one queued.
    content = bytes(range(256)) * 100
    (gateway.home("alice") / "data.bin").write_bytes(content)

    async def run() -> None:
        async with asyncssh_login(gateway.port) as conn:
            chan, replies = await conn.create_session(
                _Replies, subsystem="sftp", encoding=None, window=4096, max_pktsize=1024
            )
            chan.write(frame(struct.pack(">BI", 1, 3)))
            kind, _, _ = await replies.take()
            assert kind == 2  # VERSION
            chan.write(frame(struct.pack(">BI", OPEN, 1) + s(b"data.bin") + u32(1) + u32(0)))
            kind, _, body = await replies.take()
            assert kind == HANDLE
            handle = handle_of(body)
            chan.pause_reading()
            expected = []
            for i in range(30):
                # Replies that fit a packet (the window runs out in the middle
                # of one), then ones that don't (split), and tiny ones.
                offset, size = i * 500, 500 if i < 10 else (1500, 100)[i % 2]
                read = struct.pack(">BI", READ, 2 + 2 * i) + s(handle) + u64(offset) + u32(size)
                chan.write(frame(read))
                chan.write(frame(struct.pack(">BI", STAT, 3 + 2 * i) + s(b"/data.bin")))
                expected += [(DATA, 2 + 2 * i, offset, size), (ATTRS, 3 + 2 * i, None, 0)]
            # Wait until the gateway has filled the window: no reply (the
            # smallest, an ATTRS, is 41 bytes) fits what the client still offers.
            offered: Any = chan  # asyncssh's receive window is private
            deadline = asyncio.get_running_loop().time() + 10
            while offered._recv_window >= 41:
                assert asyncio.get_running_loop().time() < deadline, "the window never filled"
                await asyncio.sleep(0.01)
            chan.resume_reading()
            # Each reply whole (one overtaking a reply half sent would garble
            # the stream); in order unless a request had to wait in the pool
            # (order.py lets READs and STATs overlap there).
            got = {}
            for _ in expected:
                got_kind, got_id, body = await replies.take()
                got[got_id] = (got_kind, body)
            assert sorted(got) == [request_id for _, request_id, _, _ in expected]
            for kind, request_id, offset, size in expected:
                got_kind, body = got[request_id]
                assert got_kind == kind
                if offset is not None:
                    assert body[4:] == content[offset : offset + size]
            chan.close()

    asyncio.run(run())


def test_a_session_sent_one_byte_per_ssh_packet(gateway: RunningGateway) -> None:
    t = gateway.transport("alice")
    chan = t.open_session()
    chan.invoke_subsystem("sftp")
    init = frame(struct.pack(">BI", 1, 3))
    create = frame(struct.pack(">BI", OPEN, 1) + s(b"slow.bin") + u32(WRITE_CREATE_TRUNC) + u32(0))

    def dribble(data: bytes) -> None:
        for i in range(len(data)):
            chan.sendall(data[i : i + 1])  # paramiko sends each call as its own packet

    raw = RawSFTP.__new__(RawSFTP)  # the channel is set up by hand here
    raw.chan, raw.next_id = chan, 1
    dribble(init)
    assert raw.recv()[0] == 2  # VERSION
    dribble(create)
    kind, reply_id, body = raw.reply()
    assert (kind, reply_id) == (HANDLE, 1)
    handle = handle_of(body)
    dribble(frame(struct.pack(">BI", WRITE, 2) + s(handle) + u64(0) + s(b"drip" * 100)))
    assert raw.reply()[:2] == (STATUS, 2)
    dribble(frame(struct.pack(">BI", CLOSE, 3) + s(handle)))
    assert raw.reply()[:2] == (STATUS, 3)
    assert (gateway.home("alice") / "slow.bin").read_bytes() == b"drip" * 100


def _closed_by_gateway(chan: paramiko.Channel, timeout: float = 10) -> bool:
    chan.settimeout(timeout)
    while True:
        if not chan.recv(4096):
            return True


def test_an_end_in_the_middle_of_a_request_ends_the_session_cleanly(
    gateway: RunningGateway,
) -> None:
    t = gateway.transport("alice")
    raw = RawSFTP(t)
    kind, body = raw.request(OPEN, s(b"cut.bin"), u32(WRITE_CREATE_TRUNC), u32(0))
    assert kind == HANDLE
    handle = handle_of(body)
    assert raw.status(WRITE, s(handle), u64(0), s(b"half")) == (FX_OK, "")
    _, data = raw.framed(WRITE, s(handle), u64(4), s(b"x" * 1000))
    raw.chan.sendall(data[:500])  # half a WRITE, then the client's EOF
    raw.chan.shutdown_write()
    assert _closed_by_gateway(raw.chan)
    close = gateway.op_rows("close")[0]
    assert close["path"] == "/cut.bin" and close["bytes_written"] == 4
    assert close["message"] == "session ended with the file open"
    assert (gateway.home("alice") / "cut.bin").read_bytes() == b"half"

    # A channel that ends before its INIT, and one whose INIT is cut short.
    for sent in (b"", frame(struct.pack(">BI", 1, 3))[:3]):
        chan = t.open_session()
        chan.invoke_subsystem("sftp")
        chan.sendall(sent)
        chan.shutdown_write()
        assert _closed_by_gateway(chan)
    # The connection still serves new sessions.
    assert RawSFTP(t).request(STAT, s(b"/cut.bin"))[0] == ATTRS


def test_a_request_longer_than_the_limit_ends_only_its_session(gateway: RunningGateway) -> None:
    t = gateway.transport("alice")
    raw = RawSFTP(t)
    raw.chan.sendall(struct.pack(">I", 0x7FFFFFFF) + b"\x11")
    assert _closed_by_gateway(raw.chan)
    assert RawSFTP(t).request(STAT, s(b"/"))[0] == ATTRS


# -- start_eagerly ---------------------------------------------------------------


def test_a_coroutine_that_never_waits_finishes_inside_the_call() -> None:
    done = []

    async def quick() -> None:
        done.append("ran")

    async def main() -> None:
        assert start_eagerly(quick()) is None
        assert done == ["ran"]  # before the loop got a turn

    asyncio.run(main())


def test_a_coroutine_that_waits_goes_on_in_a_task() -> None:
    steps = []

    async def waits(fut: asyncio.Future[str]) -> None:
        steps.append("before")
        steps.append(await fut)
        await asyncio.sleep(0)  # a bare yield, as asyncio.sleep(0) is
        steps.append("after")

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        task = start_eagerly(waits(fut))
        assert task is not None and steps == ["before"]
        await asyncio.sleep(0.01)
        assert not task.done()
        fut.set_result("value")
        await task
        assert steps == ["before", "value", "after"]

    asyncio.run(main())


def test_errors_come_out_where_the_coroutine_raised_them() -> None:
    async def fails_at_once() -> None:
        raise ValueError("at once")

    async def fails_later(fut: asyncio.Future[None]) -> None:
        await fut
        raise KeyError("later")

    async def main() -> None:
        with pytest.raises(ValueError, match="at once"):
            start_eagerly(fails_at_once())
        fut = asyncio.get_running_loop().create_future()
        task = start_eagerly(fails_later(fut))
        assert task is not None
        fut.set_result(None)
        with pytest.raises(KeyError, match="later"):
            await task

    asyncio.run(main())


def test_cancelling_the_task_cancels_what_the_coroutine_waits_on() -> None:
    seen = []

    async def waits(fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        task = start_eagerly(waits(fut))
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled() and seen == ["cancelled inside"]

    asyncio.run(main())


# -- reading pauses while requests wait ------------------------------------------


class RecordingChannel:
    """Stands in for asyncssh's channel: only to see pause/resume calls.

    A fake by necessity: making a real request wait long enough for a real
    client to overrun the window needs a hung filesystem.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.calls: list[str] = []

    def set_encoding(self, encoding: str | None) -> None:
        assert encoding is None

    def get_recv_window(self) -> int:
        return self.window

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def log_sent_packet(self, *args: object) -> None:
        raise AssertionError("packet logged at debug level 1")

    log_received_packet = log_sent_packet

    def process_packet(self, *args: object) -> None:
        raise AssertionError("no packets in this test")


def test_reading_pauses_while_a_window_of_requests_waits() -> None:
    session = SFTPSession(factory=lambda chan: None)  # type: ignore[arg-type,return-value]
    chan = RecordingChannel(window=100)
    session.connection_made(chan)  # type: ignore[arg-type]
    session.data_received(b"x" * 60, None)
    assert chan.calls == []
    session.data_received(b"x" * 60, None)
    session.data_received(b"x" * 60, None)
    assert chan.calls == ["pause"]  # once, at the limit
    session.inbox.skip(50)
    session.consumed()
    assert chan.calls == ["pause"]  # 130 bytes still buffered: over the limit
    session.inbox.skip(50)
    session.consumed()
    assert chan.calls == ["pause", "resume"]
