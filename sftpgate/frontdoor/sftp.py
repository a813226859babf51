"""The SFTP server of ``sftpgate serve``: asyncssh hooks → off-loop I/O → events.

Every hook runs its filesystem work in the gateway's thread pool (or inline,
for quick calls on homes wholly on local disks: see :mod:`.inline`), turns the
outcome into an :class:`~sftpgate.events.Event`, and translates errors into
SFTP status replies in one place (:func:`sftp_error`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import asyncssh
from asyncssh import SFTPAttrs, SFTPName

from ..beneath import Home
from ..config import DEFAULT_TEMP_PATTERNS, User
from ..events import Event, EventSink, Op, SessionInfo, UploadState
from ..identity import Identity, call_as
from ..logsetup import current_session, enter_session, leave_session
from ..sftp import policy
from ..sftp.attrs import summarize
from ..sftp.checks import MAX_OFFSET, range_problem, size_problem
from ..sftp.constants import (
    FX_FAILURE,
    FX_QUOTA_EXCEEDED,
    FXF_APPEND,
    FXF_CREAT,
    FXF_TRUNC,
    FXF_WRITE,
    MAX_IO,
    status_name,
)
from ..sftp.errors import Status, status_of
from .fsops import OpenFile, UserFS
from .inline import SMALL_WRITE, InlineGuard, NotQuick
from .jail import virtual
from .limits import DoorLimits, Usage
from .mounts import home_is_local
from .writebehind import HANDLE_LIMIT, WRITE_BUDGET, WriteBudget, WriteQueue

T = TypeVar("T")
log = logging.getLogger(__name__)

# Open flags that can change the filesystem (write, append, create, truncate).
_CHANGES = FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC


def sftp_error(exc: BaseException) -> tuple[Status, asyncssh.SFTPError]:
    """The status a failed request answers with, and the error that sends it.

    asyncssh's own errors already are a status; everything else is translated
    by :func:`sftpgate.sftp.errors.status_of`, the one translation. An
    unexpected error is logged with its traceback here; the client is told
    only "Failure".
    """
    if isinstance(exc, asyncssh.SFTPError):
        return Status(exc.code, str(exc.reason)), exc
    status = status_of(exc)
    if status.detail is not None:
        log.error("SFTP request failed: %s", status.detail, exc_info=exc)
    return status, asyncssh.SFTPError(status.code, status.message)


def always_durable(path: str) -> bool:
    return True


def not_switching() -> None:
    return None


@dataclass(slots=True)
class SessionContext:
    """What the SSH layer hands to each SFTP session of an authenticated user."""

    info: SessionInfo
    user: User
    sink: EventSink
    executor: Executor | None
    # Who the session's file work runs as (None: as the gateway); called once,
    # in the pool (it may ask NSS or stat the home). See sftpgate.identity.
    identity: Callable[[], Identity | None] = not_switching
    # Uploads under these names complete when renamed to a name that isn't one.
    temp_patterns: tuple[str, ...] = DEFAULT_TEMP_PATTERNS
    # Whether a completed upload at this path may start a job (then its CLOSE
    # or RENAME reply waits for the durable commit); the rules decide.
    durable: Callable[[str], bool] = always_durable
    # Set by the SSH layer when the channel is being torn down: a close() after
    # this is asyncssh closing a handle the client left open.
    ending: bool = False
    # Set once that teardown is over (every handle closed and journaled): the
    # session's LOGOUT waits for it, so it is the session's last row.
    cleaned: asyncio.Event = field(default_factory=asyncio.Event)
    open_files: set[int] = field(default_factory=set)
    # Read-only metadata calls run on the loop when the whole home is on local
    # disks (see mounts); calls that change anything always use the pool.
    inline_local_metadata: bool = False
    # The same for quick calls that change something (create, small write
    # batches, close, mkdir, rename, remove, setstat); see inline.py.
    inline_local_changes: bool = False
    # Masked off the modes of files and folders users create (server.umask).
    umask: int = 0o022
    # Shared by every session: a slow inline call turns inline calls off a while.
    inline_guard: InlineGuard = field(default_factory=InlineGuard)
    # Bytes answered but not yet written, shared by every session of the gateway.
    write_budget: WriteBudget = field(default_factory=lambda: WriteBudget(WRITE_BUDGET))
    # journal.synchronous: full. An upload that may start a job (or may by a
    # later rename: a temporary name) is fsync'd at its CLOSE, before the commit.
    fsync_uploads: bool = False
    # Most requests of the session waiting at once (server.requests_in_flight;
    # 0: the handler's default). See order.py.
    requests_in_flight: int = 0
    # Handles, upload size and quotas: the gateway's, shared by every session.
    limits: DoorLimits = field(default_factory=DoorLimits)


def _decode(path: bytes | None) -> str | None:
    return None if path is None else path.decode("utf-8", "backslashreplace")


# A refused path is journaled cut to this many bytes: a client may send megabytes.
_JOURNALED_PATH = 1024


def _clipped(path: bytes) -> bytes:
    return path if len(path) <= _JOURNALED_PATH else path[:_JOURNALED_PATH] + b"..."


class GatewaySFTPServer(asyncssh.SFTPServer):
    """One SFTP session of one jailed user."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], ctx: SessionContext) -> None:
        super().__init__(chan)
        self.ctx = ctx
        self.fs = UserFS(Home(ctx.user.home), ctx.umask)
        self.uploads = policy.Uploads(ctx.temp_patterns)
        self._identity: Identity | None = None
        self._identity_known = False
        # Made in the session's context; the pool's threads inherit none (see _as_user).
        self._tag = current_session()
        # Calls running in the pool: the home's descriptor is closed only once
        # none is (a closed number could be reused by another session's file).
        self._in_flight = 0
        self._exited = False
        self._queues: set[WriteQueue] = set()
        # Whether the home is wholly on local disks: decided at the first
        # request that could run inline (it resolves the home, off the loop).
        wanted = ctx.inline_local_metadata or ctx.inline_local_changes
        self._local: bool | None = None if wanted else False
        # Quotas: (bytes, files) this user may hold (0: no limit); tracked when either is set.
        limits = ctx.limits
        self._quota_bytes, self._quota_files = limits.quota_of(ctx.user)
        self._track = bool(self._quota_bytes or self._quota_files)
        self._max_upload = limits.max_upload_size
        self._quotas = limits.quotas
        if not self._track:
            self._quotas.untracked(ctx.user.login)

    # -- plumbing -----------------------------------------------------------

    async def _settle(self) -> None:
        """Wait until every WRITE this session was answered for is on disk."""
        for queue in list(self._queues):
            if not queue.idle:
                await queue.drain()

    def _as_user(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in this thread with the user's credentials, on behalf of this session."""
        # A pool thread runs in its own context, not the caller's: what it logs
        # (identity.py's lines) names this session only if it is set here.
        token = enter_session(self._tag)
        try:
            if not self._identity_known:
                self._identity = self.ctx.identity()  # blocking (NSS): only ever in the pool
                # The home itself is opened as the gateway: the admin named it, and
                # its parents need not be searchable by the user; below it, the user.
                self.fs.home.fd  # noqa: B018 - opens it
                self._identity_known = True
            return call_as(self._identity, fn, *args)
        finally:
            leave_session(token)

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs) if kwargs else fn
        self._in_flight += 1
        try:
            if kwargs:
                return await loop.run_in_executor(self.ctx.executor, self._as_user, call)
            return await loop.run_in_executor(self.ctx.executor, self._as_user, call, *args)
        finally:
            self._in_flight -= 1
            if self._exited and not self._in_flight:
                self.fs.close()

    def exit(self) -> None:
        """The session is over: let go of the home once no call uses it."""
        self._exited = True
        if not self._in_flight:
            self.fs.close()

    async def _inline_ok(self, enabled: bool) -> bool:
        if not enabled:
            return False
        if self._local is None:
            self._local = await self._io(home_is_local, self.ctx.user.home)
        return self._local and self.ctx.inline_guard.allowed()

    def _inline(self, fn: Callable[..., T], *args: Any) -> T:
        guard = self.ctx.inline_guard
        before = guard.start()
        try:
            # _inline_ok ran a pooled call first, so the identity is known.
            return call_as(self._identity, fn, *args)
        finally:
            guard.observe(before, fn)

    async def _meta(self, fn: Callable[..., T], *args: Any) -> T:
        """A read-only metadata call: inline on a local home (see inline.py), else pooled."""
        if await self._inline_ok(self.ctx.inline_local_metadata):
            return self._inline(fn, *args)
        return await self._io(fn, *args)

    async def _change(self, fn: Callable[..., T], *args: Any) -> T:
        """A quick call that changes something: inline on a local home, else pooled."""
        if await self._inline_ok(self.ctx.inline_local_changes):
            return self._inline(fn, *args)
        return await self._io(fn, *args)

    def _event(self, op: Op, path: bytes | None = None, **fields: Any) -> Event:
        if path is not None:
            fields["path"] = _decode(virtual(path))
        return Event(op=op, session=self.ctx.info, **fields)

    def refused(self, op: Op, path: bytes | None, code: int, message: str) -> asyncssh.SFTPError:
        """Journal a request refused at the edge (a limit, a value out of range); its error."""
        shown = None if path is None else _decode(virtual(_clipped(path)))
        self.ctx.sink.emit(
            Event(
                op=op, session=self.ctx.info, path=shown, status=status_name(code), message=message
            )
        )
        return asyncssh.SFTPError(code, message)

    def _refuse_io(self, op: Op, f: OpenFile, code: int, message: str) -> asyncssh.SFTPError:
        """A READ or WRITE refused at the edge: journaled, and the handle's upload fails."""
        f.error = policy.io_failed(op, message)
        self.ctx.sink.emit(
            Event(
                op=op,
                session=self.ctx.info,
                path=_decode(f.virtual),
                status=status_name(code),
                message=message,
                bytes_read=f.bytes_read,
                bytes_written=f.bytes_written,
            )
        )
        return asyncssh.SFTPError(code, message)

    async def _usage(self) -> Usage:
        """This user's quota usage (scanned once, as the user, if nothing knows it yet)."""
        quotas, login = self._quotas, self.ctx.user.login
        known = quotas.known(login)
        if known is not None:
            return known
        return await quotas.usage(login, lambda: self._io(self.fs.usage))

    def _over_quota(self, usage: Usage, grow: int) -> str | None:
        if self._quota_bytes and grow > 0 and usage.used_bytes + grow > self._quota_bytes:
            return f"Quota exceeded: at most {self._quota_bytes} bytes"
        return None

    async def _do(
        self,
        op: Op,
        path: bytes | None,
        fn: Callable[..., T],
        *args: Any,
        journal_ok: bool | None = None,
        read_only: bool = False,
        quick: bool = False,
        **fields: Any,
    ) -> T:
        """Run ``fn`` in the pool, or per _meta (``read_only``) or _change (``quick``); journal it.

        A success is journaled if the policy says so (``journal_ok`` False: the
        caller journals it), a failure always. Raises the SFTP error for a failure.
        """
        await self._settle()  # a path request sees every write answered before it
        started = time.monotonic()
        try:
            if read_only:
                result = await self._meta(fn, *args)
            elif quick:
                result = await self._change(fn, *args)
            else:
                result = await self._io(fn, *args)
        except NotQuick:
            raise  # not an outcome: the caller runs it in the pool
        except Exception as exc:
            status, error = sftp_error(exc)
            self.ctx.sink.emit(
                self._event(
                    op,
                    path,
                    status=status.name,
                    message=status.journal_message,
                    duration=time.monotonic() - started,
                    **fields,
                )
            )
            raise error from None
        if journal_ok if journal_ok is not None else policy.journaled(op, True):
            self.ctx.sink.emit(self._event(op, path, duration=time.monotonic() - started, **fields))
        return result

    # -- files --------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile:
        mode = attrs.permissions & 0o7777 if attrs.permissions is not None else None
        opener: Callable[..., OpenFile] = self.fs.open
        quick_opener: Callable[..., OpenFile] = self._open_quick
        track = self._track and bool(pflags & _CHANGES)
        if track:
            usage = await self._usage()
            full = None
            if self._quota_files and usage.files >= self._quota_files:
                full = f"Quota exceeded: at most {self._quota_files} files"
            opener = functools.partial(self.fs.open, track=True, files_full=full)
            quick_opener = functools.partial(self.fs.open, quick=True, track=True, files_full=full)
        # A create is quick; truncating a big file frees its blocks, which is
        # not: an inline open finds out (NotQuick), and it runs in the pool.
        may_be_inline = self.ctx.inline_local_changes and self._local is not False
        try:
            f = await self._do(
                Op.OPEN,
                path,
                quick_opener if pflags & FXF_TRUNC and may_be_inline else opener,
                path,
                pflags,
                attrs,
                flags=pflags,
                mode=mode,
                read_only=not pflags & _CHANGES,  # opening to read changes nothing
                quick=True,
            )
        except NotQuick:
            f = await self._do(Op.OPEN, path, opener, path, pflags, attrs, flags=pflags, mode=mode)
        if track and (f.created or f.freed):
            self._quotas.change(self.ctx.user.login, -f.freed, 1 if f.created else 0)
        self.ctx.open_files.add(id(f))
        if f.writable:
            queue = WriteQueue(
                f.fd,
                self._io,
                self.ctx.write_budget,
                per_handle_limit=HANDLE_LIMIT,
                write=self.fs.write_chunks,
                run_small=self._change,
                small=SMALL_WRITE,
            )
            queue.on_error = functools.partial(self._write_failed, f)
            f.queue = queue
            self._queues.add(queue)
        return f

    def _open_quick(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile:
        return self.fs.open(path, pflags, attrs, quick=True)

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes (at most :data:`MAX_IO`, as sftp-server) at ``offset``.

        A small READ (up to :data:`SMALL_WRITE`) that the page cache holds is
        answered on the event loop (``RWF_NOWAIT`` never waits on a disk or a
        server: it fails instead); the rest in the pool, where big reads
        copy on the other core while the loop encrypts. A READ of an open
        handle runs without switching credentials: the kernel checked access
        when the user opened it, and NFS sends the opener's credentials
        (``file->f_cred``) with every read.
        """
        f = _file(file_obj)
        if offset > MAX_OFFSET:
            message = f"Offset out of range (at most {MAX_OFFSET})"
            raise self._refuse_io(Op.READ, f, FX_FAILURE, message)
        size = min(size, MAX_IO)
        if f.queue is not None:
            await f.queue.drain()
        if size <= SMALL_WRITE:
            data = self.fs.read_cached(f, offset, size)
            if data is not None:
                return data
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            data = await loop.run_in_executor(self.ctx.executor, self.fs.read, f, offset, size)
        except OSError as exc:
            self._io_failed(Op.READ, f, exc)
        finally:
            self._in_flight -= 1
            if self._exited and not self._in_flight:
                self.fs.close()
        # Counted here, on the loop: READs of one handle may run in the pool at once.
        f.bytes_read += len(data)
        return data

    async def write(self, file_obj: object, offset: int, data: bytes | memoryview) -> int:
        f = _file(file_obj)
        problem = range_problem(offset, len(data))
        if problem is not None:
            raise self._refuse_io(Op.WRITE, f, FX_FAILURE, problem)
        # Where the file ends after this WRITE (O_APPEND writes at the end, whatever the offset).
        end = (f.size if f.pflags & FXF_APPEND else offset) + len(data)
        if end > f.size and f.writable:
            if self._max_upload and end > self._max_upload:
                raise self._refuse_io(
                    Op.WRITE,
                    f,
                    FX_QUOTA_EXCEEDED,
                    f"File too large: at most {self._max_upload} bytes",
                )
            if self._track:
                usage = await self._usage()
                over = self._over_quota(usage, end - f.size)
                if over is not None:
                    raise self._refuse_io(Op.WRITE, f, FX_QUOTA_EXCEEDED, over)
                self._quotas.change(self.ctx.user.login, end - f.size)
            f.size = end
        queue = f.queue
        if queue is None:  # a read-only handle: let the OS refuse it
            written, failure = await self._io(self.fs.write_chunks, f.fd, [(offset, data)])
            if failure is not None:
                self._io_failed(Op.WRITE, f, failure)
            f.bytes_written += written
            return written
        self._raise_write_error(queue)
        # Answered once queued; the queue writes it (see writebehind).
        await queue.add(offset, data)
        self._raise_write_error(queue)
        return len(data)

    @staticmethod
    def _raise_write_error(queue: WriteQueue) -> None:
        """Tell the client about a failed write-behind batch (it was journaled already)."""
        if queue.error is not None:
            queue.reported = True
            raise sftp_error(queue.error)[1] from None

    def _write_failed(self, f: OpenFile, exc: OSError) -> None:
        assert f.queue is not None
        f.bytes_written = f.queue.written
        self._journal_io_error(Op.WRITE, f, exc)

    def _io_failed(self, op: Op, f: OpenFile, exc: OSError) -> NoReturn:
        raise self._journal_io_error(op, f, exc) from None

    def _journal_io_error(self, op: Op, f: OpenFile, exc: OSError) -> asyncssh.SFTPError:
        status, error = sftp_error(exc)
        f.error = policy.io_failed(op, status.message)
        self.ctx.sink.emit(
            Event(
                op=op,
                session=self.ctx.info,
                path=_decode(f.virtual),
                status=status.name,
                message=status.journal_message,
                bytes_read=f.bytes_read,
                bytes_written=f.bytes_written,
            )
        )
        return error

    async def close(self, file_obj: object) -> None:
        f = _file(file_obj)
        ending = self.ctx.ending
        self.ctx.open_files.discard(id(f))
        queue = f.queue
        close_error: OSError | None = None
        if queue is not None:
            # The last writes and the close in one trip; a write failure sets f.error.
            close_error = await queue.close(fsync=self._must_fsync(f, ending))
            self._queues.discard(queue)
            f.bytes_written = queue.written
        else:
            try:
                await self._change(os.close, f.fd)
            except OSError as exc:
                close_error = exc
        status, close_failed, error = "ok", None, None
        if close_error is not None:  # NFS reports deferred write errors here
            failure, error = sftp_error(close_error)
            status, close_failed = failure.name, failure.journal_message
        if queue is not None and queue.error is not None and not queue.reported:
            # Every WRITE was answered OK before this one failed: the CLOSE says so.
            failure, error = sftp_error(queue.error)
            status = failure.name
        verdict = self.uploads.closed(
            os.fsdecode(f.virtual),
            writable=f.writable,
            written=f.bytes_written,
            io_error=f.error,
            close_error=close_failed,
            ending=ending,
        )
        upload, message = verdict.upload, verdict.message
        event = Event(
            op=Op.CLOSE,
            session=self.ctx.info,
            path=_decode(f.virtual),
            flags=f.pflags,
            bytes_read=f.bytes_read,
            bytes_written=f.bytes_written,
            duration=time.monotonic() - f.opened_at,
            status=status,
            message=message,
            upload=upload,
            device=f.device if upload is UploadState.COMPLETE else None,
            inode=f.inode if upload is UploadState.COMPLETE else None,
        )
        if upload is UploadState.COMPLETE:
            await self._completed(event, event.path or "")
        else:
            self.ctx.sink.emit(event)
        if error is not None:
            raise error

    def _must_fsync(self, f: OpenFile, ending: bool) -> bool:
        """Whether a CLOSE must put the file on disk first (see SessionContext.fsync_uploads)."""
        if not (self.ctx.fsync_uploads and f.writable) or ending:
            return False
        path = os.fsdecode(f.virtual)
        return self.uploads.is_temp(path) or self.ctx.durable(path)

    async def _completed(self, event: Event, final: str) -> None:
        """Journal a completed upload; if a job may follow, reply only once it is committed."""
        if not self.ctx.durable(final):
            self.ctx.sink.emit(event)  # nothing waits on it: it rides the next group commit
            return
        try:
            # The reply waits for the commit: an OK reply means the upload and its job exist.
            await self.ctx.sink.emit_durable(event)
        except Exception as exc:
            # Why (a storage error's own words) goes to the log, never to the client.
            log.error("upload of %s not recorded: %s", final, exc)
            raise asyncssh.SFTPFailure("upload not recorded, try again") from None

    async def fstat(self, file_obj: object) -> os.stat_result:
        f = _file(file_obj)
        return await self._do(Op.STAT, f.virtual, os.fstat, f.fd, journal_ok=False, read_only=True)

    async def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        f = _file(file_obj)
        await self._setstat_any(f.virtual, None, f, attrs)
        if attrs.size is not None:
            f.size = attrs.size

    async def fsync(self, file_obj: object) -> None:
        f = _file(file_obj)
        await self._do(Op.FSYNC, f.virtual, os.fsync, f.fd, journal_ok=False)

    async def fstatvfs(self, file_obj: object) -> os.statvfs_result:
        f = _file(file_obj)
        return await self._do(
            Op.STATVFS, f.virtual, os.fstatvfs, f.fd, journal_ok=False, read_only=True
        )

    async def data_ranges(
        self, file_obj: object, offset: int, length: int, most: int
    ) -> tuple[list[tuple[int, int]], bool]:
        """Where an open file holds data (ranges@asyncssh.com; see UserFS.data_ranges).

        In the pool: finding holes may read the file's extent map from disk.
        A failure is journaled as a failed READ.
        """
        f = _file(file_obj)
        return await self._do(
            Op.READ, f.virtual, self.fs.data_ranges, f, offset, length, most, journal_ok=False
        )

    # -- paths --------------------------------------------------------------

    async def stat(self, path: bytes) -> os.stat_result:
        return await self._do(
            Op.STAT,
            path,
            self.fs.stat,
            path,
            journal_ok=False,
            read_only=True,
        )

    async def lstat(self, path: bytes) -> os.stat_result:
        return await self._do(
            Op.STAT,
            path,
            self.fs.lstat,
            path,
            journal_ok=False,
            read_only=True,
        )

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._setstat_any(path, path, None, attrs)

    async def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._setstat_any(path, path, None, attrs, follow=False)

    async def _setstat_any(
        self,
        shown: bytes,
        path: bytes | None,
        f: OpenFile | None,
        attrs: SFTPAttrs,
        *,
        follow: bool = True,
    ) -> None:
        """SETSTAT, LSETSTAT, FSETSTAT: a size is checked like a WRITE's end, and counted."""
        may_grow: tuple[int, str] | None = None
        if attrs.size is not None:
            problem = size_problem(attrs.size)
            if problem is not None:
                raise self.refused(Op.SETSTAT, shown, FX_FAILURE, problem)
            if self._max_upload and attrs.size > self._max_upload:
                message = f"File too large: at most {self._max_upload} bytes"
                raise self.refused(Op.SETSTAT, shown, FX_QUOTA_EXCEEDED, message)
            if self._track and self._quota_bytes:
                usage = await self._usage()
                room = max(0, self._quota_bytes - usage.used_bytes)
                may_grow = room, f"Quota exceeded: at most {self._quota_bytes} bytes"
            elif self._track:
                await self._usage()
        grew = await self._do(
            Op.SETSTAT,
            shown,
            functools.partial(self.fs.setstat, follow=follow, may_grow=may_grow),
            path,
            f,
            attrs,
            attrs=summarize(attrs),
        )
        if self._track and grew:
            self._quotas.change(self.ctx.user.login, grew)

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        names = await self._do(Op.LIST, path, self.fs.list, path, journal_ok=False)
        self.ctx.sink.emit(self._event(Op.LIST, path, attrs={"entries": len(names) - 2}))
        for name in names:
            yield name

    def format_user(self, uid: int | None) -> str:
        return self.fs.name_of("u", uid)

    def format_group(self, gid: int | None) -> str:
        return self.fs.name_of("g", gid)

    async def remove(self, path: bytes) -> None:
        if self._track:
            await self._usage()  # known before, so the change below counts
        st = await self._do(Op.REMOVE, path, self.fs.remove, path)
        self._freed(st)

    def _freed(self, st: os.stat_result | None) -> None:
        """A name of ``st`` is gone: count the file as freed if it was its last."""
        if self._track and st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            self._quotas.change(self.ctx.user.login, -st.st_size, -1)

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        mode = attrs.permissions & 0o7777 if attrs.permissions is not None else None
        await self._do(Op.MKDIR, path, self.fs.mkdir, path, attrs, mode=mode, quick=True)

    async def rmdir(self, path: bytes) -> None:
        await self._do(Op.RMDIR, path, self.fs.rmdir, path, quick=True)

    async def realpath(self, path: bytes) -> bytes:
        return await self._do(
            Op.REALPATH, path, self.fs.realpath, path, journal_ok=False, read_only=True
        )

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, overwrite=False)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, overwrite=True)

    async def _rename(self, oldpath: bytes, newpath: bytes, *, overwrite: bool) -> None:
        old, new = _decode(virtual(oldpath)), _decode(virtual(newpath))
        assert old is not None and new is not None
        attrs = {"overwrite": True} if overwrite else None
        rename = functools.partial(self.fs.rename, overwrite=overwrite)
        started = time.monotonic()
        if self._track and overwrite:
            await self._usage()
        st, replaced = await self._do(
            Op.RENAME, oldpath, rename, oldpath, newpath, path2=new, attrs=attrs, journal_ok=False
        )
        self._freed(replaced)
        verdict = self.uploads.renamed(old, new)
        complete = verdict.upload is UploadState.COMPLETE
        event = self._event(
            Op.RENAME,
            oldpath,
            path2=new,
            attrs=attrs,
            duration=time.monotonic() - started,
            bytes_written=verdict.written,
            upload=verdict.upload,
            message=verdict.message,
            device=st.st_dev if complete else None,
            inode=st.st_ino if complete else None,
        )
        if not complete:
            self.ctx.sink.emit(event)
            return
        # A temporary upload reaching its final name: this rename completes it,
        # so (like a CLOSE) the reply waits until the upload is committed.
        await self._completed(event, new)

    async def readlink(self, path: bytes) -> bytes:
        return await self._do(
            Op.READLINK, path, self.fs.readlink, path, journal_ok=False, read_only=True
        )

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # (target, link), whatever order the client sent them in: the handler
        # decides that as OpenSSH's sftp-server does (handler._process_symlink).
        await self._do(
            Op.SYMLINK,
            newpath,
            self.fs.symlink,
            oldpath,
            newpath,
            path2=_decode(oldpath),
            quick=True,
        )

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        await self._do(
            Op.LINK,
            newpath,
            self.fs.link,
            oldpath,
            newpath,
            path2=_decode(virtual(oldpath)),
            quick=True,
        )

    async def statvfs(self, path: bytes) -> os.statvfs_result:
        return await self._do(
            Op.STATVFS, path, self.fs.statvfs, path, journal_ok=False, read_only=True
        )


def _file(file_obj: object) -> OpenFile:
    if not isinstance(file_obj, OpenFile):  # pragma: no cover - asyncssh only hands back ours
        raise asyncssh.SFTPInvalidHandle("Invalid file handle")
    return file_obj
