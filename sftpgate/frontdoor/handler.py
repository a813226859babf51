"""The SFTP request loop of a ``sftpgate serve`` session, on asyncssh's public session API.

:class:`SFTPSession` is the ``sftp`` subsystem's channel session
(``SSHServerSession``): what the client sends arrives in ``data_received``
and waits in one buffer; :class:`GatewaySFTPHandler` takes each whole
request from it, decodes it with the shared codec (:mod:`sftpgate.sftp`),
calls our :class:`~.sftp.GatewaySFTPServer` (asyncssh's ``SFTPServer``
interface) and writes the reply with the channel's ``write``. asyncssh's
own SFTP handler is not used: it refused requests with bytes after their
fields, guessed SYMLINK's order from the client's version, advertised
extensions nobody here tried, and wrapped every request in several objects.

A request runs at once, inside the data callback, and usually finishes there
(a file call that runs inline never waits; see inline.py); only one that has
to wait (a trip to the thread pool, a durable commit) becomes a task, and the
next request is taken when it is done, so requests are served one at a time,
in order. READs are the exception: while READs wait in the pool, the next
requests start beside them if they are READs too (up to :data:`MAX_READS`),
and their replies go out as they finish (each names its request); any other
request waits until no READ is in flight. Only SFTP version 3 is served
(what OpenSSH speaks).

The requests an upload is made of (OPEN, READ, WRITE, CLOSE, STAT, LSTAT,
FSTAT) are read straight from the payload; every other request goes through
:func:`~sftpgate.sftp.decode.decode_request`. Where asyncssh's internals are
allowed (``server.fast_paths``, see asyncssh_fast.py) the channel's receive
path and the reply writes take shortcuts; the SFTP served is the same.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, cast

import asyncssh
from asyncssh import SFTPAttrs, SFTPName

from .. import __version__
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
    FX_OP_UNSUPPORTED,
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
    MAX_IO,
)
from ..sftp.decode import OFFSET_LENGTH, U32, U64, Cursor, decode_request, string_at
from ..sftp.encode import OK_BODY, REPLY_HEADER, ssh_string, status_body
from ..sftp.packets import Attrs, DecodeError, Request
from . import asyncssh_fast
from .bytequeue import ByteQueue
from .sftp import GatewaySFTPServer, sftp_error

if TYPE_CHECKING:  # typing only: the channel class asyncssh's session hooks are typed with
    from asyncssh.channel import SSHChannel

log = logging.getLogger(__name__)

# The longest request taken (asyncssh's limit: a 4 MiB WRITE and its fields).
MAX_PACKET = 4 * 1024 * 1024 + 1024
# Most data ranges in one ranges@asyncssh.com reply (asyncssh's server sends as many).
MAX_RANGES = 128
# Most names in one READDIR reply (as asyncssh's server).
MAX_NAMES = 128
# copy-data moves this much per read and write (as asyncssh's server).
COPY_BLOCK = 256 * 1024
# Most READs of one session waiting at once (in the pool), and most bytes they
# may ask for together (each counts as at most MAX_IO, what one is answered).
# Two: one pread copies while the loop encrypts the last reply; on the 2-core
# bench machine 4 and 8 were slower for a cached file (docs/benchmarks.md).
MAX_READS = 2
MAX_READ_BYTES = 2 * MAX_IO

_READ = bytes((FXP_READ,))
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


class GatewaySFTPHandler:
    """One session's requests: decoded, served by our server, answered (see module doc).

    It also tells our server when the session is being torn down: every handle
    still open when the session ends is closed and then ``exit()`` is called;
    to the server those closes look like the client's own, so ``ctx.ending``
    is set first and ``close()`` journals them as incomplete.
    """

    def __init__(
        self,
        server: GatewaySFTPServer,
        session: SFTPSession,
        chan: asyncssh.SSHServerChannel[bytes],
        *,
        fast: bool = False,
    ) -> None:
        self._server = server
        self._session = session
        self._inbox = session.inbox
        self._chan = chan
        self._fast = fast
        self._files: dict[bytes, object] = {}
        self._dirs: dict[bytes, AsyncIterator[SFTPName]] = {}
        self._next_handle = 0
        self._draft_symlink = sends_draft_symlink(
            str(chan.get_extra_info("client_version", "")),
            str(chan.get_extra_info("server_version", "")),
        )
        self._initialized = False
        self._ended = False
        # The request that had to wait; no other starts until it is done.
        self._task: asyncio.Task[None] | None = None
        # READs that had to wait (the pool's preads): more READs may start
        # beside them, up to the caps; any other request is held until none
        # is left, and then everything runs in order again.
        self._reads: set[asyncio.Task[None]] = set()
        self._read_bytes = 0
        self._held: bytes | None = None
        self._pumping = False
        self._cleanup_task: asyncio.Task[None] | None = None

    # -- replies ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        chan = self._chan
        if chan.is_closing():
            return
        if not (self._fast and asyncssh_fast.send_at_once(chan, data)):
            chan.write(data)

    def _reply(self, pkttype: int, pktid: int, body: bytes) -> None:
        self._send(REPLY_HEADER.pack(len(body) + 5, pkttype, pktid) + body)

    # -- the loop -------------------------------------------------------------------

    def _take(self) -> bytes | None:
        """The next whole request waiting in the session's buffer, or None."""
        try:
            payload = self._inbox.take_frame(MAX_PACKET)
        except ValueError:
            raise asyncssh.SFTPBadMessage("Max packet size exceeded") from None
        if payload is None:
            return None
        self._session.consumed()
        return payload

    def arrived(self) -> None:
        """The session got data or its end (called from the channel's callbacks)."""
        if self._task is None:
            self._pump()

    def _pump(self) -> None:
        """Run every whole request waiting, in order, until one has to wait.

        A READ that waits does not stop the loop: the next requests start too
        while they are READs (at most :data:`MAX_READS` of them, and
        :data:`MAX_READ_BYTES` asked, waiting at once); their replies go out
        as they finish. The first other request is held until every READ
        waiting has finished.
        """
        if self._pumping:  # a request we run resumed reading; the loop below sees the data
            return
        self._pumping = True
        try:
            while self._task is None and not self._ended:
                try:
                    payload = self._held
                    if payload is not None:
                        if self._reads:
                            return
                        self._held = None
                    else:
                        if len(self._reads) >= MAX_READS or self._read_bytes >= MAX_READ_BYTES:
                            return  # the inbox fills, and the channel pauses
                        payload = self._take()
                        if payload is None:
                            if self._session.ended is not _OPEN and not self._reads:
                                self._finish(self._session.ended)
                            return
                        if not self._initialized:
                            self._init(payload)
                            continue
                        if self._reads and payload[:1] != _READ:
                            self._held = payload
                            return
                    if payload[:1] == _READ:
                        self._start_read(payload)
                        continue
                    self._task = start_eagerly(self._request(payload))
                except Exception as exc:
                    self._failed(exc)
                    return
                if self._task is not None:
                    self._task.add_done_callback(self._request_done)
        finally:
            self._pumping = False

    def _start_read(self, payload: bytes) -> None:
        task = start_eagerly(self._request(payload))
        if task is None:
            return
        size = _read_size(payload)
        self._reads.add(task)
        self._read_bytes += size
        task.add_done_callback(functools.partial(self._read_done, size))

    def _read_done(self, size: int, task: asyncio.Task[None]) -> None:
        self._reads.discard(task)
        self._read_bytes -= size
        self._request_done(task, reading=True)

    def _init(self, payload: bytes) -> None:
        """The client's INIT: answer VERSION 3 with our extensions."""
        if payload[:1] != bytes((FXP_INIT,)):
            raise asyncssh.SFTPBadMessage("Expected init message")
        if len(payload) < 5:
            raise DecodeError("Incomplete packet")
        (version,) = U32.unpack_from(payload, 1)
        body = bytes((FXP_VERSION,)) + U32.pack(min(version, 3))
        body += b"".join(_string(name) + _string(data) for name, data in EXTENSIONS)
        self._initialized = True
        self._send(U32.pack(len(body)) + body)

    def _request_done(self, task: asyncio.Task[None], *, reading: bool = False) -> None:
        if not reading:
            self._task = None
        if task.cancelled():
            self._finish(None)
            return
        exc = task.exception()
        if exc is not None:
            self._failed(cast(Exception, exc))
            return
        self._pump()

    def _failed(self, exc: Exception) -> None:
        """A request ended the session (a stream that no longer makes sense, a bug)."""
        if isinstance(exc, DecodeError):
            exc = asyncssh.SFTPBadMessage(str(exc))
        elif not isinstance(exc, (OSError, asyncssh.Error)):
            log.error("SFTP session failed", exc_info=exc)
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if not self._ended:
            self._ended = True
            # The loop's, not the connection's: the connection may be gone already.
            self._cleanup_task = asyncio.get_running_loop().create_task(self._cleanup(exc))

    async def _cleanup(self, exc: Exception | None) -> None:
        """Close what the client left open (journaled as cut off), end the server, the channel."""
        ctx = self._server.ctx
        if self._reads:  # a request failed beside them: their handles close after them
            await asyncio.wait(set(self._reads))
        ctx.ending = True
        try:
            for file_obj in list(self._files.values()):
                try:
                    await self._server.close(file_obj)
                except (OSError, asyncssh.Error) as error:
                    log.debug("closing a handle left open: %s", error)
            self._files.clear()
            self._dirs.clear()
            self._server.exit()
        finally:
            ctx.cleaned.set()
            self._chan.close()
        if exc is not None:
            log.debug("SFTP session ended: %s", exc)

    async def _request(self, payload: bytes) -> None:
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
        self._reply(reply, pktid, body)

    # -- handles ----------------------------------------------------------------------

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
        await self._server.setstat(_path(req), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _fsetstat(self, req: Request) -> Reply:
        await self._server.fsetstat(self._file(req.handle), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _lsetstat(self, req: Request) -> Reply:
        await self._server.lsetstat(_path(req), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _opendir(self, req: Request) -> Reply:
        # As asyncssh's server: the listing is read (and a failure reported) at READDIR.
        handle = self._new_handle()
        self._dirs[handle] = self._server.scandir(_path(req))
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
        await self._server.remove(_path(req))
        return FXP_STATUS, OK_BODY

    async def _mkdir(self, req: Request) -> Reply:
        await self._server.mkdir(_path(req), _sftp_attrs(req.attrs))
        return FXP_STATUS, OK_BODY

    async def _rmdir(self, req: Request) -> Reply:
        await self._server.rmdir(_path(req))
        return FXP_STATUS, OK_BODY

    async def _realpath(self, req: Request) -> Reply:
        path = await self._server.realpath(_path(req))
        return FXP_NAME, _names([SFTPName(path, attrs=SFTPAttrs())])

    async def _readlink(self, req: Request) -> Reply:
        target = await self._server.readlink(_path(req))
        return FXP_NAME, _names([SFTPName(target)])

    async def _rename(self, req: Request) -> Reply:
        await self._server.rename(_path(req), _path2(req))
        return FXP_STATUS, OK_BODY

    async def _posix_rename(self, req: Request) -> Reply:
        await self._server.posix_rename(_path(req), _path2(req))
        return FXP_STATUS, OK_BODY

    async def _symlink(self, req: Request) -> Reply:
        # The codec reads OpenSSH's order (target, link); see sends_draft_symlink.
        first, second = _path(req), _path2(req)
        target, link = (second, first) if self._draft_symlink else (first, second)
        await self._server.symlink(target, link)
        return FXP_STATUS, OK_BODY

    async def _hardlink(self, req: Request) -> Reply:
        await self._server.link(_path(req), _path2(req))
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
        return FXP_EXTENDED_REPLY, _vfs(await self._server.statvfs(_path(req)))

    async def _fstatvfs(self, req: Request) -> Reply:
        return FXP_EXTENDED_REPLY, _vfs(await self._server.fstatvfs(self._file(req.handle)))

    async def _copy_data(self, req: Request) -> Reply:
        # As asyncssh's server: read and write in blocks; length 0 = to the end.
        src, dst = self._file(req.handle), self._file(req.handle2)
        offset, length, to = req.offset or 0, req.length or 0, req.offset2 or 0
        to_end = length == 0
        while to_end or length:
            size = COPY_BLOCK if to_end else min(length, COPY_BLOCK)
            data = await self._server.read(src, offset, size)
            if data:
                await self._server.write(dst, to, data)
            if len(data) < size:
                break
            offset += size
            to += size
            if not to_end:
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
        file_obj = await self._server.open(path, pflags, attrs)
        handle = self._new_handle()
        self._files[handle] = file_obj
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
            await self._server.close(file_obj)
        elif self._dirs.pop(handle, None) is None:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        return FXP_STATUS, OK_BODY

    async def _stat(self, payload: bytes) -> Reply:
        path, _ = string_at(payload, 5)
        stat = self._server.stat if payload[0] == FXP_STAT else self._server.lstat
        return FXP_ATTRS, _attrs(await stat(path))

    async def _fstat(self, payload: bytes) -> Reply:
        handle, _ = string_at(payload, 5)
        return FXP_ATTRS, _attrs(await self._server.fstat(self._file(handle)))


def _read_size(payload: bytes) -> int:
    """What a READ asks for, as far as it is answered (at most MAX_IO)."""
    try:
        _, pos = string_at(payload, 5)
        _, size = OFFSET_LENGTH.unpack_from(payload, pos)
    except (DecodeError, struct.error):
        return 0
    return int(min(size, MAX_IO))


def _path(req: Request) -> bytes:
    if req.path is None:  # pragma: no cover - the codec sets it for these types
        raise DecodeError("Incomplete packet")
    return req.path


def _path2(req: Request) -> bytes:
    if req.path2 is None:  # pragma: no cover - the codec sets it for these types
        raise DecodeError("Incomplete packet")
    return req.path2


def _vfs(result: os.statvfs_result) -> bytes:
    # As asyncssh's SFTPVFSAttrs.from_local: fsid 0.
    r = result
    return _STATVFS.pack(
        r.f_bsize, r.f_frsize, r.f_blocks, r.f_bfree, r.f_bavail, r.f_files,
        r.f_ffree, r.f_favail, 0, r.f_flag, r.f_namemax,
    )  # fmt: skip


_Serve = Callable[[GatewaySFTPHandler, Request], Awaitable[Reply]]

_HOT: dict[int, Callable[[GatewaySFTPHandler, bytes], Awaitable[Reply]]] = {
    FXP_OPEN: GatewaySFTPHandler._open,
    FXP_READ: GatewaySFTPHandler._read,
    FXP_WRITE: GatewaySFTPHandler._write,
    FXP_CLOSE: GatewaySFTPHandler._close,
    FXP_STAT: GatewaySFTPHandler._stat,
    FXP_LSTAT: GatewaySFTPHandler._stat,
    FXP_FSTAT: GatewaySFTPHandler._fstat,
}

_BY_TYPE: dict[int, _Serve] = {
    FXP_SETSTAT: GatewaySFTPHandler._setstat,
    FXP_FSETSTAT: GatewaySFTPHandler._fsetstat,
    FXP_OPENDIR: GatewaySFTPHandler._opendir,
    FXP_READDIR: GatewaySFTPHandler._readdir,
    FXP_REMOVE: GatewaySFTPHandler._remove,
    FXP_MKDIR: GatewaySFTPHandler._mkdir,
    FXP_RMDIR: GatewaySFTPHandler._rmdir,
    FXP_REALPATH: GatewaySFTPHandler._realpath,
    FXP_RENAME: GatewaySFTPHandler._rename,
    FXP_READLINK: GatewaySFTPHandler._readlink,
    FXP_SYMLINK: GatewaySFTPHandler._symlink,
}

# Exactly the advertised ones (a test checks): an extension not listed is unsupported.
_BY_EXTENSION: dict[str, _Serve] = {
    EXT_POSIX_RENAME: GatewaySFTPHandler._posix_rename,
    EXT_HARDLINK: GatewaySFTPHandler._hardlink,
    EXT_FSYNC: GatewaySFTPHandler._fsync,
    EXT_LSETSTAT: GatewaySFTPHandler._lsetstat,
    EXT_LIMITS: GatewaySFTPHandler._limits,
    EXT_STATVFS: GatewaySFTPHandler._statvfs,
    EXT_FSTATVFS: GatewaySFTPHandler._fstatvfs,
    EXT_COPY_DATA: GatewaySFTPHandler._copy_data,
    EXT_RANGES: GatewaySFTPHandler._ranges,
}


# -- running a request --------------------------------------------------------


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now, up to the first time it waits; None if it finished.

    If it has to wait, the rest runs in a task, returned: it first waits for
    what the coroutine is waiting on, then resumes it where it stopped. This
    is Python 3.12's eager task start, for the 3.11 this runs on too: most
    requests never wait, and a task per request cost a scheduling round
    each. Exceptions raised before the first wait are raised here.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_resume(coro, waiting))


class _Rest:
    """Awaitable: the rest of a coroutine that ``start_eagerly`` ran until it waited."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        coro, waiting = self.coro, self.waiting
        while True:
            # The task waits for what the coroutine waits for (a future, or
            # None for a bare yield), then resumes it, or throws in what was
            # thrown at the task (its cancellation).
            try:
                yield waiting
            except BaseException as exc:  # handed on, as ``yield from`` would
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(None)
            except StopIteration:
                return


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _Rest(coro, waiting)


# -- the channel --------------------------------------------------------------


_OPEN: Any = object()  # SFTPSession.ended while the client may still send


class SFTPSession(asyncssh.SSHServerSession[bytes]):
    """The ``sftp`` subsystem's channel: buffers what arrives for :class:`GatewaySFTPHandler`.

    Reading from the client pauses while more than the channel's receive
    window is buffered (a client pipelining faster than requests are served).
    ``fast``: use asyncssh_fast's channel shortcuts if the channel has what
    they need.
    """

    def __init__(
        self,
        factory: Callable[[asyncssh.SSHServerChannel[bytes]], GatewaySFTPServer],
        *,
        fast: bool = False,
    ) -> None:
        self._factory = factory
        self._fast = fast
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.inbox = ByteQueue()
        self._limit = 0
        self._paused = False
        self._handler: GatewaySFTPHandler | None = None
        # _OPEN, then None at the client's EOF or the exception that ended the channel.
        self.ended: Exception | None = _OPEN

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self._chan = cast(asyncssh.SSHServerChannel[bytes], chan)
        self._chan.set_encoding(None)
        self._limit = self._chan.get_recv_window()
        if self._fast:
            self._fast = asyncssh_fast.install_channel(chan, self.data_received)

    def session_started(self) -> None:
        chan = self._chan
        assert chan is not None
        self._handler = GatewaySFTPHandler(self._factory(chan), self, chan, fast=self._fast)
        self._handler.arrived()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.inbox.append(data)
        if self._limit and not self._paused and len(self.inbox) >= self._limit:
            self._paused = True
            assert self._chan is not None
            self._chan.pause_reading()
        if self._handler is not None:
            self._handler.arrived()

    def consumed(self) -> None:
        """The handler took a request out of the buffer."""
        if self._paused and len(self.inbox) < self._limit:
            self._paused = False
            assert self._chan is not None
            self._chan.resume_reading()

    def eof_received(self) -> bool:
        self._end(None)
        return True  # the handler closes the channel once its last reply is out

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if self.ended is _OPEN:
            self.ended = exc
        if self._handler is not None:
            self._handler.arrived()
