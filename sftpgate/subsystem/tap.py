"""``sftpgate subsystem``: relay sshd ⇄ OpenSSH's sftp-server, and read copies of both streams.

Two pump threads move bytes unchanged (a read, a write, nothing else in
their way); they hand each chunk (the same bytes object, no copy) to a parser
thread through a queue. The parser decodes packets, pairs requests with
replies (``Tracker``) and passes events to an :class:`EventSender`, which
sends them to the daemon's Unix socket and spools to disk whatever the daemon
does not acknowledge. If the parser falls too far behind it stops parsing;
the relay never waits for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import queue
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from ..events import Event, Op, SessionInfo
from .codec import PacketReader
from .tracker import Tracker
from .wire import encode_line, with_key

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# Bytes the parser may lag behind before it gives up on this session.
PARSER_BACKLOG = 64 * 1024 * 1024


class EventSender:
    """Delivers events to the daemon; what is not acknowledged ends in the spool. Thread-safe."""

    def __init__(
        self, socket_path: Path, spool_dir: Path, session_id: str, ack_timeout: float = 5.0
    ) -> None:
        self._spool_path = spool_dir / f"{os.getuid()}-{session_id}.jsonl"
        self._ack_timeout = ack_timeout
        self._lock = threading.Lock()
        self._acked = threading.Condition(self._lock)
        self._unacked: dict[int, bytes] = {}
        self._seq = 0
        self._spool_fd: int | None = None
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            sock.connect(str(socket_path))
            sock.settimeout(None)
            self._sock = sock
            threading.Thread(target=self._read_acks, args=(sock,), daemon=True).start()
        except OSError as exc:
            log.warning("daemon unreachable at %s (%s); spooling events", socket_path, exc)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, event: Event) -> None:
        with self._lock:
            self._seq += 1
            line = encode_line(self._seq, with_key(event, self._seq))
            if self._sock is not None:
                try:
                    self._sock.sendall(line)
                    self._unacked[self._seq] = line
                    return
                except OSError:
                    self._lost_daemon()
            self._spool([line])

    def _read_acks(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError), sock.makefile("rb") as stream:
            for raw in stream:
                seq = int(json.loads(raw)["ack"])
                with self._lock:
                    self._unacked.pop(seq, None)
                    self._acked.notify_all()
        with self._lock:
            if self._sock is sock:
                self._lost_daemon()
            self._acked.notify_all()

    def _lost_daemon(self) -> None:
        # Called with the lock held: from now on everything goes to the spool.
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _spool(self, lines: list[bytes]) -> None:
        if not lines:
            return
        try:
            if self._spool_fd is None:
                self._spool_fd = os.open(
                    self._spool_path,
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                # Held while we write: the daemon replays only files nobody holds.
                fcntl.flock(self._spool_fd, fcntl.LOCK_EX)
            os.write(self._spool_fd, b"".join(lines))
        except OSError as exc:
            log.error("cannot spool %d events to %s: %s", len(lines), self._spool_path, exc)

    def close(self) -> None:
        """Wait (briefly) for outstanding acks, spool the rest, release the spool file."""
        deadline = time.monotonic() + self._ack_timeout
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)
            while self._unacked and self._sock is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._acked.wait(remaining)
            leftover = [self._unacked[seq] for seq in sorted(self._unacked)]
            self._unacked.clear()
            self._spool(leftover)
            self._lost_daemon()
            if self._spool_fd is not None:
                os.fsync(self._spool_fd)
                os.close(self._spool_fd)  # also releases the lock
                self._spool_fd = None


def _pump(
    src: int,
    dst: int,
    direction: str,
    feed: queue.SimpleQueue[tuple[str, bytes]],
    backlog: list[int],
    at_eof: Callable[[], None],
) -> None:
    """Move bytes ``src`` → ``dst`` unchanged; hand each chunk to the parser."""
    try:
        while True:
            data = os.read(src, CHUNK)
            if not data:
                break
            # The copy is queued BEFORE the bytes go on: otherwise sftp-server's
            # reply could reach the parser ahead of the request it answers.
            if backlog[0] < PARSER_BACKLOG:
                backlog[0] += len(data)
                feed.put((direction, data))
            else:
                feed.put((direction, b""))  # tells the parser it missed bytes
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            at_eof()
        feed.put((direction, None))  # type: ignore[arg-type]


class Parser:
    """Turns copies of both streams into events; never raises into the relay."""

    def __init__(self, tracker: Tracker, sender: EventSender) -> None:
        self.tracker = tracker
        self.sender = sender
        self.readers = {"client": PacketReader("client"), "server": PacketReader("server")}
        self.missed = False

    def run(self, feed: queue.SimpleQueue[tuple[str, bytes | None]], backlog: list[int]) -> None:
        while True:
            direction, data = feed.get()
            if data is None:
                if direction == "server":  # sftp-server is gone: the session is over
                    return
                continue
            backlog[0] -= len(data)
            try:
                self._feed(direction, data)
            except Exception as exc:  # the tap must never take the relay down
                self._emit(
                    [
                        Event(
                            Op.PROTOCOL_ERROR,
                            self.tracker.session,
                            status="failure",
                            message=f"tap error: {type(exc).__name__}: {exc}",
                        )
                    ]
                )
                self.missed = True

    def _feed(self, direction: str, data: bytes) -> None:
        if self.missed:
            return
        if not data:
            self.missed = True
            self._emit(
                [
                    Event(
                        Op.PROTOCOL_ERROR,
                        self.tracker.session,
                        status="bad_message",
                        message="the tap fell behind; the rest of the session "
                        "was relayed but not parsed",
                    )
                ]
            )
            return
        items = self.readers[direction].feed(data)
        events = self.tracker.client(items) if direction == "client" else self.tracker.server(items)
        self._emit(events)

    def _emit(self, events: list[Event]) -> None:
        for event in events:
            try:
                self.sender.send(event)
            except Exception as exc:  # pragma: no cover - send spools on OSError already
                log.error("event lost: %s", exc)


def quiet_logging() -> None:
    """Log to syslog (like sftp-server), never to stderr: sshd sends that to the client."""
    root = logging.getLogger()
    root.handlers[:] = []
    if os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        handler: logging.Handler = SysLogHandler(
            address="/dev/log", facility=SysLogHandler.LOG_AUTH
        )
        handler.setFormatter(logging.Formatter("sftpgate-subsystem: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def session_info() -> SessionInfo:
    """Who is on the other end, from what sshd tells its subsystem."""
    parts = os.environ.get("SSH_CONNECTION", os.environ.get("SSH_CLIENT", "")).split()
    addr = parts[0] if parts else "?"
    port = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return SessionInfo(
        id=secrets.token_hex(8),
        remote_addr=addr,
        remote_port=port,
        login=pwd.getpwuid(os.getuid()).pw_name,
        auth_method="openssh",
        client_version=None,
    )


def run_tap(
    sftp_server: str,
    args: list[str],
    *,
    socket_path: Path,
    spool_dir: Path,
    temp_patterns: tuple[str, ...],
    ack_timeout: float = 5.0,
) -> int:
    """Relay stdin/stdout to ``sftp_server`` until either side ends; return its exit code."""
    info = session_info()
    home = pwd.getpwuid(os.getuid()).pw_dir
    sender = EventSender(socket_path, spool_dir, info.id, ack_timeout)
    parser = Parser(Tracker(info, home, temp_patterns), sender)
    server = subprocess.Popen(
        [sftp_server, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert server.stdin is not None and server.stdout is not None

    def stop(signum: int, frame: FrameType | None) -> None:  # sshd hangs up: end cleanly
        with contextlib.suppress(OSError):
            os.close(0)

    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGTERM, stop)
    sender.send(Event(Op.LOGIN, info))
    feed: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
    backlog = [0]
    pumps = [
        # Client EOF: close sftp-server's stdin so it ends the session too.
        threading.Thread(
            target=_pump,
            args=(0, server.stdin.fileno(), "client", feed, backlog, server.stdin.close),
            daemon=True,
        ),
        threading.Thread(
            target=_pump,
            args=(server.stdout.fileno(), 1, "server", feed, backlog, lambda: None),
            daemon=True,
        ),
    ]
    for pump in pumps:
        pump.start()
    parser.run(feed, backlog)  # type: ignore[arg-type]
    code = server.wait()
    server.stdout.close()
    parser._emit(parser.tracker.finish())
    sender.send(Event(Op.LOGOUT, info))
    sender.close()
    return code
