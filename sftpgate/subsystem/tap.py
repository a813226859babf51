"""``sftpgate subsystem``: relay sshd ⇄ OpenSSH's sftp-server, and read what goes by.

One thread does everything with ``poll()``: it reads a chunk from one side,
passes it on unchanged (or queues what the other side does not take yet),
then hands the same bytes to the parser. The parser decodes packets, pairs
requests with replies (``Tracker``) and passes events to the
:class:`~sftpgate.subsystem.sender.EventSender`, which never blocks either
(it gathers events for a few ms; the poll timeout hands them over).
Because one thread reads both directions, a request is always parsed before
the reply to it. (The tap used to run the two directions and the parser in
three threads; they took turns on the GIL for every chunk, and that ping-pong
cost more than the parsing: about half the throughput of a plain sftp-server.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import select
import signal
import subprocess
from pathlib import Path
from types import FrameType

from ..events import Event, Op, SessionInfo
from ..logsetup import NodeFilter, PlainFormatter, SessionTag, enter_session, peer_name
from ..sftp.reader import PacketReader
from .sender import EventSender
from .tracker import Tracker

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# A pipe holds 64 KiB by default, so a big upload took one poll, read, write and
# parse per 64 KiB: 0.8x sftp-server's throughput. The two pipes of the upload
# direction (sshd -> tap -> sftp-server) get room for a whole CHUNK (then 1.0x).
# Not more, and not the download pipes: the kernel counts pipe buffers per user
# (fs.pipe-user-pages-soft, 64 MiB), and a user over it gets 8 KiB pipes.
UPLOAD_PIPE = CHUNK
_IN, _OUT = select.POLLIN, select.POLLOUT


class Parser:
    """Turns both streams into events; never raises into the relay."""

    def __init__(self, tracker: Tracker, sender: EventSender) -> None:
        self.tracker = tracker
        self.sender = sender
        self.readers = {"client": PacketReader("client"), "server": PacketReader("server")}
        self.failed = False

    def feed(self, direction: str, data: bytes | memoryview) -> None:
        if self.failed:
            return
        try:
            items = self.readers[direction].feed(data)
            tracker = self.tracker
            self.emit(tracker.client(items) if direction == "client" else tracker.server(items))
        except Exception as exc:  # the tap must never take the relay down
            self.failed = True
            self.emit(
                [
                    Event(
                        Op.PROTOCOL_ERROR,
                        self.tracker.session,
                        status="failure",
                        message=f"tap error: {type(exc).__name__}: {exc}",
                    )
                ]
            )

    def emit(self, events: list[Event]) -> None:
        for event in events:
            try:
                self.sender.send(event)
            except Exception as exc:  # pragma: no cover - send spools on OSError already
                log.error("event lost: %s", exc)


class Relay:
    """Moves bytes client (fds 0, 1) ⇄ sftp-server until sftp-server's output ends.

    Each direction reads into its own buffer. What the other side does not
    take at once stays in that buffer, and that direction is not read again
    until it is gone: the pipes (and sshd's channel window) hold the rest, so
    the tap never copies or allocates for a slow side. (It used to queue the
    remainder in a bytearray, up to 1 MiB; every partial write then copied it
    into newly allocated memory, ~30,000 page faults per GiB uploaded.)
    """

    def __init__(
        self,
        server: subprocess.Popen[bytes],
        parser: Parser,
        sender: EventSender,
        client_in: int = 0,
        client_out: int = 1,
    ) -> None:
        assert server.stdin is not None and server.stdout is not None
        self.server = server
        self.parser = parser
        self.sender = sender
        self.server_in = server.stdin.fileno()
        self.server_out = server.stdout.fileno()
        self.client_in = client_in
        self.client_out = client_out
        # source fd -> (destination fd, direction for the parser)
        self.routes = {
            client_in: (self.server_in, "client"),
            self.server_out: (client_out, "server"),
        }
        # Reads land in one buffer per source, allocated once: os.read(fd, CHUNK)
        # allocated CHUNK bytes each time (above malloc's mmap threshold: mmap,
        # mremap to shrink, munmap), about a quarter of the tap's CPU when requests
        # are small.
        self.buffers = {fd: memoryview(bytearray(CHUNK)) for fd in self.routes}
        # destination fd -> the bytes it has not taken yet (a view of its source's buffer)
        self.unsent: dict[int, memoryview] = {}
        self.reading = {client_in, self.server_out}
        self.writable = {self.server_in, client_out}
        self.poller = select.poll()
        self.masks: dict[int, int] = {}
        self.sender_fd: int | None = None
        for fd in (*self.routes, self.server_in, client_out):
            os.set_blocking(fd, False)
        for fd in (client_in, self.server_in):  # the upload direction (see UPLOAD_PIPE)
            with contextlib.suppress(OSError):  # not a pipe, or the user is at the limit
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, UPLOAD_PIPE)

    def run(self) -> None:
        while self.server_out in self.reading or self.client_out in self.unsent:
            self._register()
            for fd, revents in self.poller.poll(self.sender.timeout()):
                if fd in self.routes:
                    self._read(fd)
                elif fd in self.unsent:
                    self._write_unsent(fd)
                elif fd == self.sender_fd:
                    if revents & _OUT:
                        self.sender.flush()
                    self.sender.read_acks()
            self.sender.flush_due()

    def _register(self) -> None:
        wanted: dict[int, int] = {}
        for fd, (dst, _) in self.routes.items():
            if fd in self.reading and dst not in self.unsent:
                wanted[fd] = _IN
        for fd in self.unsent:
            wanted[fd] = _OUT
        self.sender_fd = self.sender.fileno()
        if self.sender_fd is not None:
            wanted[self.sender_fd] = _IN | (_OUT if self.sender.wants_write else 0)
        for fd in [fd for fd in self.masks if fd not in wanted]:
            self.poller.unregister(fd)
            del self.masks[fd]
        for fd, mask in wanted.items():
            if fd not in self.masks:
                self.poller.register(fd, mask)
            elif self.masks[fd] != mask:
                self.poller.modify(fd, mask)
            self.masks[fd] = mask

    def _read(self, fd: int) -> None:
        buffer = self.buffers[fd]
        try:
            size = os.readv(fd, (buffer,))
        except BlockingIOError:
            return
        except OSError:
            size = 0
        dst, direction = self.routes[fd]
        if not size:
            self.reading.discard(fd)
            if fd == self.client_in:  # client EOF: sftp-server's too, once it has everything
                self._end_server_input_when_sent()
            return
        data = buffer[:size]  # valid until this source is read again: keepers copy
        if dst in self.writable:  # else that side is gone: its bytes are dropped
            self._write(dst, data)
        self.parser.feed(direction, data)  # after the bytes went on: they never wait for it

    def _write(self, fd: int, data: memoryview) -> None:
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:  # that side is gone; what it would have got is dropped
            self.writable.discard(fd)
            self.unsent.pop(fd, None)
            return
        if sent < len(data):
            self.unsent[fd] = data[sent:]
        else:
            self.unsent.pop(fd, None)

    def _write_unsent(self, fd: int) -> None:
        self._write(fd, self.unsent[fd])
        if fd == self.server_in:
            self._end_server_input_when_sent()

    def _end_server_input_when_sent(self) -> None:
        if self.client_in not in self.reading and self.server_in not in self.unsent:
            self.writable.discard(self.server_in)
            if self.server_in in self.masks:
                self.poller.unregister(self.server_in)
                del self.masks[self.server_in]
            assert self.server.stdin is not None
            with contextlib.suppress(OSError):
                self.server.stdin.close()


def quiet_logging(address: str = "/dev/log") -> None:
    """Log to syslog (like sftp-server), never to stderr: sshd sends that to the client.

    Each line names the session as ``serve``'s do (``session=… login=… peer=…``,
    see :func:`run_tap`), control characters escaped.
    """
    root = logging.getLogger()
    root.handlers[:] = []
    if os.path.exists(address):
        from logging.handlers import SysLogHandler

        handler: logging.Handler = SysLogHandler(address=address, facility=SysLogHandler.LOG_AUTH)
        handler.setFormatter(PlainFormatter("sftpgate-subsystem: %(message)s"))
        handler.addFilter(NodeFilter())
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
        id=os.urandom(8).hex(),  # what secrets.token_hex does, without importing hashlib
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
    # One session a process, one thread: every line from here on is this session's,
    # under the id its journal rows have.
    enter_session(SessionTag(info.id, peer_name(info.remote_addr, info.remote_port), info.login))
    home = pwd.getpwuid(os.getuid()).pw_dir
    sender = EventSender(socket_path, spool_dir, info.id, ack_timeout)
    parser = Parser(Tracker(info, home, temp_patterns), sender)
    server = subprocess.Popen(
        [sftp_server, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert server.stdin is not None and server.stdout is not None

    def stop(signum: int, frame: FrameType | None) -> None:  # sshd hangs up: end cleanly
        # The client's input now reads as EOF; /dev/null in its place (rather than
        # a closed fd 0) keeps the number from going to a file opened later.
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)

    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGTERM, stop)
    sender.send(Event(Op.LOGIN, info))
    Relay(server, parser, sender).run()
    code = server.wait()
    server.stdout.close()
    parser.emit(parser.tracker.finish())
    sender.send(Event(Op.LOGOUT, info))
    sender.close()
    return code
