"""Encoding SFTP v3 packets: the inverse of :mod:`.decode`. Pure.

:func:`encode_request` and :func:`encode_reply` build whole packets from
:mod:`.packets` (tests, synthetic streams); :func:`ssh_string`,
:func:`status_body` and :data:`OK_BODY` are the pieces ``serve``'s request
loop builds its replies from.
"""

from __future__ import annotations

import struct
from typing import Final, TypeVar

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
from .decode import U32, U64
from .packets import Attrs, Reply, Request

# A reply's header: packet length, type, request id.
REPLY_HEADER: Final = struct.Struct(">IBI")
# FX_OK with an empty message and language tag: the body of most replies.
OK_BODY: Final = b"\0\0\0\0" + b"\0\0\0\0" + b"\0\0\0\0"


def ssh_string(text: str) -> bytes:
    """``text`` as an SSH string (UTF-8, length first)."""
    raw = text.encode("utf-8")
    return U32.pack(len(raw)) + raw


def status_body(code: int, message: str, lang: str = "en-US") -> bytes:
    """A STATUS reply's body after its request id: code, message, language tag."""
    return U32.pack(code) + ssh_string(message) + ssh_string(lang)


# -- whole packets (for tests and synthetic streams) ------------------------------------------


_T = TypeVar("_T")


class _Writer:
    __slots__ = ("parts",)

    def __init__(self, t: int) -> None:
        self.parts: list[bytes] = [bytes((t,))]

    def u32(self, v: int) -> None:
        self.parts.append(U32.pack(v))

    def u64(self, v: int) -> None:
        self.parts.append(U64.pack(v))

    def string(self, v: bytes) -> None:
        self.parts.append(U32.pack(len(v)))
        self.parts.append(v)

    def attrs(self, a: Attrs) -> None:
        flags = 0
        if a.size is not None:
            flags |= ATTR_SIZE
        if (a.uid is None) != (a.gid is None):
            raise ValueError("Attrs: uid and gid must be set together")
        if a.uid is not None:
            flags |= ATTR_UIDGID
        if a.permissions is not None:
            flags |= ATTR_PERMISSIONS
        if (a.atime is None) != (a.mtime is None):
            raise ValueError("Attrs: atime and mtime must be set together")
        if a.atime is not None:
            flags |= ATTR_ACMODTIME
        if a.extended:
            flags |= ATTR_EXTENDED
        self.u32(flags)
        if a.size is not None:
            self.u64(a.size)
        if a.uid is not None and a.gid is not None:
            self.u32(a.uid)
            self.u32(a.gid)
        if a.permissions is not None:
            self.u32(a.permissions)
        if a.atime is not None and a.mtime is not None:
            self.u32(a.atime)
            self.u32(a.mtime)
        if a.extended:
            self.u32(len(a.extended))
            for name, value in a.extended:
                self.string(name)
                self.string(value)

    def packet(self) -> bytes:
        body = b"".join(self.parts)
        return U32.pack(len(body)) + body


def _need(value: _T | None, what: str) -> _T:
    if value is None:
        raise ValueError(f"cannot encode: {what} is missing")
    return value


def _payload(data: bytes | None, data_len: int | None) -> bytes:
    if data is None:
        return bytes(data_len or 0)
    if data_len is not None and data_len != len(data):
        raise ValueError(f"data_len {data_len} does not match {len(data)} bytes of data")
    return data


_PATH_ONLY: Final = frozenset(
    (FXP_LSTAT, FXP_OPENDIR, FXP_REMOVE, FXP_RMDIR, FXP_REALPATH, FXP_STAT, FXP_READLINK)
)


def encode_request(req: Request, data: bytes | None = None) -> bytes:
    """The full packet (with its uint32 length) for ``req``.

    WRITE sends ``data``, or ``data_len`` zero bytes when ``data`` is None; an
    unknown extension likewise sends ``data_len`` zero bytes as its payload.
    Raises ValueError if a field the type needs is missing.
    """
    t = req.type
    w = _Writer(t)
    if t == FXP_INIT:
        w.u32(_need(req.version, "version"))
        for name, value in req.extensions:
            w.string(name)
            w.string(value)
        return w.packet()
    w.u32(req.id)
    if t == FXP_OPEN:
        w.string(_need(req.path, "path"))
        w.u32(_need(req.pflags, "pflags"))
        w.attrs(req.attrs or Attrs())
    elif t in (FXP_CLOSE, FXP_FSTAT, FXP_READDIR):
        w.string(_need(req.handle, "handle"))
    elif t == FXP_READ:
        w.string(_need(req.handle, "handle"))
        w.u64(_need(req.offset, "offset"))
        w.u32(_need(req.length, "length"))
    elif t == FXP_WRITE:
        w.string(_need(req.handle, "handle"))
        w.u64(_need(req.offset, "offset"))
        w.string(_payload(data, req.data_len))
    elif t in _PATH_ONLY:
        w.string(_need(req.path, "path"))
    elif t in (FXP_SETSTAT, FXP_MKDIR):
        w.string(_need(req.path, "path"))
        w.attrs(req.attrs or Attrs())
    elif t == FXP_FSETSTAT:
        w.string(_need(req.handle, "handle"))
        w.attrs(req.attrs or Attrs())
    elif t in (FXP_RENAME, FXP_SYMLINK):
        w.string(_need(req.path, "path"))
        w.string(_need(req.path2, "path2"))
    elif t == FXP_EXTENDED:
        _encode_extended(w, req)
    return w.packet()


def _encode_extended(w: _Writer, req: Request) -> None:
    name = _need(req.extension, "extension")
    w.string(name.encode("utf-8", "surrogateescape"))
    if name in (EXT_POSIX_RENAME, EXT_HARDLINK):
        w.string(_need(req.path, "path"))
        w.string(_need(req.path2, "path2"))
    elif name in (EXT_FSYNC, EXT_FSTATVFS):
        w.string(_need(req.handle, "handle"))
    elif name in (EXT_STATVFS, EXT_EXPAND_PATH):
        w.string(_need(req.path, "path"))
    elif name == EXT_LSETSTAT:
        w.string(_need(req.path, "path"))
        w.attrs(req.attrs or Attrs())
    elif name == EXT_COPY_DATA:
        w.string(_need(req.handle, "handle"))
        w.u64(_need(req.offset, "offset"))
        w.u64(_need(req.length, "length"))
        w.string(_need(req.handle2, "handle2"))
        w.u64(_need(req.offset2, "offset2"))
    elif name == EXT_RANGES:
        w.string(_need(req.handle, "handle"))
        w.u64(_need(req.offset, "offset"))
        w.u64(_need(req.length, "length"))
    elif name == EXT_HOME_DIRECTORY:
        w.string(_need(req.username, "username"))
    elif name == EXT_USERS_GROUPS_BY_ID:
        w.string(b"".join(U32.pack(v) for v in req.uids or ()))
        w.string(b"".join(U32.pack(v) for v in req.gids or ()))
    elif name != EXT_LIMITS:
        w.parts.append(bytes(req.data_len or 0))


def encode_reply(reply: Reply, data: bytes | None = None) -> bytes:
    """The full packet (with its uint32 length) for ``reply``.

    DATA sends ``data``, or ``data_len`` zero bytes when ``data`` is None.
    Raises ValueError if a field the type needs is missing.
    """
    t = reply.type
    w = _Writer(t)
    if t == FXP_VERSION:
        w.u32(_need(reply.version, "version"))
        for name, value in reply.extensions:
            w.string(name)
            w.string(value)
        return w.packet()
    w.u32(reply.id)
    if t == FXP_STATUS:
        w.u32(_need(reply.code, "code"))
        if reply.message is not None:
            w.string(reply.message)
            if reply.lang is not None:
                w.string(reply.lang)
    elif t == FXP_HANDLE:
        w.string(_need(reply.handle, "handle"))
    elif t == FXP_DATA:
        w.string(_payload(data, reply.data_len))
    elif t == FXP_NAME:
        w.u32(len(reply.names))
        for entry in reply.names:
            w.string(entry.filename)
            w.string(entry.longname)
            w.attrs(entry.attrs)
    elif t == FXP_ATTRS:
        w.attrs(reply.attrs or Attrs())
    elif t == FXP_EXTENDED_REPLY:
        w.parts.append(reply.ext_data or b"")
    return w.packet()
