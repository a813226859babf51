"""Bytes after a request's fields are ignored, as OpenSSH's sftp-server ignores them.

sftp-server (``process()`` in sftp-server.c) reads a request's fields and
discards whatever its packet holds after them; only a packet too short for
its fields is an error. Real clients rely on it: rclone's SFTP library
(pkg/sftp, Debian 12's rclone 1.60) sends the last WRITE of a file framed
with its whole 32 KiB buffer, the declared data first and stale bytes after
(test_interop_rclone_lftp.py runs rclone itself).
"""

from __future__ import annotations

import os
import struct

from conftest import RunningGateway
from rawsftp import (
    CLOSE,
    FSTAT,
    FX_BAD_MESSAGE,
    FX_OK,
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

SETSTAT, OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, RENAME = 9, 11, 12, 13, 14, 15, 16, 18
EXTENDED = 200
HANDLE, DATA, NAME, ATTRS, EXTENDED_REPLY = 102, 103, 104, 105, 201
JUNK = b"\xffjunk after the fields\x00"


def handle_of(body: bytes) -> bytes:
    return body[4 : 4 + struct.unpack_from(">I", body)[0]]


def test_a_write_with_stale_buffer_after_its_data_writes_only_the_data(
    gateway: RunningGateway,
) -> None:
    # What rclone's last WRITE of a 300,000-byte file looks like on the wire:
    # 5,088 bytes declared, framed with the other 27,680 bytes of its buffer.
    raw = RawSFTP(gateway.transport("alice"))
    payload = os.urandom(300_000)
    reply, body = raw.request(OPEN, s(b"clip.mp4"), u32(WRITE_CREATE_TRUNC), u32(0))
    assert reply == HANDLE
    handle = handle_of(body)
    chunk = 32 * 1024
    for offset in range(0, len(payload), chunk):
        data = payload[offset : offset + chunk]
        stale = os.urandom(chunk - len(data))
        assert raw.status(WRITE, s(handle), u64(offset), s(data), stale) == (FX_OK, "")
    assert raw.status(CLOSE, s(handle)) == (FX_OK, "")

    assert (gateway.home("alice") / "clip.mp4").read_bytes() == payload
    (close,) = gateway.op_rows("close")
    assert (close["path"], close["bytes_written"]) == ("/clip.mp4", len(payload))
    uploads = gateway.rows("SELECT path, bytes, state FROM uploads")
    assert uploads == [{"path": "/clip.mp4", "bytes": len(payload), "state": "complete"}]


def test_every_request_with_bytes_after_its_fields_is_served(gateway: RunningGateway) -> None:
    # The fast path's requests (OPEN, WRITE, READ, FSTAT, STAT, LSTAT, CLOSE)
    # and some that asyncssh's handlers decode, each with JUNK appended.
    raw = RawSFTP(gateway.transport("alice"))
    home = gateway.home("alice")
    assert raw.status(MKDIR, s(b"d"), u32(0), JUNK) == (FX_OK, "")
    # No attributes; permissions only (what OpenSSH's sftp sends).
    for name, attrs in ((b"d/e", u32(0)), (b"d/f", u32(0x04) + u32(0o640))):
        reply, body = raw.request(OPEN, s(name), u32(WRITE_CREATE_TRUNC), attrs, JUNK)
        assert reply == HANDLE
        handle = handle_of(body)
        assert raw.status(WRITE, s(handle), u64(0), s(b"hello"), JUNK) == (FX_OK, "")
        reply, body = raw.request(FSTAT, s(handle), JUNK)
        assert reply == ATTRS and struct.unpack_from(">Q", body, 4)[0] == 5
        assert raw.status(CLOSE, s(handle), JUNK) == (FX_OK, "")
    assert (home / "d" / "f").stat().st_mode & 0o777 == 0o640
    for kind in (STAT, LSTAT):
        reply, body = raw.request(kind, s(b"d/f"), JUNK)
        assert reply == ATTRS and struct.unpack_from(">Q", body, 4)[0] == 5
    reply, body = raw.request(OPEN, s(b"d/f"), u32(0x01), u32(0), JUNK)
    handle = handle_of(body)
    assert raw.request(READ, s(handle), u64(1), u32(3), JUNK) == (DATA, s(b"ell"))
    assert raw.status(CLOSE, s(handle), JUNK) == (FX_OK, "")

    assert raw.status(SETSTAT, s(b"d/f"), u32(0x04), u32(0o600), JUNK) == (FX_OK, "")
    assert (home / "d" / "f").stat().st_mode & 0o777 == 0o600
    reply, body = raw.request(REALPATH, s(b"d/../d"), JUNK)
    assert reply == NAME and s(b"/d") in body
    reply, body = raw.request(OPENDIR, s(b"d"), JUNK)
    assert reply == HANDLE
    handle = handle_of(body)
    reply, body = raw.request(READDIR, s(handle), JUNK)
    assert reply == NAME and s(b"f") in body
    assert raw.status(CLOSE, s(handle), JUNK) == (FX_OK, "")
    reply, body = raw.request(EXTENDED, s(b"limits@openssh.com"), JUNK)
    assert reply == EXTENDED_REPLY
    assert raw.status(RENAME, s(b"d/f"), s(b"d/g"), JUNK) == (FX_OK, "")
    assert raw.status(REMOVE, s(b"d/g"), JUNK) == (FX_OK, "")
    assert raw.status(REMOVE, s(b"d/e"), JUNK) == (FX_OK, "")
    assert raw.status(RMDIR, s(b"d"), JUNK) == (FX_OK, "")
    assert list(home.iterdir()) == []


def test_a_request_too_short_for_its_fields_is_still_a_bad_message(
    gateway: RunningGateway,
) -> None:
    raw = RawSFTP(gateway.transport("alice"))
    reply, body = raw.request(OPEN, s(b"f"), u32(WRITE_CREATE_TRUNC), u32(0))
    assert reply == HANDLE
    handle = handle_of(body)
    assert raw.status(WRITE, s(handle), u64(0), u32(10) + b"abc")[0] == FX_BAD_MESSAGE
    assert raw.status(READ, s(handle), u64(0))[0] == FX_BAD_MESSAGE
    assert raw.status(STAT, u32(10) + b"f")[0] == FX_BAD_MESSAGE
    assert raw.status(REMOVE, u32(10) + b"f")[0] == FX_BAD_MESSAGE
    assert raw.status(CLOSE, s(handle)) == (FX_OK, "")
    assert (gateway.home("alice") / "f").read_bytes() == b""
