"""What the gateway sends per request: exact replies, no padding packets (with fast paths)."""

from __future__ import annotations

import asyncio
import io
import logging
import struct

import asyncssh
import paramiko
import pytest

from conftest import PASSWORDS, RunningGateway, asyncssh_login
from rawsftp import (
    CLOSE,
    FSTAT,
    FX_BAD_MESSAGE,
    FX_EOF,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_OP_UNSUPPORTED,
    LSTAT,
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


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-ctr"])
def test_no_ignore_packet_goes_before_each_reply(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, cipher: str
) -> None:
    # asyncssh logs each packet it sends at debug level 3; the test reads that log.
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            t = paramiko.Transport(("127.0.0.1", gateway.port))
            t.get_security_options().ciphers = (cipher,)
            t.connect(username="alice", password=PASSWORDS["alice"])
            try:
                sftp = paramiko.SFTPClient.from_transport(t)
                assert sftp is not None
                sftp.putfo(io.BytesIO(b"x" * 5000), "f.bin")
                with sftp.open("f.bin") as f:
                    assert f.read() == b"x" * 5000
                assert t.remote_cipher == cipher
            finally:
                t.close()
    finally:
        asyncssh.set_debug_level(1)
    sent = [r.getMessage() for r in caplog.records if "] Sent MSG_" in r.getMessage()]
    assert any("MSG_CHANNEL_DATA" in m for m in sent)
    ignores = [m for m in sent if "MSG_IGNORE" in m]
    if gateway.gateway.fast_paths:
        assert not ignores
    else:
        # Documented price of server.fast_paths off: asyncssh's own send path
        # puts an empty MSG_IGNORE before every packet, whatever the cipher.
        assert ignores


async def _largest_write(port: int) -> int:
    async with (
        asyncssh_login(port) as conn,
        conn.start_sftp_client() as sftp,
    ):
        return int(sftp.limits.max_write_len)


def test_clients_are_asked_for_packets_below_mallocs_mmap_threshold(
    gateway: RunningGateway,
) -> None:
    # Clients that follow limits@openssh.com (asyncssh's, OpenSSH's) write
    # 256 KiB per request. A client sends packets of at most the size the
    # server advertises; below 128 KiB (glibc's default mmap threshold) a client
    # builds them in heap memory it reuses, instead of freshly mapped pages per
    # packet (asyncssh's client: ~1 s of page faults per GiB at 257 KiB).
    largest = asyncio.run(_largest_write(gateway.port))
    assert largest == 256 * 1024
    t = paramiko.Transport(("127.0.0.1", gateway.port))
    t.connect(username="alice", password=PASSWORDS["alice"])
    try:
        chan = t.open_session()
        assert 64 * 1024 < chan.out_max_packet_size < 128 * 1024
        chan.close()
    finally:
        t.close()


def test_upload_requests_answered_by_the_fast_path_decode_and_reply_exactly(
    gateway: RunningGateway,
) -> None:
    # OPEN, WRITE, FSTAT, CLOSE, STAT, LSTAT, READ are decoded by sftpgate's own
    # handler (frontdoor/handler.py), not asyncssh's: check each reply's bytes.
    raw = RawSFTP(gateway.transport("alice"))
    attrs = u32(0x04) + u32(0o640)  # permissions only
    reply, body = raw.request(OPEN, s(b"new file.bin"), u32(WRITE_CREATE_TRUNC), attrs)
    assert reply == 102  # HANDLE
    handle = body[4 : 4 + struct.unpack_from(">I", body)[0]]
    assert raw.status(WRITE, s(handle), u64(0), s(b"hello ")) == (FX_OK, "")
    assert raw.status(WRITE, s(handle), u64(6), s(b"world")) == (FX_OK, "")
    reply, body = raw.request(FSTAT, s(handle))
    assert reply == 105  # ATTRS
    (flags,) = struct.unpack_from(">I", body)
    assert flags & 0x01 and struct.unpack_from(">Q", body, 4)[0] == 11  # size
    assert raw.status(CLOSE, s(handle)) == (FX_OK, "")

    path = gateway.home("alice") / "new file.bin"
    assert path.read_bytes() == b"hello world"
    assert path.stat().st_mode & 0o777 == 0o640
    for kind in (STAT, LSTAT):
        reply, body = raw.request(kind, s(b"/new file.bin"))
        assert reply == 105 and struct.unpack_from(">Q", body, 4)[0] == 11

    reply, body = raw.request(OPEN, s(b"new file.bin"), u32(0x01), u32(0))  # READ
    assert reply == 102
    handle = body[4:]
    reply, body = raw.request(READ, s(handle), u64(6), u32(100))
    assert (reply, body) == (103, s(b"world"))  # DATA
    assert raw.status(READ, s(handle), u64(11), u32(100)) == (FX_EOF, "End of file")
    assert raw.status(CLOSE, s(handle)) == (FX_OK, "")
    close = gateway.op_rows("close", count=2)
    assert close[0]["path"] == "/new file.bin" and close[0]["bytes_written"] == 11
    uploads = gateway.rows("SELECT path, bytes, state FROM uploads")
    assert uploads == [{"path": "/new file.bin", "bytes": 11, "state": "complete"}]


def test_bad_requests_get_a_status_and_the_session_goes_on(gateway: RunningGateway) -> None:
    raw = RawSFTP(gateway.transport("alice"))
    stale = b"\0\0\0\x63"
    for kind, fields in [
        (WRITE, (s(stale), u64(0), s(b"x"))),
        (READ, (s(stale), u64(0), u32(10))),
        (FSTAT, (s(stale),)),
        (CLOSE, (s(stale),)),
    ]:
        assert raw.status(kind, *fields) == (FX_FAILURE, "Invalid file handle")
    # A WRITE whose data is shorter than it says, a STAT whose path is.
    # (Bytes left over after the fields are ignored: test_serve_lenient_requests.py.)
    code, _ = raw.status(WRITE, s(stale), u64(0), u32(10) + b"abc")
    assert code == FX_BAD_MESSAGE
    code, _ = raw.status(STAT, u32(10) + b"/")
    assert code == FX_BAD_MESSAGE
    assert raw.status(OPEN, s(b"missing"), u32(0x01), u32(0))[0] == FX_NO_SUCH_FILE
    # A request type nobody knows goes to asyncssh's dispatch, which refuses it.
    assert raw.status(250, b"")[0] == FX_OP_UNSUPPORTED
    reply, _ = raw.request(STAT, s(b"/"))  # still serving
    assert reply == 105
