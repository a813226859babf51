"""What each SFTP request does in ``sftpgate serve``: decoded, served, answered (one session).

:class:`Requests` holds a session's handles and turns one request (type,
id, fields) into its reply, calling our :class:`~.sftp.GatewaySFTPServer`
(asyncssh's ``SFTPServer`` interface). When requests run, and in which
order, is the handler's business (handler.py, order.py); this module knows
nothing of the channel.

The requests an upload is made of (OPEN, READ, WRITE, CLOSE, STAT, LSTAT,
FSTAT) are read straight from the payload; every other request goes through
:func:`~sftpgate.sftp.decode.decode_request`. Only SFTP version 3 is served
(what OpenSSH speaks). Bytes after a request's fields are ignored, as
sftp-server does.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import asyncssh
from asyncssh import SFTPAttrs, SFTPName

from .. import __version__
from ..events import Op
from ..sftp.checks import MAX_OFFSET, path_problem, range_problem
from ..sftp.constants import (
    ATTR_PERMISSIONS,
    EXT_COPY_DATA,
    EXT_FSTATVFS,
    EXT_FSYNC,
    EXT_HARDLINK,
    EXT_LIMITS,
    EXT_LSETSTAT,
    EXT_NEWLINE,
    EXT_POSIX_RENAME,
    EXT_RANGES,
    EXT_STATVFS,
    EXT_VENDOR_ID,
    FX_BAD_MESSAGE,
    FX_EOF,
    FX_FAILURE,
    FX_INVALID_FILENAME,
    FX_OP_UNSUPPORTED,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_EXTENDED,
    FXP_EXTENDED_REPLY,
    FXP_FSETSTAT,
    FXP_FSTAT,
    FXP_HANDLE,
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
    MAX_IO,
)
from ..sftp.decode import OFFSET_LENGTH, U32, U64, Cursor, decode_request, string_at
from ..sftp.encode import OK_BODY, ssh_string, status_body
from ..sftp.packets import Attrs, DecodeError, Request
from .fsops import OpenFile
from .sftp import GatewaySFTPServer, sftp_error

log = logging.getLogger(__name__)

# Most data ranges in one ranges@asyncssh.com reply (asyncssh's server sends as many).
MAX_RANGES = 128
# Most names in one READDIR reply (as asyncssh's server).
MAX_NAMES = 128
# copy-data moves this much per read and write (as asyncssh's server).
COPY_BLOCK = 256 * 1024
_U64X4 = struct.Struct(">QQQQ")
_STATVFS = struct.Struct(">11Q")

# What VERSION advertises, in this order, with each extension's data: only
# extensions served here and tried with a real client (tests/test_asyncssh_clients.py).
EXTENSIONS: tuple[tuple[bytes, bytes], ...] = tuple(
    (name.encode(), data)
    for name, data in (
        (EXT_NEWLINE, os.linesep.encode()),
        (
            EXT_VENDOR_ID,
            ssh_string("sftpgate") + ssh_string("sftpgate") + ssh_string(__version__) + bytes(8),
        ),
        (EXT_POSIX_RENAME, b"1"),
        (EXT_HARDLINK, b"1"),
        (EXT_FSYNC, b"1"),
        (EXT_LSETSTAT, b"1"),
        (EXT_LIMITS, b"1"),
        (EXT_COPY_DATA, b"1"),
        (EXT_RANGES, b"1"),
        (EXT_STATVFS, b"2"),
        (EXT_FSTATVFS, b"2"),
    )
)
ADVERTISED = frozenset(name for name, _ in EXTENSIONS)

Reply = tuple[int, bytes]  # reply type, body after the request id


def _attrs(result: object) -> bytes:
    if isinstance(result, os.stat_result):
        return SFTPAttrs.from_local(result).encode(3)
    return cast(SFTPAttrs, result).encode(3)


def _sftp_attrs(a: Attrs | None) -> SFTPAttrs:
    """The codec's attributes as the ``SFTPAttrs`` our server's hooks take."""
    if a is None:
        return _no_attrs()
    return SFTPAttrs(
        size=a.size,
        uid=a.uid,
        gid=a.gid,
        permissions=a.permissions,
        atime=a.atime,
        mtime=a.mtime,
        extended=list(a.extended),
    )


def _string(data: bytes) -> bytes:
    return U32.pack(len(data)) + data


def _names(names: list[SFTPName]) -> bytes:
    return U32.pack(len(names)) + b"".join(name.encode(3) for name in names)


_EMPTY_ATTRS = b"\0\0\0\0"
_PERMISSIONS_ONLY = U32.pack(ATTR_PERMISSIONS)


# The attributes of nearly every OPEN, made once: an SFTPAttrs sets 25 fields.
# Shared, so never changed (the server only reads what a client asked for).
@functools.cache
def _no_attrs() -> SFTPAttrs:
    return SFTPAttrs()


@functools.lru_cache(maxsize=64)
def _permissions_attrs(permissions: int) -> SFTPAttrs:
    return SFTPAttrs(permissions=permissions)


async def _maybe(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def sends_draft_symlink(client_version: str, server_version: str) -> bool:
    """Whether the client is asyncssh's, sending SYMLINK as (link, target) to us.

    SYMLINK's paths are read in the order OpenSSH's sftp-server reads them, for
    any client (process_symlink: the target, then the link's own path): the
    reverse of the draft, and what OpenSSH's sftp, paramiko and libssh2
    (curl's ``-Q "symlink a b"``) send. The one client known to send the
    draft's order to us is asyncssh's own: it swaps only for a server whose
    version names OpenSSH or paramiko (SFTPClientHandler's
    _nonstandard_symlink_impls), and ours names neither.
    """
    return "AsyncSSH" in client_version and not any(
        n in server_version for n in ("OpenSSH", "paramiko")
    )


# How a refusal for the session's handle limit starts (the defender scores it: ssh.py).
TOO_MANY_HANDLES = "too many open handles"


class Requests:
    """One session's handles, and what each request does with them.

    ``answer`` serves one request and returns its reply; it raises only for
    a request that ends the session (one too short to carry its id).
    ``close_all`` closes what the client left open, at the session's end.

    Every field a client controls is checked here, before anything acts on
    it (:mod:`sftpgate.sftp.checks`): paths (NUL, ``PATH_MAX``,
    ``NAME_MAX``), offsets and lengths, handles, and how many handles the
    session holds (``server.max_handles``; over every session, those
    holding a descriptor stop short of the open-files limit). A refusal is
    a proper status, journaled.
    """

    def __init__(self, server: GatewaySFTPServer, *, draft_symlink: bool = False) -> None:
        self._server = server
        self._files: dict[bytes, object] = {}
        self._dirs: dict[bytes, AsyncIterator[SFTPName]] = {}
        self._next_handle = 0
        self._draft_symlink = draft_symlink
        self._door = server.ctx.limits

    async def answer(self, payload: bytes) -> tuple[int, int, bytes]:
        """The reply to one request: (request id, reply type, body after the id)."""
        if len(payload) < 5:
            raise DecodeError("Incomplete packet")
        pkttype = payload[0]
        (pktid,) = U32.unpack_from(payload, 1)
        hot = _HOT.get(pkttype)
        try:
            if hot is not None:
                reply, body = await hot(self, payload)
            else:
                reply, body = await self._other(payload)
        except DecodeError as exc:
            reply, body = FXP_STATUS, status_body(FX_BAD_MESSAGE, str(exc))
        except asyncssh.SFTPError as exc:
            reply, body = FXP_STATUS, exc.encode(3)  # codes v3 lacks become FX_FAILURE
        except NotImplementedError:
            reply, body = FXP_STATUS, status_body(FX_OP_UNSUPPORTED, "Operation not supported")
        except Exception as exc:  # our server's bug or an OS error it let through
            reply, body = FXP_STATUS, sftp_error(exc)[1].encode(3)
        return pktid, reply, body

    async def close_all(self) -> None:
        """Close every handle still open (the server journals them as the session's end)."""
        for file_obj in list(self._files.values()):
            self._door.open_files -= 1
            try:
                await self._server.close(file_obj)
            except (OSError, asyncssh.Error) as error:
                log.debug("closing a handle left open: %s", error)
        self._files.clear()
        self._dirs.clear()

    # -- handles ----------------------------------------------------------------------

    def _room(self, op: Op, path: bytes, *, descriptor: bool) -> None:
        """Refuse a new handle past the session's limit (or, for a file, the gateway's)."""
        most = self._door.max_handles
        if len(self._files) + len(self._dirs) >= most:
            message = f"{TOO_MANY_HANDLES} (at most {most} a session)"
            raise self._server.refused(op, path, FX_FAILURE, message)
        if descriptor and self._door.open_files >= self._door.most_open_files:
            message = "too many open files in the gateway, try again later"
            raise self._server.refused(op, path, FX_FAILURE, message)

    def _new_handle(self) -> bytes:
        while True:
            handle = self._next_handle.to_bytes(4, "big")
            self._next_handle = (self._next_handle + 1) & 0xFFFFFFFF
            if handle not in self._files and handle not in self._dirs:
                return handle

    def _file(self, handle: bytes | None) -> object:
        file_obj = self._files.get(handle or b"")
        if file_obj is None:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return file_obj

    def _path(self, op: Op, path: bytes | None) -> bytes:
        """A request's path, refused (journaled) if no file could have it."""
        if path is None:  # pragma: no cover - the codec sets it for these types
            raise DecodeError("Incomplete packet")
        problem = path_problem(path)
        if problem is not None:
            raise self._server.refused(op, path, FX_INVALID_FILENAME, problem)
        return path

    # -- every other request (decoded by the shared codec) ------------------------------

    async def _other(self, payload: bytes) -> Reply:
        req = decode_request(payload)
        if req.type == FXP_EXTENDED:
            serve = _BY_EXTENSION.get(req.extension or "")
        else:
            serve = _BY_TYPE.get(req.type)
        if serve is None:
            raise asyncssh.SFTPOpUnsupported(f"Unsupported request type: {payload[0]}")
        return await serve(self, req)

    async def _setstat(self, req: Request) -> Reply:
        await self._server.setstat(self._path(Op.SETSTAT, req.path), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _fsetstat(self, req: Request) -> Reply:
        await self._server.fsetstat(self._file(req.handle), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _lsetstat(self, req: Request) -> Reply:
        await self._server.lsetstat(self._path(Op.SETSTAT, req.path), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _opendir(self, req: Request) -> Reply:
        # As asyncssh's server: the listing is read (and a failure reported) at READDIR.
        path = self._path(Op.LIST, req.path)
        self._room(Op.LIST, path, descriptor=False)
        handle = self._new_handle()
        self._dirs[handle] = self._server.scandir(path)
        return FXP_HANDLE, _string(handle)

    async def _readdir(self, req: Request) -> Reply:
        names_left = self._dirs.get(req.handle or b"")
        if names_left is None:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        names: list[SFTPName] = []
        async for name in names_left:
            if not name.longname:
                await _maybe(self._server.format_longname(name))
            names.append(name)
            if len(names) == MAX_NAMES:
                break
        if not names:
            raise asyncssh.SFTPEOFError("End of file")
        return FXP_NAME, _names(names)

    async def _remove(self, req: Request) -> Reply:
        await self._server.remove(self._path(Op.REMOVE, req.path))
        return FXP_STATUS, OK_BODY

    async def _mkdir(self, req: Request) -> Reply:
        await self._server.mkdir(self._path(Op.MKDIR, req.path), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _rmdir(self, req: Request) -> Reply:
        await self._server.rmdir(self._path(Op.RMDIR, req.path))
        return FXP_STATUS, OK_BODY

    async def _realpath(self, req: Request) -> Reply:
        path = await self._server.realpath(self._path(Op.REALPATH, req.path))
        return FXP_NAME, _names([SFTPName(path, attrs=SFTPAttrs())])

    async def _readlink(self, req: Request) -> Reply:
        target = await self._server.readlink(self._path(Op.READLINK, req.path))
        return FXP_NAME, _names([SFTPName(target)])

    async def _rename(self, req: Request) -> Reply:
        await self._server.rename(self._path(Op.RENAME, req.path), self._path(Op.RENAME, req.path2))
        return FXP_STATUS, OK_BODY

    async def _posix_rename(self, req: Request) -> Reply:
        old, new = self._path(Op.RENAME, req.path), self._path(Op.RENAME, req.path2)
        await self._server.posix_rename(old, new)
        return FXP_STATUS, OK_BODY

    async def _symlink(self, req: Request) -> Reply:
        # The codec reads OpenSSH's order (target, link); see sends_draft_symlink.
        first, second = self._path(Op.SYMLINK, req.path), self._path(Op.SYMLINK, req.path2)
        target, link = (second, first) if self._draft_symlink else (first, second)
        await self._server.symlink(target, link)
        return FXP_STATUS, OK_BODY

    async def _hardlink(self, req: Request) -> Reply:
        await self._server.link(self._path(Op.LINK, req.path), self._path(Op.LINK, req.path2))
        return FXP_STATUS, OK_BODY

    async def _fsync(self, req: Request) -> Reply:
        await self._server.fsync(self._file(req.handle))
        return FXP_STATUS, OK_BODY

    async def _limits(self, req: Request) -> Reply:
        # asyncssh offers 4 MiB reads/writes; clients that take it (asyncssh's
        # own) then move 4 MiB per request, which is slower here than OpenSSH's
        # 256 KiB: each request is one trip to the filesystem thread.
        return FXP_EXTENDED_REPLY, _U64X4.pack(MAX_IO + 1024, MAX_IO, MAX_IO, 0)

    async def _statvfs(self, req: Request) -> Reply:
        path = self._path(Op.STATVFS, req.path)
        return FXP_EXTENDED_REPLY, _vfs(await self._server.statvfs(path))

    async def _fstatvfs(self, req: Request) -> Reply:
        return FXP_EXTENDED_REPLY, _vfs(await self._server.fstatvfs(self._file(req.handle)))

    async def _copy_data(self, req: Request) -> Reply:
        # As OpenSSH's sftp-server: read and write in blocks. Length 0 means to
        # the end of the source as it is now, so a copy never chases its own
        # writes; within one file the ranges may not overlap (a file copied
        # into itself would grow until the disk is full). Every block is a
        # WRITE: range, size limit and quota are checked as for any other.
        src, dst = self._file(req.handle), self._file(req.handle2)
        offset, length, to = req.offset or 0, req.length or 0, req.offset2 or 0
        if offset > MAX_OFFSET:
            return FXP_STATUS, status_body(FX_EOF, "End of file")
        if length == 0:
            length = max(0, (await self._server.fstat(src)).st_size - offset)
        problem = range_problem(offset, length) or range_problem(to, length)
        if problem is not None:
            raise self._server.refused(Op.WRITE, _shown(dst), FX_FAILURE, f"copy-data: {problem}")
        if _same_file(src, dst) and offset < to + length and to < offset + length:
            message = "copy-data: the source and destination ranges overlap"
            raise self._server.refused(Op.WRITE, _shown(dst), FX_FAILURE, message)
        while length:
            size = min(length, COPY_BLOCK)
            data = await self._server.read(src, offset, size)
            if data:
                await self._server.write(dst, to, data)
            if len(data) < size:
                break
            offset += size
            to += size
            length -= size
        return FXP_STATUS, OK_BODY

    async def _ranges(self, req: Request) -> Reply:
        # Which parts of the file hold data, from the handle's descriptor, in the pool.
        found, at_end = await self._server.data_ranges(
            self._file(req.handle), req.offset or 0, req.length or 0, MAX_RANGES
        )
        if not found:
            raise asyncssh.SFTPEOFError("No data in range")
        body = U32.pack(len(found)) + b"".join(U64.pack(o) + U64.pack(n) for o, n in found)
        return FXP_EXTENDED_REPLY, body + bytes((1 if at_end else 0,))

    # -- the requests an upload is made of (payload = type, id, fields) -----------------

    async def _open(self, payload: bytes) -> Reply:
        path, pos = string_at(payload, 5)
        if len(payload) - pos < 8:
            raise DecodeError("Incomplete packet")
        (pflags,) = U32.unpack_from(payload, pos)
        pos += 4
        if payload[pos:] == _EMPTY_ATTRS:
            attrs = _no_attrs()
        elif len(payload) - pos == 8 and payload[pos : pos + 4] == _PERMISSIONS_ONLY:
            # What OpenSSH's sftp sends: the local file's mode, nothing else.
            attrs = _permissions_attrs(U32.unpack_from(payload, pos + 4)[0])
        else:
            attrs = _sftp_attrs(Cursor(payload, pos).attrs())  # bytes after them ignored
        self._path(Op.OPEN, path)
        self._room(Op.OPEN, path, descriptor=True)
        file_obj = await self._server.open(path, pflags, attrs)
        handle = self._new_handle()
        self._files[handle] = file_obj
        self._door.open_files += 1
        return FXP_HANDLE, U32.pack(len(handle)) + handle

    async def _read(self, payload: bytes) -> Reply:
        handle, pos = string_at(payload, 5)
        if len(payload) - pos < OFFSET_LENGTH.size:
            raise DecodeError("Incomplete packet")
        offset, size = OFFSET_LENGTH.unpack_from(payload, pos)
        data = await self._server.read(self._file(handle), offset, size)
        if not data:
            raise asyncssh.SFTPEOFError("End of file")
        return FXP_DATA, U32.pack(len(data)) + data

    async def _write(self, payload: bytes) -> Reply:
        handle, pos = string_at(payload, 5)
        if len(payload) - pos < OFFSET_LENGTH.size:
            raise DecodeError("Incomplete packet")
        offset, size = OFFSET_LENGTH.unpack_from(payload, pos)
        pos += OFFSET_LENGTH.size
        if len(payload) - pos < size:
            raise DecodeError("Incomplete packet")
        # A view, not a copy: the queued write keeps the request's bytes alive.
        # Bytes after the data are ignored, as sftp-server does.
        data = memoryview(payload)[pos : pos + size]
        await self._server.write(self._file(handle), offset, data)
        return FXP_STATUS, OK_BODY

    async def _close(self, payload: bytes) -> Reply:
        handle, _ = string_at(payload, 5)
        file_obj = self._files.pop(handle, None)
        if file_obj is not None:
            self._door.open_files -= 1
            await self._server.close(file_obj)
        elif self._dirs.pop(handle, None) is None:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return FXP_STATUS, OK_BODY

    async def _stat(self, payload: bytes) -> Reply:
        path, _ = string_at(payload, 5)
        self._path(Op.STAT, path)
        stat = self._server.stat if payload[0] == FXP_STAT else self._server.lstat
        return FXP_ATTRS, _attrs(await stat(path))

    async def _fstat(self, payload: bytes) -> Reply:
        handle, _ = string_at(payload, 5)
        return FXP_ATTRS, _attrs(await self._server.fstat(self._file(handle)))


def _same_file(a: object, b: object) -> bool:
    return (
        isinstance(a, OpenFile)
        and isinstance(b, OpenFile)
        and (a.device, a.inode) == (b.device, b.inode)
    )


def _shown(file_obj: object) -> bytes | None:
    return file_obj.virtual if isinstance(file_obj, OpenFile) else None


def _vfs(result: os.statvfs_result) -> bytes:
    # As asyncssh's SFTPVFSAttrs.from_local: fsid 0.
    r = result
    return _STATVFS.pack(
        r.f_bsize, r.f_frsize, r.f_blocks, r.f_bfree, r.f_bavail, r.f_files,
        r.f_ffree, r.f_favail, 0, r.f_flag, r.f_namemax,
    )  # fmt: skip


_Serve = Callable[[Requests, Request], Awaitable[Reply]]

_HOT: dict[int, Callable[[Requests, bytes], Awaitable[Reply]]] = {
    FXP_OPEN: Requests._open,
    FXP_READ: Requests._read,
    FXP_WRITE: Requests._write,
    FXP_CLOSE: Requests._close,
    FXP_STAT: Requests._stat,
    FXP_LSTAT: Requests._stat,
    FXP_FSTAT: Requests._fstat,
}

_BY_TYPE: dict[int, _Serve] = {
    FXP_SETSTAT: Requests._setstat,
    FXP_FSETSTAT: Requests._fsetstat,
    FXP_OPENDIR: Requests._opendir,
    FXP_READDIR: Requests._readdir,
    FXP_REMOVE: Requests._remove,
    FXP_MKDIR: Requests._mkdir,
    FXP_RMDIR: Requests._rmdir,
    FXP_REALPATH: Requests._realpath,
    FXP_RENAME: Requests._rename,
    FXP_READLINK: Requests._readlink,
    FXP_SYMLINK: Requests._symlink,
}

# Exactly the advertised ones (a test checks): an extension not listed is unsupported.
_BY_EXTENSION: dict[str, _Serve] = {
    EXT_POSIX_RENAME: Requests._posix_rename,
    EXT_HARDLINK: Requests._hardlink,
    EXT_FSYNC: Requests._fsync,
    EXT_LSETSTAT: Requests._lsetstat,
    EXT_LIMITS: Requests._limits,
    EXT_STATVFS: Requests._statvfs,
    EXT_FSTATVFS: Requests._fstatvfs,
    EXT_COPY_DATA: Requests._copy_data,
    EXT_RANGES: Requests._ranges,
}


def version_packet(client_version: int) -> bytes:
    """The VERSION packet answering a client's INIT: version 3 at most, our extensions."""
    body = bytes((FXP_VERSION,)) + U32.pack(min(client_version, 3))
    body += b"".join(_string(name) + _string(data) for name, data in EXTENSIONS)
    return U32.pack(len(body)) + body
