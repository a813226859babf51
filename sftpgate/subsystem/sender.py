"""The tap's side of the daemon's Unix socket: send events, collect acks, spool the rest.

Single-threaded and never blocking: the socket is non-blocking, lines wait in
a buffer that the relay flushes once the oldest has waited ``FLUSH_DELAY``
(or ``FLUSH_BYTES`` are waiting; and when the socket is writable again after
it took only part), and acks are read when it is readable. A daemon that
stops reading (``MAX_BEHIND`` bytes unsent) is treated like one that is gone:
from then on events go to the spool.

Why wait at all: a session of small files makes a few events per file, and
sending each at once woke the daemon for each, and each durable emit woke its
journal writer for a commit of its own. On a small machine that CPU is taken
from the transfer the tap relays; a few milliseconds of gathering turn dozens
of wake-ups and commits into one (figure 11 in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import select
import socket
import time
from pathlib import Path

from ..events import Event
from .wire import encode_line

log = logging.getLogger(__name__)

MAX_BEHIND = 16 * 1024 * 1024
FLUSH_DELAY = 0.01  # seconds an event may wait for others to go with it
FLUSH_BYTES = 64 * 1024  # ... unless this much is waiting


class EventSender:
    """Delivers events to the daemon; what is not acknowledged ends in the spool."""

    def __init__(
        self, socket_path: Path, spool_dir: Path, session_id: str, ack_timeout: float = 5.0
    ) -> None:
        self._spool_path = spool_dir / f"{os.getuid()}-{session_id}.jsonl"
        self._ack_timeout = ack_timeout
        self._unacked: dict[int, bytes] = {}
        self._out = bytearray()  # lines not yet taken by the socket
        self._in = bytearray()  # an ack line not yet complete
        self._due = 0.0  # when the oldest line in _out must be handed to the socket
        self._blocked = False  # the socket took less than we had: wait until it is writable
        self._seq = 0
        self._spool_fd: int | None = None
        self._sock: socket.socket | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(str(socket_path))
            sock.setblocking(False)
            self._sock = sock
        except OSError as exc:
            sock.close()
            log.warning("daemon unreachable at %s (%s); spooling events", socket_path, exc)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int | None:
        """The socket to poll (readable: acks; writable: see :attr:`wants_write`)."""
        return self._sock.fileno() if self._sock is not None else None

    @property
    def wants_write(self) -> bool:
        """The socket did not take everything: poll it for writing, then :meth:`flush`."""
        return self._sock is not None and self._blocked

    def timeout(self) -> int | None:
        """Milliseconds a poll may sleep before :meth:`flush_due` has work (None: no limit)."""
        if self._sock is None or not self._out or self._blocked:
            return None
        return max(0, math.ceil((self._due - time.monotonic()) * 1000))

    def flush_due(self) -> None:
        """:meth:`flush` if the oldest waiting line has waited ``FLUSH_DELAY``."""
        if self._out and not self._blocked and time.monotonic() >= self._due:
            self.flush()

    def send(self, event: Event) -> None:
        self._seq += 1
        line = encode_line(self._seq, event)
        if self._sock is None:
            self._spool([line])
            return
        self._unacked[self._seq] = line
        if not self._out:
            self._due = time.monotonic() + FLUSH_DELAY
        self._out += line
        if len(self._out) > MAX_BEHIND:
            log.warning("daemon is %d bytes behind; spooling events", len(self._out))
            self._lost_daemon()
        elif len(self._out) >= FLUSH_BYTES and not self._blocked:
            self.flush()
        # Otherwise no send() here: the relay calls flush_due (see FLUSH_DELAY).

    def flush(self) -> None:
        """Hand the socket what it takes now."""
        if self._sock is None or not self._out:
            return
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost_daemon()
            return
        del self._out[:sent]
        self._blocked = bool(self._out)

    def read_acks(self) -> None:
        """Take the acks that arrived; a closed or garbled socket means the daemon is gone."""
        if self._sock is None:
            return
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost_daemon()
            return
        self._in += data
        *lines, rest = self._in.split(b"\n")
        self._in = bytearray(rest)
        for raw in lines:
            try:
                seq = int(json.loads(raw)["ack"])
            except (ValueError, KeyError, TypeError):
                self._lost_daemon()
                return
            self._unacked.pop(seq, None)

    def _lost_daemon(self) -> None:
        # From now on everything goes to the spool; what is unacked is spooled at close().
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self._out.clear()
        self._blocked = False

    def _spool(self, lines: list[bytes]) -> None:
        if not lines:
            return
        try:
            if self._spool_fd is None:
                self._spool_fd = os.open(
                    self._spool_path,
                    # New and 0600 (a umask only takes bits away); the name is
                    # random, so a file already there was planted: not used.
                    os.O_WRONLY
                    | os.O_CREAT
                    | os.O_EXCL
                    | os.O_APPEND
                    | os.O_NOFOLLOW
                    | os.O_CLOEXEC,
                    0o600,
                )
                # Held while we write: the daemon replays only files nobody holds.
                fcntl.flock(self._spool_fd, fcntl.LOCK_EX)
            os.write(self._spool_fd, b"".join(lines))
        except OSError as exc:
            log.error("cannot spool %d events to %s: %s", len(lines), self._spool_path, exc)

    def _wait(self, events: int, deadline: float) -> bool:
        """Poll the socket for ``events`` until ``deadline``; False once time is up."""
        remaining = deadline - time.monotonic()
        if self._sock is None or remaining <= 0:
            return False
        poller = select.poll()
        poller.register(self._sock, events)
        poller.poll(remaining * 1000)
        return True

    def close(self) -> None:
        """Wait (at most ``ack_timeout``) for outstanding acks, spool the rest, release the spool.

        The daemon acks an event once it is committed and sends the last acks
        when it sees the end of our stream, so: send everything, shut down our
        side, then read acks until none is missing or the daemon hangs up.
        """
        deadline = time.monotonic() + self._ack_timeout
        # Acks are read meanwhile: a daemon may wait for us to take them before reading on.
        while self._out and self._wait(select.POLLOUT | select.POLLIN, deadline):
            self.read_acks()
            self.flush()
        if self._sock is not None and not self._out:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
            while self._unacked and self._wait(select.POLLIN, deadline):
                self.read_acks()
        leftover = [self._unacked[seq] for seq in sorted(self._unacked)]
        self._unacked.clear()
        self._spool(leftover)
        self._lost_daemon()
        if self._spool_fd is not None:
            os.fsync(self._spool_fd)
            os.close(self._spool_fd)  # also releases the lock
            self._spool_fd = None
