"""Every request type with extreme values, by hand: never "Internal error", never a leak.

One session (alice, from 127.0.0.2) sends every SFTP v3 request and every
extension the gateway advertises, each field in turn set to an extreme:
lengths 0 and 2³²-1, offsets 0, 2⁶³-1, 2⁶³, 2⁶⁴-1, paths with NUL, of 4,096+
bytes and with a 300-byte name, handles that were never issued, attributes at
their maxima, and every request cut short after its id. Each reply must be a
proper one (a status of version 3 with words of their own, never the bare
"Failure" an unexpected error gets), nothing may be logged with a traceback,
the gateway's descriptors must come back to their count, and the session must
still work afterwards. Meanwhile a bystander (carol) uploads and downloads
every half second.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PASSWORDS, RunningGateway, start_gateway
from hostile_kit import Bystander, login_from, open_fds
from rawsftp import (
    CLOSE,
    FSTAT,
    LSTAT,
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
from sftpgate.frontdoor.requests import ADVERTISED
from sftpgate.sftp.constants import MAX_IO

SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE, RMDIR = 9, 10, 11, 12, 13, 15
REALPATH, RENAME, READLINK, SYMLINK, EXTENDED = 16, 18, 19, 20, 200
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED_REPLY = 101, 102, 103, 104, 105, 201
REPLIES = {STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED_REPLY}

LENGTHS = (0, 2**32 - 1)
OFFSETS = (0, 2**63 - 1, 2**63, 2**64 - 1)
# Paths no request may act on (NUL, too long, a name too long) and harmless ones.
BAD_PATHS = (b"a\0b", b"\0", b"x" * 4096, b"/" + b"n" * 300, b"d/" + b"q" * 5000)
PATHS = (*BAD_PATHS, b"", b"nope", b"../../etc/passwd", b"/")
BAD_HANDLES = (b"", b"\0\0\0", b"\xff\xff\xff\xff", b"h" * 1000)  # never issued
ALL_ATTRS = 0x1 | 0x2 | 0x4 | 0x8  # size, uid/gid, permissions, times


def overlapped(bystander: Bystander, rounds: int = 3, timeout: float = 30) -> None:
    """Wait until the bystander has done ``rounds`` rounds, so the attack overlapped them."""
    deadline = time.monotonic() + timeout
    while len(bystander.rounds) < rounds and time.monotonic() < deadline:
        time.sleep(0.05)


def attrs_variants() -> list[bytes]:
    big = 2**32 - 1
    return [
        u32(0),
        u32(0x1) + u64(2**63),  # a size past off_t
        u32(0x1) + u64(2**64 - 1),
        u32(0x2) + u32(big) + u32(big),  # owner changes: refused
        u32(0x4) + u32(big),  # every permission bit
        u32(0x8) + u32(big) + u32(big),  # times at the end of 2106
        u32(ALL_ATTRS | 0x80000000) + u64(2**64 - 1) + u32(big) * 5 + u32(big),  # count lies
        u32(0x80000000) + u32(2**31),  # extension count the packet cannot hold
        u32(0x1),  # flags promise a size, none follows
    ]


def requests(good: bytes, folder: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, fields) of every request with each field at its extremes."""
    handles = (good, folder, *BAD_HANDLES)
    attrs = attrs_variants()
    for path in PATHS:
        for kind in (LSTAT, STAT, OPENDIR, REALPATH, READLINK, REMOVE, RMDIR):
            yield kind, s(path)
        yield OPEN, s(path) + u32(0x01) + u32(0)  # read
        yield OPEN, s(path) + u32(2**32 - 1) + u32(0)  # every flag (exclusive create)
        yield MKDIR, s(path) + u32(0)
        yield SETSTAT, s(path) + u32(0x8) + u32(0) + u32(0)
        yield RENAME, s(path) + s(b"renamed")
        yield RENAME, s(b"nope-either") + s(path)
        yield SYMLINK, s(path) + s(b"link-" + bytes([len(path) % 250 + 1]))
        yield SYMLINK, s(b"f.bin") + s(path)
        yield EXTENDED, s(b"posix-rename@openssh.com") + s(path) + s(b"renamed")
        yield EXTENDED, s(b"hardlink@openssh.com") + s(b"f.bin") + s(path)
        yield EXTENDED, s(b"statvfs@openssh.com") + s(path)
        yield EXTENDED, s(b"lsetstat@openssh.com") + s(path) + u32(0)
    for a in attrs:
        yield SETSTAT, s(b"sized.bin") + a
        yield FSETSTAT, s(good) + a
        yield EXTENDED, s(b"lsetstat@openssh.com") + s(b"sized.bin") + a
        yield OPEN, s(b"made.bin") + u32(WRITE_CREATE_TRUNC) + a
        yield MKDIR, s(b"made-dir") + a
    for handle in handles:
        for offset in OFFSETS:
            for length in LENGTHS:
                yield READ, s(handle) + u64(offset) + u32(length)
                # Length says 2³²-1 (or 0), the packet holds 3 bytes.
                yield WRITE, s(handle) + u64(offset) + u32(length) + b"abc"
                yield EXTENDED, s(b"ranges@asyncssh.com") + s(handle) + u64(offset) + u64(length)
            yield WRITE, s(handle) + u64(offset) + u32(3) + b"abc"
            for length in (0, 1, 2**63, 2**64 - 1):
                yield (
                    EXTENDED,
                    s(b"copy-data") + s(handle) + u64(offset) + u64(length) + s(good) + u64(0),
                )
                yield (
                    EXTENDED,
                    s(b"copy-data") + s(good) + u64(0) + u64(length) + s(handle) + u64(offset),
                )
        for kind in (FSTAT, READDIR):
            yield kind, s(handle)
        yield EXTENDED, s(b"fsync@openssh.com") + s(handle)
        yield EXTENDED, s(b"fstatvfs@openssh.com") + s(handle)
    yield EXTENDED, s(b"limits@openssh.com")
    yield EXTENDED, s(b"no-such-extension@example.org") + b"\0" * 64
    yield EXTENDED, s(b"home-directory") + s(b"alice")  # known to the codec, not advertised
    yield EXTENDED, s(b"users-groups-by-id@openssh.com") + s(b"\0\0\0") + s(b"")
    yield 99, b"\0" * 16  # no such request type
    # Every request cut short after its id (and part-way through its first field).
    for kind in (OPEN, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE):
        yield kind, b""
        yield kind, b"\0\0"
        yield kind, u32(2**32 - 1)  # a string as long as can be, and nothing after it
    for kind in (MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK, CLOSE, EXTENDED):
        yield kind, b""
        yield kind, u32(8) + b"abc"
    for name in sorted(ADVERTISED):
        yield EXTENDED, s(name)  # each advertised extension with nothing after it
        yield EXTENDED, s(name) + u32(2**32 - 1)
    # CLOSE last: the bad handles, then the good ones are closed by the test.
    for handle in BAD_HANDLES:
        yield CLOSE, s(handle)


@pytest.fixture
def swept(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = start_gateway(tmp_path, user_keys)
    try:
        yield running
    finally:
        running.stop()


def status_of(body: bytes) -> tuple[int, str]:
    (code,) = struct.unpack_from(">I", body)
    (size,) = struct.unpack_from(">I", body, 4)
    return code, body[8 : 8 + size].decode("utf-8", "replace")


def wait_fds(expected: int, timeout: float = 15) -> int:
    """The process's descriptor count once it is back to ``expected`` (or at the deadline)."""
    deadline = time.monotonic() + timeout
    now = open_fds()
    while now != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        now = open_fds()
    return now


def test_every_request_with_extreme_values_gets_a_proper_reply_and_leaks_nothing(
    swept: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    home = swept.home("alice")
    (home / "f.bin").write_bytes(b"0123456789" * 1000)
    (home / "sized.bin").write_bytes(b"s" * 100)
    (home / "d").mkdir()
    t = login_from("127.0.0.2", swept.port, "alice", PASSWORDS["alice"])
    try:
        raw = RawSFTP(t)
        kind, body = raw.request(OPEN, s(b"f.bin"), u32(0x01 | 0x02), u32(0))  # read + write
        assert kind == HANDLE
        good = body[4:]
        kind, body = raw.request(OPENDIR, s(b"d"))
        assert kind == HANDLE
        folder = body[4:]
        before = open_fds()
        handles: list[bytes] = []
        answered = 0
        bad: list[str] = []
        with Bystander(swept.port, "carol", PASSWORDS["carol"]) as bystander:
            for kind, fields in requests(good, folder):
                reply, body = raw.request(kind, fields)
                answered += 1
                what = f"type {kind} {fields[:60]!r}"
                if reply not in REPLIES:
                    bad.append(f"{what}: reply type {reply}")
                elif reply == STATUS:
                    code, message = status_of(body)
                    # (OK carries no words; a failure always has its own.)
                    if code > 8 or (code and message in ("", "Failure")) or "rror:" in message:
                        bad.append(f"{what}: status {code} {message!r}")
                elif reply == HANDLE:
                    handles.append(body[4:])
                elif reply == DATA:
                    (size,) = struct.unpack_from(">I", body)
                    if size > MAX_IO:
                        bad.append(f"{what}: {size} bytes read, more than {MAX_IO}")
            for handle in handles:
                raw.request(CLOSE, s(handle))
            # The session still works: write, read back, close.
            kind, body = raw.request(OPEN, s(b"after.bin"), u32(WRITE_CREATE_TRUNC), u32(0))
            assert kind == HANDLE, status_of(body)
            after = body[4:]
            assert raw.status(WRITE, s(after), u64(0), s(b"still here"))[0] == 0
            assert raw.status(CLOSE, s(after))[0] == 0
            kind, body = raw.request(OPEN, s(b"after.bin"), u32(0x01), u32(0))
            again = body[4:]
            kind, body = raw.request(READ, s(again), u64(0), u32(100))
            assert kind == DATA and body[4:] == b"still here"
            raw.request(CLOSE, s(again))
            overlapped(bystander)
        assert not bad, f"{len(bad)} of {answered} replies were not proper: {bad[:8]}"
        assert answered > 500
        # Every descriptor the sweep's handles took is back (the bystander's sessions too).
        assert wait_fds(before) == before
        # The sweep's WRITEs past what ext4 holds (EFBIG) fail at the disk, after their
        # OK: the CLOSE says so, in the system's words.
        assert raw.status(CLOSE, s(good)) in ((0, ""), (4, "File too large"))
        assert raw.status(CLOSE, s(folder))[0] == 0
    finally:
        t.close()
    bystander.check(most=3.0)
    tracebacks = [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks[:5]]
    rows = swept.wait_rows(lambda rs: any(r["status"] == "invalid_filename" for r in rs))
    assert not [r for r in rows if "internal error" in (r["message"] or "")]
    # Refusals at the edge are journaled with the words the client was told.
    assert any("NUL byte" in (r["message"] or "") for r in rows)
    assert any("Offset out of range" in (r["message"] or "") for r in rows)
    assert any("overlap" in (r["message"] or "") for r in rows)


def test_a_packet_too_short_for_its_id_ends_only_that_session(swept: RunningGateway) -> None:
    t = login_from("127.0.0.2", swept.port, "alice", PASSWORDS["alice"])
    try:
        raw = RawSFTP(t)
        raw.chan.sendall(struct.pack(">IB", 1, READ))  # a type and no id
        raw.chan.settimeout(10)
        while raw.chan.recv(4096):  # until the gateway ends the channel (b"": its EOF)
            pass
        # Another session of the same login, on the same connection, works.
        other = RawSFTP(t)
        kind, body = other.request(OPEN, s(b"ok.bin"), u32(WRITE_CREATE_TRUNC), u32(0))
        assert kind == HANDLE
        assert other.status(CLOSE, s(body[4:]))[0] == 0
    finally:
        t.close()
