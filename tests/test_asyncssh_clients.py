"""Clients built on asyncssh against a real ``serve``: asyncssh's own SFTP client and fsspec/sshfs.

Both download through ``ranges@asyncssh.com`` (which byte ranges of a file hold
data) whenever the server advertises it, so these also check that every
extension the VERSION reply names is served; each one is used here.
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from fsspec.asyn import sync
from sshfs import SSHFileSystem

from conftest import PASSWORDS, RunningGateway, asyncssh_login
from rawsftp import frame
from sftpgate.frontdoor.fsops import OpenFile, UserFS
from sftpgate.frontdoor.requests import MAX_RANGES

BLOCK = 4096


def _version_extensions(gateway: RunningGateway) -> set[bytes]:
    """The extension names of the gateway's VERSION reply."""
    chan = gateway.transport("alice").open_session()
    chan.invoke_subsystem("sftp")
    chan.sendall(frame(struct.pack(">BI", 1, 3)))  # INIT, version 3
    reply = b""
    while len(reply) < 4 or len(reply) < 4 + struct.unpack_from(">I", reply)[0]:
        chunk = chan.recv(65536)
        assert chunk
        reply += chunk
    assert reply[4] == 2  # VERSION
    names, pos = set(), 9  # length, type, version
    while pos < len(reply):
        for field in range(2):  # name, data
            (size,) = struct.unpack_from(">I", reply, pos)
            if field == 0:
                names.add(reply[pos + 4 : pos + 4 + size])
            pos += 4 + size
    chan.close()
    return names


def test_version_names_only_extensions_tried_in_this_module(gateway: RunningGateway) -> None:
    # Each name below is used by a test of this module (newline and vendor-id
    # are facts, not requests); asyncssh's server advertises its own list.
    assert _version_extensions(gateway) == {
        b"newline",
        b"vendor-id",
        b"posix-rename@openssh.com",
        b"hardlink@openssh.com",
        b"fsync@openssh.com",
        b"lsetstat@openssh.com",
        b"limits@openssh.com",
        b"statvfs@openssh.com",
        b"fstatvfs@openssh.com",
        b"copy-data",
        b"ranges@asyncssh.com",
    }


def _closes(gateway: RunningGateway, path: str, count: int = 1) -> list[dict[str, Any]]:
    rows = gateway.wait_rows(
        lambda rs: sum(r["op"] == "close" and r["path"] == path for r in rs) >= count
    )
    return [r for r in rows if r["op"] == "close" and r["path"] == path]


def _upload(gateway: RunningGateway, close: dict[str, Any]) -> tuple[str, int, str]:
    """The upload a CLOSE row completed: (path, bytes, state)."""
    (upload,) = gateway.rows("SELECT * FROM uploads WHERE operation_id = ?", (close["id"],))
    return upload["path"], upload["bytes"], upload["state"]


def test_asyncssh_client_puts_and_gets_a_file(gateway: RunningGateway, tmp_path: Path) -> None:
    payload = os.urandom(700_000)  # several 256 KiB requests, a short last one
    (tmp_path / "local.bin").write_bytes(payload)

    async def session() -> None:
        async with asyncssh_login(gateway.port) as conn, conn.start_sftp_client() as sftp:
            await sftp.put(str(tmp_path / "local.bin"), "clip.bin")
            await sftp.get("clip.bin", str(tmp_path / "back.bin"))

    asyncio.run(session())
    assert (gateway.home("alice") / "clip.bin").read_bytes() == payload
    assert (tmp_path / "back.bin").read_bytes() == payload
    up, down = _closes(gateway, "/clip.bin", 2)
    assert (up["bytes_written"], up["status"]) == (len(payload), "ok")
    assert _upload(gateway, up) == ("/clip.bin", len(payload), "complete")
    assert (down["bytes_read"], down["bytes_written"], down["status"]) == (len(payload), 0, "ok")


def _sparse(path: Path, blocks: int, size: int = 0) -> None:
    """``blocks`` data blocks, each followed by a hole but the last; then holes up to ``size``."""
    with path.open("wb") as f:
        for i in range(blocks):
            f.seek(2 * i * BLOCK)
            f.write(bytes([i % 250 + 1]) * BLOCK)
        if size:
            f.truncate(size)


def _bytes_to_read(path: Path) -> int:
    """What a sparse download reads: the data, as this filesystem tells, and the last byte."""
    total, end = 0, 0
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        while True:
            try:
                start = os.lseek(fd, end, os.SEEK_DATA)
            except OSError:  # no data after `end`: the last byte was a hole
                return total + (1 if end < size else 0)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start


def test_data_ranges_are_clipped_capped_and_end_with_the_last_byte(tmp_path: Path) -> None:
    path = tmp_path / "f"
    _sparse(path, 3, size=10 * BLOCK)  # data at 0, 2 and 4 blocks; size 10 blocks
    b = BLOCK
    with path.open("rb") as f:
        opened = OpenFile(f.fileno(), b"/f", 1, None, 0, 0)
        ranges = functools.partial(UserFS.data_ranges, opened)
        everything = [(0, b), (2 * b, b), (4 * b, b), (10 * b - 1, 1)]
        assert ranges(0, 10 * b, MAX_RANGES) == (everything, True)
        assert ranges(0, 1 << 40, MAX_RANGES) == (everything, True)
        assert ranges(0, 10 * b, 2) == (everything[:2], False)
        assert ranges(0, 10 * b, 3) == (everything[:3], False)
        assert ranges(b // 2, 2 * b, MAX_RANGES) == ([(b // 2, b // 2), (2 * b, b // 2)], True)
        assert ranges(b, b, MAX_RANGES) == ([], True)  # a hole
        assert ranges(10 * b, 100, MAX_RANGES) == ([], True)  # past the end
        assert ranges(2**64 - 1, 2**64 - 1, MAX_RANGES) == ([], True)  # past lseek's offsets


def test_asyncssh_client_downloads_sparse_files_reading_only_their_data(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    home = gateway.home("alice")
    # More data ranges than one ranges@asyncssh.com reply holds: the client
    # asks again from where the last reply ended.
    _sparse(home / "many.bin", MAX_RANGES + 22)
    # Files ending in a hole arrive at their full size: their last byte is
    # reported as data (asyncssh's client writes only the ranges it is given).
    _sparse(home / "tail.bin", 1, size=1 << 20)
    _sparse(home / "hole.bin", 0, size=1 << 16)
    names = ["many.bin", "tail.bin", "hole.bin"]
    to_read = {name: _bytes_to_read(home / name) for name in names}
    assert to_read["many.bin"] < (home / "many.bin").stat().st_size, "no holes on this disk"

    async def session() -> None:
        async with asyncssh_login(gateway.port) as conn, conn.start_sftp_client() as sftp:
            await sftp.get(names, str(tmp_path))

    asyncio.run(session())
    for name in names:
        assert (tmp_path / name).read_bytes() == (home / name).read_bytes(), name
        (down,) = _closes(gateway, f"/{name}")
        assert (down["bytes_read"], down["status"]) == (to_read[name], "ok"), name
    assert to_read["hole.bin"] == 1
    assert gateway.rows("SELECT * FROM uploads") == []


def test_the_other_extensions_with_asyncssh_client(gateway: RunningGateway) -> None:
    home = gateway.home("alice")
    (home / "a.txt").write_bytes(b"hello sparse world\n" * 1000)
    (home / "b.txt").write_bytes(b"replaced by posix-rename")
    os.symlink("a.txt", home / "link")
    disk = os.statvfs(home)

    async def session() -> None:
        async with asyncssh_login(gateway.port) as conn, conn.start_sftp_client() as sftp:
            assert sftp.limits.max_read_len == 256 * 1024  # limits@openssh.com
            assert (await sftp.statvfs(".")).blocks == disk.f_blocks  # statvfs@openssh.com
            async with sftp.open("a.txt", "r+b") as f:
                assert (await f.statvfs()).blocks == disk.f_blocks  # fstatvfs@openssh.com
                await f.write(b"HELLO", 0)
                await f.fsync()  # fsync@openssh.com
            # lsetstat@openssh.com: the link's own times, not its target's.
            await sftp.setstat("link", asyncssh.SFTPAttrs(atime=1, mtime=2), follow_symlinks=False)
            await sftp.link("a.txt", "hard")  # hardlink@openssh.com
            await sftp.copy("a.txt", "copy.txt", remote_only=True)  # copy-data (and ranges)
            await sftp.posix_rename("copy.txt", "b.txt")  # posix-rename@openssh.com

    asyncio.run(session())
    assert (home / "a.txt").read_bytes().startswith(b"HELLO sparse")
    assert (home / "b.txt").read_bytes() == (home / "a.txt").read_bytes()
    assert os.lstat(home / "link").st_mtime == 2
    assert (home / "a.txt").stat().st_mtime != 2
    assert (home / "hard").stat().st_ino == (home / "a.txt").stat().st_ino
    # The copy arrived through a handle opened for writing: an upload.
    (copy,) = _closes(gateway, "/copy.txt")
    assert _upload(gateway, copy) == ("/copy.txt", 19_000, "complete")
    rows = gateway.wait_rows(lambda rs: any(r["op"] == "rename" for r in rs))
    assert {(r["op"], r["path"], r["path2"]) for r in rows} >= {
        ("link", "/hard", "/a.txt"),
        ("setstat", "/link", None),
        ("rename", "/copy.txt", "/b.txt"),
    }


@pytest.fixture
def fs(gateway: RunningGateway) -> Iterator[SSHFileSystem]:
    fs = SSHFileSystem(
        "127.0.0.1",
        port=gateway.port,
        username="alice",
        password=PASSWORDS["alice"],
        known_hosts=None,
        client_keys=None,
        skip_instance_cache=True,
    )
    try:
        yield fs
    finally:
        sync(fs.loop, _close, fs.client)  # on fsspec's loop, which runs the client


async def _close(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    await conn.wait_closed()


def test_fsspec_sshfs_puts_lists_reads_ranges_gets_and_removes(
    gateway: RunningGateway, fs: SSHFileSystem, tmp_path: Path
) -> None:
    payload = os.urandom(300_000)
    (tmp_path / "local.bin").write_bytes(payload)
    fs.put(str(tmp_path / "local.bin"), "clip.bin")
    assert (gateway.home("alice") / "clip.bin").read_bytes() == payload

    listing = {Path(e["name"]).name: e for e in fs.ls(".", detail=True)}
    assert listing["clip.bin"]["size"] == len(payload)
    assert listing["clip.bin"]["type"] == "file"
    info = fs.info("clip.bin")
    assert (info["size"], info["type"]) == (len(payload), "file")

    with fs.open("clip.bin", "rb") as f:
        f.seek(100_000)
        assert f.read(5000) == payload[100_000:105_000]
        f.seek(-10, os.SEEK_END)
        assert f.read() == payload[-10:]

    fs.get("clip.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == payload

    fs.rm("clip.bin")
    assert not (gateway.home("alice") / "clip.bin").exists()

    closes = _closes(gateway, "/clip.bin", 3)
    assert _upload(gateway, closes[0]) == ("/clip.bin", len(payload), "complete")
    assert closes[-1]["bytes_read"] == len(payload)  # the get
    assert gateway.op_rows("remove")[0]["path"] == "/clip.bin"
