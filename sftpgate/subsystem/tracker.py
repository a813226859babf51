"""Pairs the requests and replies the subsystem tap sees into journal events. Pure.

The tap feeds what its two :class:`~sftpgate.sftp.reader.PacketReader`
objects yield to :meth:`Tracker.client` and :meth:`Tracker.server`; the
tracker matches replies to requests by id, follows handles from OPEN to CLOSE
and returns :class:`~sftpgate.events.Event` objects shaped exactly like those
of the asyncssh front door (``sftpgate.frontdoor.sftp``): the same ops, and
the same meaning: which requests are journaled and what a CLOSE, a RENAME or
the session's end means are decided by :mod:`sftpgate.sftp.policy`, for both.

It only sees a copy of the traffic, so it never changes an outcome: the
events describe what ``sftp-server`` answered.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from ..events import Event, Op, SessionInfo, UploadState
from ..sftp import constants as codec
from ..sftp import policy
from ..sftp.attrs import summarize
from ..sftp.packets import Attrs, ProtocolError, Reply, Request

# sftp-server answers requests in order and at most a client's window ahead
# (OpenSSH's client pipelines 64); this only bounds a stream whose replies stopped.
_MAX_PENDING: Final = 65536

Item = Request | Reply | ProtocolError


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _mode(attrs: Attrs | None) -> int | None:
    if attrs is None or attrs.permissions is None:
        return None
    return attrs.permissions & 0o7777


@dataclass(slots=True)
class _Handle:
    """A handle sftp-server gave out, with what went through it."""

    path: str
    pflags: int
    opened: float
    is_dir: bool = False
    bytes_read: int = 0
    bytes_written: int = 0
    error: str | None = None
    unknown_copy: bool = False
    entries: int = 0
    list_failure: tuple[str, str | None] | None = None

    @property
    def writable(self) -> bool:
        return bool(self.pflags & (codec.FXF_WRITE | codec.FXF_APPEND))


@dataclass(slots=True)
class _Pending:
    req: Request
    at: float


Handler = Callable[["Tracker", _Pending, Reply, float, list[Event]], None]


class Tracker:
    """Turns one SFTP session's requests and replies into journal events.

    ``home`` is ``sftp-server``'s working directory (the user's home): relative
    paths resolve against it, and every journaled path is absolute and
    normalised. ``clock`` gives event times (injectable for tests). No method
    raises: anything unexpected becomes a ``protocol_error`` event.
    """

    def __init__(
        self,
        session: SessionInfo,
        home: str,
        temp_patterns: tuple[str, ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.session = session
        self.home = posixpath.normpath(home)
        self.temp_patterns = temp_patterns
        self.clock = clock
        self._pending: dict[int, _Pending] = {}
        self._handles: dict[bytes, _Handle] = {}
        self.uploads = policy.Uploads(temp_patterns)

    # -- feeding ----------------------------------------------------------------------

    def client(self, items: Iterable[Item]) -> list[Event]:
        """Take what the client-side reader yielded; return events (protocol errors only)."""
        out: list[Event] = []
        for item in items:
            now = self.clock()
            try:
                if isinstance(item, ProtocolError):
                    out.append(self._protocol_error(item, "client", now))
                elif isinstance(item, Request) and self._handler(item) is not None:
                    self._pending.pop(item.id, None)  # a reused id replaces the old request
                    self._pending[item.id] = _Pending(item, now)
                    if len(self._pending) > _MAX_PENDING:
                        del self._pending[next(iter(self._pending))]
            except Exception as exc:  # the tap must never break a transfer
                out.append(self._internal_error(exc, now))
        return out

    def server(self, items: Iterable[Item]) -> list[Event]:
        """Take what the server-side reader yielded; return the events its replies complete."""
        out: list[Event] = []
        for item in items:
            now = self.clock()
            try:
                if isinstance(item, ProtocolError):
                    out.append(self._protocol_error(item, "server", now))
                elif isinstance(item, Reply) and item.type != codec.FXP_VERSION:
                    pending = self._pending.pop(item.id, None)
                    if pending is not None:
                        handler = self._handler(pending.req)
                        if handler is not None:
                            handler(self, pending, item, now, out)
            except Exception as exc:  # the tap must never break a transfer
                out.append(self._internal_error(exc, now))
        return out

    def finish(self) -> list[Event]:
        """The stream ended: close what the client left open; drop unanswered requests.

        A write handle still open becomes a CLOSE with ``upload=incomplete``
        (the session was cut off); a directory handle still open is journaled
        as the listing it was.
        """
        now = self.clock()
        out: list[Event] = []
        for h in self._handles.values():
            if h.is_dir:
                out.append(self._list_event(h, now))
                continue
            verdict = self.uploads.closed(
                h.path,
                writable=h.writable,
                written=h.bytes_written,
                io_error=h.error,
                ending=True,
            )
            out.append(self._close_event(h, now, "ok", verdict.message, verdict.upload))
        self._handles.clear()
        self._pending.clear()
        return out

    @property
    def open_handles(self) -> int:
        """Handles sftp-server gave out that are not closed yet."""
        return len(self._handles)

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _handler(req: Request) -> Handler | None:
        if req.type == codec.FXP_EXTENDED:
            return _ON_EXTENDED.get(req.extension or "")
        return _ON_REPLY.get(req.type)

    def _resolve(self, raw: bytes | None) -> str | None:
        if raw is None:
            return None
        path = posixpath.normpath(posixpath.join(self.home, _decode(raw)))
        # POSIX keeps a leading "//"; the journal wants one spelling per file.
        return "/" + path.lstrip("/") if path.startswith("//") else path

    def _expand(self, raw: bytes | None) -> str | None:
        """expand-path@openssh.com: like a relative path, with "~" and "~/" meaning home."""
        if raw is None:
            return None
        text = _decode(raw)
        if text == "~" or text.startswith("~/"):
            return self._resolve(raw[2:])
        if text.startswith("~"):
            return text  # another user's home: not ours to resolve
        return self._resolve(raw)

    def _handle_path(self, handle: bytes | None) -> str | None:
        h = self._handles.get(handle) if handle is not None else None
        return h.path if h is not None else None

    @staticmethod
    def _outcome(reply: Reply) -> tuple[str, str | None]:
        """(status, message): the message only when it failed."""
        if reply.type != codec.FXP_STATUS or reply.code is None:
            return "ok", None
        status = codec.status_name(reply.code)
        if status == "ok":
            return status, None
        return status, _decode(reply.message) if reply.message is not None else None

    def _event(self, op: Op, pending: _Pending, reply: Reply, now: float, **fields: Any) -> Event:
        status, message = self._outcome(reply)
        fields.setdefault("message", message)
        return Event(
            op=op,
            session=self.session,
            time=now,
            duration=now - pending.at,
            status=status,
            **fields,
        )

    def _protocol_error(self, err: ProtocolError, stream: str, now: float) -> Event:
        return Event(
            op=Op.PROTOCOL_ERROR,
            session=self.session,
            time=now,
            status="bad_message",
            message=err.reason,
            attrs={"stream": stream, "offset": err.offset},
        )

    def _internal_error(self, exc: Exception, now: float) -> Event:
        return Event(
            op=Op.PROTOCOL_ERROR,
            session=self.session,
            time=now,
            status="failure",
            message=f"tracker error: {type(exc).__name__}: {exc}",
        )

    def _list_event(self, h: _Handle, now: float) -> Event:
        status, message = h.list_failure or ("ok", None)
        return Event(
            op=Op.LIST,
            session=self.session,
            time=now,
            path=h.path,
            attrs={"entries": h.entries},
            duration=now - h.opened,
            status=status,
            message=message,
        )

    # -- replies, by request type ------------------------------------------------------------

    def _on_open(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        path, pflags = self._resolve(p.req.path), p.req.pflags or 0
        if reply.type == codec.FXP_HANDLE and reply.handle is not None and path is not None:
            self._handles[reply.handle] = _Handle(path, pflags, p.at)
        out.append(
            self._event(Op.OPEN, p, reply, now, path=path, flags=pflags, mode=_mode(p.req.attrs))
        )

    def _on_opendir(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        path = self._resolve(p.req.path)
        if reply.type == codec.FXP_HANDLE and reply.handle is not None and path is not None:
            self._handles[reply.handle] = _Handle(path, 0, p.at, is_dir=True)
        elif self._outcome(reply)[0] != "ok":
            out.append(self._event(Op.LIST, p, reply, now, path=path))

    def _on_readdir(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        h = self._handles.get(p.req.handle or b"")
        if h is None:
            return
        if reply.type == codec.FXP_NAME:
            h.entries += sum(1 for n in reply.names if n.filename not in (b".", b".."))
            return
        status, message = self._outcome(reply)
        if status not in ("ok", "eof"):
            h.list_failure = (status, message)

    def _on_read(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        h = self._handles.get(p.req.handle or b"")
        if reply.type == codec.FXP_DATA:
            if h is not None:
                h.bytes_read += reply.data_len or 0
            return
        self._io_outcome(Op.READ, h, p, reply, now, out)

    def _on_write(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        h = self._handles.get(p.req.handle or b"")
        if self._outcome(reply)[0] == "ok":
            if h is not None:
                h.bytes_written += p.req.data_len or 0
            return
        self._io_outcome(Op.WRITE, h, p, reply, now, out)

    def _io_outcome(
        self,
        op: Op,
        h: _Handle | None,
        p: _Pending,
        reply: Reply,
        now: float,
        out: list[Event],
    ) -> None:
        """A READ or WRITE failed (EOF is no failure): journal it and mark the handle."""
        status, message = self._outcome(reply)
        if status in ("ok", "eof"):
            return
        if h is not None:
            h.error = policy.io_failed(op, message or status)
        out.append(
            self._event(
                op,
                p,
                reply,
                now,
                path=h.path if h else None,
                bytes_read=h.bytes_read if h else None,
                bytes_written=h.bytes_written if h else None,
            )
        )

    def _on_close(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        # sftp-server forgets the handle whatever close(2) returned.
        h = self._handles.pop(p.req.handle or b"", None)
        if h is None:
            return
        if h.is_dir:
            out.append(self._list_event(h, now))
            return
        status, reply_message = self._outcome(reply)
        verdict = self.uploads.closed(
            h.path,
            writable=h.writable,
            written=h.bytes_written,
            io_error=h.error,
            close_error=None if status == "ok" else reply_message or status,
            unknown_copy=h.unknown_copy,
        )
        out.append(self._close_event(h, now, status, verdict.message, verdict.upload))

    def _close_event(
        self, h: _Handle, now: float, status: str, message: str | None, upload: UploadState | None
    ) -> Event:
        return Event(
            op=Op.CLOSE,
            session=self.session,
            time=now,
            path=h.path,
            flags=h.pflags,
            bytes_read=h.bytes_read,
            bytes_written=h.bytes_written,
            duration=now - h.opened,
            status=status,
            message=message,
            upload=upload,
        )

    def _on_setstat(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        path = (
            self._handle_path(p.req.handle)
            if p.req.type == codec.FXP_FSETSTAT
            else self._resolve(p.req.path)
        )
        out.append(self._event(Op.SETSTAT, p, reply, now, path=path, attrs=summarize(p.req.attrs)))

    def _on_mkdir(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        out.append(
            self._event(
                Op.MKDIR, p, reply, now, path=self._resolve(p.req.path), mode=_mode(p.req.attrs)
            )
        )

    def _on_rename(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        old, new = self._resolve(p.req.path), self._resolve(p.req.path2)
        overwrite = p.req.type == codec.FXP_EXTENDED  # posix-rename@openssh.com
        attrs = {"overwrite": True} if overwrite else None
        if self._outcome(reply)[0] != "ok" or old is None or new is None:
            out.append(self._event(Op.RENAME, p, reply, now, path=old, path2=new, attrs=attrs))
            return
        verdict = self.uploads.renamed(old, new)
        out.append(
            self._event(
                Op.RENAME,
                p,
                reply,
                now,
                path=old,
                path2=new,
                attrs=attrs,
                bytes_written=verdict.written,
                upload=verdict.upload,
                message=verdict.message,
            )
        )

    def _on_symlink(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        # OpenSSH sends (targetpath, linkpath); the target stays as written:
        # a relative target is relative to the link, not to the home.
        target = _decode(p.req.path) if p.req.path is not None else None
        out.append(
            self._event(Op.SYMLINK, p, reply, now, path=self._resolve(p.req.path2), path2=target)
        )

    def _on_hardlink(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        out.append(
            self._event(
                Op.LINK,
                p,
                reply,
                now,
                path=self._resolve(p.req.path2),
                path2=self._resolve(p.req.path),
            )
        )

    def _on_copy_data(self, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        src = self._handles.get(p.req.handle or b"")
        dst = self._handles.get(p.req.handle2 or b"")
        if self._outcome(reply)[0] != "ok":
            self._io_outcome(Op.WRITE, dst, p, reply, now, out)
            return
        length = p.req.length or 0
        # length 0 means "until end of file": how much moved is not on the wire.
        if src is not None:
            src.bytes_read += length
        if dst is not None:
            dst.bytes_written += length
            dst.unknown_copy = dst.unknown_copy or not length


def _journal(op: Op, *, by_handle: bool = False, expand: bool = False) -> Handler:
    """A handler for a request whose only trace is one event (if the policy journals it)."""

    def handler(t: Tracker, p: _Pending, reply: Reply, now: float, out: list[Event]) -> None:
        if not policy.journaled(op, t._outcome(reply)[0] == "ok"):
            return
        if by_handle:
            path = t._handle_path(p.req.handle)
        elif expand:
            path = t._expand(p.req.path)
        else:
            path = t._resolve(p.req.path)
        out.append(t._event(op, p, reply, now, path=path))

    return handler


_ON_REPLY: dict[int, Handler] = {
    codec.FXP_OPEN: Tracker._on_open,
    codec.FXP_CLOSE: Tracker._on_close,
    codec.FXP_READ: Tracker._on_read,
    codec.FXP_WRITE: Tracker._on_write,
    codec.FXP_LSTAT: _journal(Op.STAT),
    codec.FXP_FSTAT: _journal(Op.STAT, by_handle=True),
    codec.FXP_SETSTAT: Tracker._on_setstat,
    codec.FXP_FSETSTAT: Tracker._on_setstat,
    codec.FXP_OPENDIR: Tracker._on_opendir,
    codec.FXP_READDIR: Tracker._on_readdir,
    codec.FXP_REMOVE: _journal(Op.REMOVE),
    codec.FXP_MKDIR: Tracker._on_mkdir,
    codec.FXP_RMDIR: _journal(Op.RMDIR),
    codec.FXP_REALPATH: _journal(Op.REALPATH),
    codec.FXP_STAT: _journal(Op.STAT),
    codec.FXP_RENAME: Tracker._on_rename,
    codec.FXP_READLINK: _journal(Op.READLINK),
    codec.FXP_SYMLINK: Tracker._on_symlink,
}

# Extensions not listed (limits, home-directory, users-groups-by-id, unknown ones)
# change nothing and are not journaled, as in the asyncssh front door.
_ON_EXTENDED: dict[str, Handler] = {
    codec.EXT_POSIX_RENAME: Tracker._on_rename,
    codec.EXT_HARDLINK: Tracker._on_hardlink,
    codec.EXT_FSYNC: _journal(Op.FSYNC, by_handle=True),
    codec.EXT_STATVFS: _journal(Op.STATVFS),
    codec.EXT_FSTATVFS: _journal(Op.STATVFS, by_handle=True),
    codec.EXT_LSETSTAT: Tracker._on_setstat,
    codec.EXT_EXPAND_PATH: _journal(Op.REALPATH, expand=True),
    codec.EXT_COPY_DATA: Tracker._on_copy_data,
}
