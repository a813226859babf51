"""The SFTP request loop of a ``sftpgate serve`` session: when requests run, and their replies.

What the client sends waits in the channel session's buffer (channel.py);
:class:`GatewaySFTPHandler` takes each whole request from it, has
:class:`~.requests.Requests` answer it, and writes the reply with the
channel's ``write``. asyncssh's own SFTP handler is not used: it refused
requests with bytes after their fields, guessed SYMLINK's order from the
client's version, advertised extensions nobody here tried, and wrapped every
request in several objects.

A request runs at once, inside the data callback, and usually finishes there
(a file call that runs inline never waits; see inline.py). One that has to
wait (a trip to the thread pool, a WRITE waiting for write-behind room, a
durable commit) becomes a task, and the next requests start beside it when
order.py says they don't depend on it (READs and stats beside each other,
requests about other handles), up to ``server.requests_in_flight`` at once;
their replies go out as they finish, each naming its request. The first
request that may not start yet waits, and everything behind it too, so
requests about the same file keep their order.

Where asyncssh's internals are allowed (``server.fast_paths``, see
asyncssh_fast.py) the channel's receive path and the reply writes take
shortcuts; the SFTP served is the same.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import asyncssh

from ..events import Event, Op
from ..sftp.constants import FXP_INIT, MAX_IO
from ..sftp.decode import U32
from ..sftp.encode import REPLY_HEADER
from ..sftp.packets import DecodeError
from . import asyncssh_fast
from .eager import start_eagerly
from .order import Footprint, InFlight, footprint
from .requests import Requests, sends_draft_symlink, version_packet
from .sftp import GatewaySFTPServer

if TYPE_CHECKING:  # typing only: the session that buffers the channel's data
    from .channel import SFTPSession

log = logging.getLogger(__name__)

# The longest request taken (asyncssh's limit: a 4 MiB WRITE and its fields).
MAX_PACKET = 4 * 1024 * 1024 + 1024
# Most requests of one session waiting at once, unless the config says
# otherwise (server.requests_in_flight). Two: one pread copies while the
# loop encrypts the last reply; on the 2-core bench machine 4 and 8 were
# slower for a cached file (docs/benchmarks.md).
IN_FLIGHT = 2


class GatewaySFTPHandler:
    """One session's request loop (see module doc).

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
        self._requests = Requests(
            server,
            draft_symlink=sends_draft_symlink(
                str(chan.get_extra_info("client_version", "")),
                str(chan.get_extra_info("server_version", "")),
            ),
        )
        self._initialized = False
        self._ended = False
        most = server.ctx.requests_in_flight or IN_FLIGHT
        self._in_flight = InFlight(most, most * MAX_IO)
        self._running: set[asyncio.Task[None]] = set()
        # The next request, taken but not started: it depends on one running.
        self._held: tuple[bytes, Footprint] | None = None
        self._pumping = False
        self._cleanup_task: asyncio.Task[None] | None = None

    # -- replies ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        chan = self._chan
        if chan.is_closing():
            return
        if not (self._fast and asyncssh_fast.send_at_once(chan, data)):
            chan.write(data)

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
        self._pump()

    def _pump(self) -> None:
        """Start every whole request waiting, in order, until one may not start yet."""
        if self._pumping:  # a request we run resumed reading; the loop below sees the data
            return
        self._pumping = True
        in_flight = self._in_flight
        try:
            while not self._ended:
                try:
                    if self._held is not None:
                        payload, fp = self._held
                        if not in_flight.may_start(fp):
                            return
                        self._held = None
                    else:
                        if len(in_flight) >= in_flight.most:
                            return  # the inbox fills, and the channel pauses
                        taken = self._take()
                        if taken is None:
                            if not self._session.open and not self._running:
                                self._finish(self._session.ended)
                            return
                        if not self._initialized:
                            self._init(taken)
                            continue
                        payload, fp = taken, footprint(taken)
                        if not in_flight.may_start(fp):
                            self._held = payload, fp
                            return
                    self._start(payload, fp)
                except Exception as exc:
                    self._failed(exc)
                    return
        finally:
            self._pumping = False

    def _start(self, payload: bytes, fp: Footprint) -> None:
        task = start_eagerly(self._request(payload))
        if task is None:
            return  # answered already
        self._in_flight.started(fp)
        self._running.add(task)
        task.add_done_callback(lambda t: self._request_done(t, fp))

    async def _request(self, payload: bytes) -> None:
        pktid, reply, body = await self._requests.answer(payload)
        self._send(REPLY_HEADER.pack(len(body) + 5, reply, pktid) + body)

    def _init(self, payload: bytes) -> None:
        """The client's INIT: answer VERSION 3 with our extensions."""
        if payload[:1] != bytes((FXP_INIT,)):
            raise asyncssh.SFTPBadMessage("Expected init message")
        if len(payload) < 5:
            raise DecodeError("Incomplete packet")
        (version,) = U32.unpack_from(payload, 1)
        self._initialized = True
        self._send(version_packet(version))

    def _request_done(self, task: asyncio.Task[None], fp: Footprint) -> None:
        self._running.discard(task)
        self._in_flight.finished(fp)
        if task.cancelled():
            self._finish(None)
            return
        exc = task.exception()
        if exc is not None:
            self._failed(cast(Exception, exc))
            return
        self._pump()

    def _failed(self, exc: Exception) -> None:
        """A request ended the session (a stream that no longer makes sense, a bug).

        Journaled as a ``protocol_error`` row, as the OpenSSH tap does: ``bad_message``
        for what the client sent (the defender scores it), ``failure`` for our own fault.
        """
        if isinstance(exc, DecodeError):
            exc = asyncssh.SFTPBadMessage(str(exc))
        elif not isinstance(exc, (OSError, asyncssh.Error)):
            log.error("SFTP session failed", exc_info=exc)
        bug = not isinstance(exc, (OSError, asyncssh.Error))
        if not self._ended and (bug or isinstance(exc, asyncssh.SFTPError)):
            ctx = self._server.ctx
            client = not bug
            reason = str(exc) if client else f"internal error: {type(exc).__name__}"
            ctx.sink.emit(
                Event(
                    Op.PROTOCOL_ERROR,
                    ctx.info,
                    status="bad_message" if client else "failure",
                    message=f"session ended: {reason}"[:2048],
                    attrs={"stream": "client"},
                )
            )
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if not self._ended:
            self._ended = True
            # The loop's, not the connection's: the connection may be gone already.
            self._cleanup_task = asyncio.get_running_loop().create_task(self._cleanup(exc))

    async def _cleanup(self, exc: Exception | None) -> None:
        """Close what the client left open (journaled as cut off), end the server, the channel."""
        ctx = self._server.ctx
        if self._running:  # a request failed beside them: their handles close after them
            await asyncio.wait(set(self._running))
        ctx.ending = True
        try:
            await self._requests.close_all()
            self._server.exit()
        finally:
            ctx.cleaned.set()
            self._chan.close()
        if exc is not None:
            log.debug("SFTP session ended: %s", exc)
