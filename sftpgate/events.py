"""The one event type that flows from the front doors to the journal.

Front doors build :class:`Event` objects and hand them to an :class:`EventSink`;
they never import the journal. Everything here is plain data.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


class Op(str, Enum):
    """What happened. Persisted as the ``op`` column of the journal."""

    LOGIN = "login"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    OPEN = "open"
    CLOSE = "close"
    READ = "read"  # journaled only when it fails; bytes are summed at CLOSE
    WRITE = "write"  # likewise
    LIST = "list"
    REMOVE = "remove"
    RENAME = "rename"
    MKDIR = "mkdir"
    RMDIR = "rmdir"
    SETSTAT = "setstat"
    SYMLINK = "symlink"
    LINK = "link"
    READLINK = "readlink"
    STAT = "stat"
    REALPATH = "realpath"
    STATVFS = "statvfs"
    FSYNC = "fsync"
    # Written by the pipeline, not by a client: what became of an upload.
    CONVERTED = "converted"
    REJECTED = "rejected"
    # The OpenSSH tap saw bytes it could not parse (relayed unchanged all the same).
    PROTOCOL_ERROR = "protocol_error"
    # The defender (defender.py): an address banned or unbanned, a connection refused at the door.
    BAN = "ban"
    UNBAN = "unban"
    REFUSED = "refused"
    # The admin API (sftpgate/api/): one row per request; a session ended at an admin's request.
    ADMIN = "admin"
    DISCONNECT = "disconnect"


class UploadState(str, Enum):
    """How an upload ended. ``incomplete``: the session ended with the handle open."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


STATUS_OK = "ok"

# This process's node name (``server.node``): one per process, set once at start.
_node = socket.gethostname()


def set_node(name: str) -> None:
    """Name this process's node: every :class:`SessionInfo` made from now on carries it."""
    global _node
    _node = name


def current_node() -> str:
    """The node name :class:`SessionInfo` objects get (``server.node``; the host name until set)."""
    return _node


# This gateway process's id in the storage's registry of gateway processes (journal/sweep.py):
# the journal stamps each session it inserts with it, so a sweeper can tell whose it was.
_process: str | None = None


def set_process(process_id: str | None) -> None:
    """Name the gateway process that sessions journaled from now on belong to."""
    global _process
    _process = process_id


def current_process() -> str | None:
    """The gateway process id sessions are stamped with (None: not a registered gateway)."""
    return _process


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Who is on the other end of a connection; fixed once authentication is done."""

    id: str
    remote_addr: str
    remote_port: int
    login: str | None = None
    client_version: str | None = None
    auth_method: str | None = None
    started_at: float = field(default_factory=time.time)
    # Which gateway host served it (``server.node``): a cluster keeps one journal.
    node: str = field(default_factory=current_node)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing a user did (or tried), with its outcome.

    ``status`` is ``"ok"`` or the SFTP status name of the failure
    (``permission_denied``, ``no_such_file`` ...); ``message`` says why.
    """

    op: Op
    session: SessionInfo
    time: float = field(default_factory=time.time)
    path: str | None = None
    path2: str | None = None
    flags: int | None = None
    mode: int | None = None
    attrs: dict[str, Any] | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    duration: float | None = None
    status: str = STATUS_OK
    message: str | None = None
    upload: UploadState | None = None
    # The file a completed upload left (st_dev, st_ino): the pipeline opens
    # that file and no other. None where the front door cannot know it.
    device: int | None = None
    inode: int | None = None
    # Set on events that may arrive twice (the OpenSSH tap's spool replays):
    # the journal records each key once.
    key: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


class EventSink(Protocol):
    """Where front doors send events.

    ``emit`` never blocks and never raises. ``emit_durable`` returns once the
    event is committed (and whatever it started with it); the front door
    awaits it before replying to the client, so an OK reply means it is on disk.
    It raises if the event cannot be committed, and raises within a bounded
    time (``journal.durable_timeout``) if the commit does not come: a client
    is told its upload failed, it never waits for good. Every implementation
    must keep that bound.
    """

    def emit(self, event: Event) -> None: ...

    async def emit_durable(self, event: Event) -> None: ...
