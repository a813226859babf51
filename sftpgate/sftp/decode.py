"""Decoding SFTP version 3 packet bodies into :mod:`.packets`. Pure.

Wire details follow OpenSSH rather than the draft where they differ: SYMLINK
carries ``(targetpath, linkpath)`` and the extensions are those listed in
OpenSSH's PROTOCOL file. Like ``sftp-server``, decoding ignores bytes left
over at the end of a packet and frames (but does not interpret) unknown types.

``serve``'s request loop reads the few requests an upload is made of with
:func:`string_at` and the :data:`U32`/:data:`U64` layouts straight from the
payload (no cursor, no packet object: see ``frontdoor/handler.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .constants import (
    ATTR_ACMODTIME,
    ATTR_EXTENDED,
    ATTR_PERMISSIONS,
    ATTR_SIZE,
    ATTR_UIDGID,
    EXT_COPY_DATA,
    EXT_EXPAND_PATH,
    EXT_FSTATVFS,
    EXT_FSYNC,
    EXT_HARDLINK,
    EXT_HOME_DIRECTORY,
    EXT_LIMITS,
    EXT_LSETSTAT,
    EXT_POSIX_RENAME,
    EXT_RANGES,
    EXT_STATVFS,
    EXT_USERS_GROUPS_BY_ID,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_EXTENDED,
    FXP_EXTENDED_REPLY,
    FXP_FSETSTAT,
    FXP_FSTAT,
    FXP_HANDLE,
    FXP_INIT,
    FXP_LSTAT,
    FXP_MKDIR,
    FXP_NAME,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READ,
    FXP_READDIR,
    FXP_READLINK,
    FXP_REALPATH,
    FXP_REMOVE,
    FXP_RENAME,
    FXP_RMDIR,
    FXP_SETSTAT,
    FXP_STAT,
    FXP_STATUS,
    FXP_SYMLINK,
    FXP_VERSION,
    FXP_WRITE,
)
from .packets import Attrs, DecodeError, NameEntry, Reply, Request

# -- decoding -----------------------------------------------------------------------

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
# READ and WRITE after the handle: the offset, then the length (READ) or data length (WRITE).
OFFSET_LENGTH = struct.Struct(">QI")


def string_at(data: bytes, pos: int) -> tuple[bytes, int]:
    """The SSH string at ``pos`` of ``data``, and the position after it.

    For request loops that read fields straight from a payload. Raises
    :class:`DecodeError` if the string runs past the end of ``data``.
    """
    if len(data) - pos < 4:
        raise DecodeError("Incomplete packet")
    (size,) = U32.unpack_from(data, pos)
    start = pos + 4
    if len(data) - start < size:
        raise DecodeError("Incomplete packet")
    return data[start : start + size], start + size


class Cursor:
    """Reads SSH wire types from a packet body, raising DecodeError past its end."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def _take(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.end - start:
            raise DecodeError(f"{what} runs past the end of the packet")
        self.pos = start + n
        return start

    def u8(self) -> int:
        return int(self.buf[self._take(1, "byte")])

    def u32(self) -> int:
        return int(U32.unpack_from(self.buf, self._take(4, "uint32"))[0])

    def u64(self) -> int:
        return int(U64.unpack_from(self.buf, self._take(8, "uint64"))[0])

    def string(self) -> bytes:
        n = self.u32()
        start = self._take(n, "string")
        return bytes(self.buf[start : start + n])

    def more(self) -> bool:
        return self.pos < self.end

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & ATTR_SIZE else None
        uid = gid = None
        if flags & ATTR_UIDGID:
            uid, gid = self.u32(), self.u32()
        permissions = self.u32() if flags & ATTR_PERMISSIONS else None
        atime = mtime = None
        if flags & ATTR_ACMODTIME:
            atime, mtime = self.u32(), self.u32()
        extended: tuple[tuple[bytes, bytes], ...] = ()
        if flags & ATTR_EXTENDED:
            count = self.u32()
            # Each pair needs at least 8 bytes: refuse a count the packet cannot hold.
            if count > (self.end - self.pos) // 8:
                raise DecodeError("attribute extension count runs past the end of the packet")
            extended = tuple((self.string(), self.string()) for _ in range(count))
        return Attrs(size, uid, gid, permissions, atime, mtime, extended)

    def pairs(self) -> tuple[tuple[bytes, bytes], ...]:
        out: list[tuple[bytes, bytes]] = []
        while self.more():
            out.append((self.string(), self.string()))
        return tuple(out)


def _u32_list(raw: bytes) -> tuple[int, ...]:
    if len(raw) % 4:
        raise DecodeError("id list is not a whole number of uint32")
    return tuple(v for (v,) in U32.iter_unpack(raw))


def _path_req(t: int, i: int, c: Cursor) -> Request:
    return Request(t, i, path=c.string())


def _handle_req(t: int, i: int, c: Cursor) -> Request:
    return Request(t, i, handle=c.string())


def _two_path_req(t: int, i: int, c: Cursor) -> Request:
    return Request(t, i, path=c.string(), path2=c.string())


def _path_attrs_req(t: int, i: int, c: Cursor) -> Request:
    return Request(t, i, path=c.string(), attrs=c.attrs())


def _dec_open(t: int, i: int, c: Cursor) -> Request:
    return Request(t, i, path=c.string(), pflags=c.u32(), attrs=c.attrs())


def _dec_read(t: int, i: int, c: Cursor) -> Request:
    return Request(t, i, handle=c.string(), offset=c.u64(), length=c.u32())


def _dec_write(t: int, i: int, c: Cursor) -> Request:
    handle, offset, n = c.string(), c.u64(), c.u32()
    c._take(n, "WRITE data")
    return Request(t, i, handle=handle, offset=offset, data_len=n)


def _dec_fsetstat(t: int, i: int, c: Cursor) -> Request:
    return Request(t, i, handle=c.string(), attrs=c.attrs())


def _ext_none(name: str, i: int, c: Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name)


def _ext_path(name: str, i: int, c: Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, path=c.string())


def _ext_two_paths(name: str, i: int, c: Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, path=c.string(), path2=c.string())


def _ext_handle(name: str, i: int, c: Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, handle=c.string())


def _ext_lsetstat(name: str, i: int, c: Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, path=c.string(), attrs=c.attrs())


def _ext_copy_data(name: str, i: int, c: Cursor) -> Request:
    handle, offset, length = c.string(), c.u64(), c.u64()
    return Request(
        FXP_EXTENDED,
        i,
        extension=name,
        handle=handle,
        offset=offset,
        length=length,
        handle2=c.string(),
        offset2=c.u64(),
    )


def _ext_ranges(name: str, i: int, c: Cursor) -> Request:
    handle, offset = c.string(), c.u64()
    return Request(FXP_EXTENDED, i, extension=name, handle=handle, offset=offset, length=c.u64())


def _ext_home(name: str, i: int, c: Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, username=c.string())


def _ext_ids(name: str, i: int, c: Cursor) -> Request:
    uids, gids = _u32_list(c.string()), _u32_list(c.string())
    return Request(FXP_EXTENDED, i, extension=name, uids=uids, gids=gids)


_EXT_DECODERS: dict[str, Callable[[str, int, Cursor], Request]] = {
    EXT_POSIX_RENAME: _ext_two_paths,
    EXT_HARDLINK: _ext_two_paths,
    EXT_FSYNC: _ext_handle,
    EXT_STATVFS: _ext_path,
    EXT_FSTATVFS: _ext_handle,
    EXT_LSETSTAT: _ext_lsetstat,
    EXT_LIMITS: _ext_none,
    EXT_EXPAND_PATH: _ext_path,
    EXT_COPY_DATA: _ext_copy_data,
    EXT_RANGES: _ext_ranges,
    EXT_HOME_DIRECTORY: _ext_home,
    EXT_USERS_GROUPS_BY_ID: _ext_ids,
}


def _dec_extended(t: int, i: int, c: Cursor) -> Request:
    # surrogateescape: any name round-trips, and known names are plain ASCII.
    name = c.string().decode("utf-8", "surrogateescape")
    decoder = _EXT_DECODERS.get(name)
    if decoder is None:
        return Request(FXP_EXTENDED, i, extension=name, data_len=c.end - c.pos)
    return decoder(name, i, c)


_REQUEST_DECODERS: dict[int, Callable[[int, int, Cursor], Request]] = {
    FXP_OPEN: _dec_open,
    FXP_CLOSE: _handle_req,
    FXP_READ: _dec_read,
    FXP_WRITE: _dec_write,
    FXP_LSTAT: _path_req,
    FXP_FSTAT: _handle_req,
    FXP_SETSTAT: _path_attrs_req,
    FXP_FSETSTAT: _dec_fsetstat,
    FXP_OPENDIR: _path_req,
    FXP_READDIR: _handle_req,
    FXP_REMOVE: _path_req,
    FXP_MKDIR: _path_attrs_req,
    FXP_RMDIR: _path_req,
    FXP_REALPATH: _path_req,
    FXP_STAT: _path_req,
    FXP_RENAME: _two_path_req,
    FXP_READLINK: _path_req,
    FXP_SYMLINK: _two_path_req,
    FXP_EXTENDED: _dec_extended,
}


def _dec_status(t: int, i: int, c: Cursor) -> Reply:
    code = c.u32()
    # Pre-v3 servers send no message; OpenSSH always sends message and language tag.
    message = c.string() if c.more() else None
    lang = c.string() if c.more() else None
    return Reply(t, i, code=code, message=message, lang=lang)


def _dec_handle(t: int, i: int, c: Cursor) -> Reply:
    return Reply(t, i, handle=c.string())


def _dec_data(t: int, i: int, c: Cursor) -> Reply:
    n = c.u32()
    c._take(n, "DATA data")
    return Reply(t, i, data_len=n)


def _dec_name(t: int, i: int, c: Cursor) -> Reply:
    count = c.u32()
    # An entry is at least 12 bytes: refuse a count the packet cannot hold.
    if count > (c.end - c.pos) // 12:
        raise DecodeError("NAME count runs past the end of the packet")
    names = tuple(NameEntry(c.string(), c.string(), c.attrs()) for _ in range(count))
    return Reply(t, i, names=names)


def _dec_attrs(t: int, i: int, c: Cursor) -> Reply:
    return Reply(t, i, attrs=c.attrs())


def _dec_extended_reply(t: int, i: int, c: Cursor) -> Reply:
    return Reply(t, i, ext_data=bytes(c.buf[c.pos : c.end]))


_REPLY_DECODERS: dict[int, Callable[[int, int, Cursor], Reply]] = {
    FXP_STATUS: _dec_status,
    FXP_HANDLE: _dec_handle,
    FXP_DATA: _dec_data,
    FXP_NAME: _dec_name,
    FXP_ATTRS: _dec_attrs,
    FXP_EXTENDED_REPLY: _dec_extended_reply,
}


def decode_request(body: bytes | bytearray | memoryview) -> Request:
    """Decode one client packet body (type byte onwards, no length prefix).

    Unknown types decode to a bare ``Request(type, id)``: sftp-server skips them
    too. Raises :class:`DecodeError` if the body is too short for its fields.
    """
    c = Cursor(body)
    t = c.u8()
    if t == FXP_INIT:
        return Request(t, 0, version=c.u32(), extensions=c.pairs())
    i = c.u32()
    decoder = _REQUEST_DECODERS.get(t)
    return Request(t, i) if decoder is None else decoder(t, i, c)


def decode_reply(body: bytes | bytearray | memoryview) -> Reply:
    """Decode one server packet body (type byte onwards, no length prefix).

    Unknown types decode to a bare ``Reply(type, id)``. Raises :class:`DecodeError`
    if the body is too short for its fields.
    """
    c = Cursor(body)
    t = c.u8()
    if t == FXP_VERSION:
        return Reply(t, 0, version=c.u32(), extensions=c.pairs())
    i = c.u32()
    decoder = _REPLY_DECODERS.get(t)
    return Reply(t, i) if decoder is None else decoder(t, i, c)
