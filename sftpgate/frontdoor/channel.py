"""The ``sftp`` subsystem's channel session: what the client sends, buffered for the handler.

:class:`SFTPSession` is asyncssh's public ``SSHServerSession``: data arrives
in ``data_received``, waits in one :class:`~.bytequeue.ByteQueue`, and the
session's :class:`~.handler.GatewaySFTPHandler` takes whole requests from
it. Reading from the client pauses while more than the channel's receive
window is buffered (a client pipelining faster than requests are served),
and while the gateway's memory budget (:class:`~.writebehind.WriteBudget`,
``server.receive_budget``) is spent: what every session holds in its buffer
plus every WRITE not yet on disk. A paused channel re-opens no SSH window;
with ``server.fast_paths`` the connection also stops reading its socket, so
what a client sends meanwhile waits in the kernel, not in the gateway. A
session whose buffer ends in part of a request keeps reading until that
request is whole (else a full budget of half-requests could never drain),
so the most held is the budget plus about one request per session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import asyncssh

from ..logsetup import current_session, in_session
from . import asyncssh_fast
from .bytequeue import ByteQueue
from .handler import GatewaySFTPHandler
from .sftp import GatewaySFTPServer
from .writebehind import WriteBudget

if TYPE_CHECKING:  # typing only: the channel class asyncssh's session hooks are typed with
    from asyncssh.channel import SSHChannel


class SFTPSession(asyncssh.SSHServerSession[bytes]):
    """The ``sftp`` subsystem's channel: buffers what arrives for :class:`GatewaySFTPHandler`.

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
        # Why reading is paused: the buffer holds a window's worth / the budget is spent.
        self._full = False
        self._over_budget = False
        self._budget: WriteBudget | None = None  # the gateway's, known once the server is made
        self._charged = 0  # bytes of the buffer counted in the budget
        self._gone = False
        self._handler: GatewaySFTPHandler | None = None
        # Whether the client may still send; once not, why the channel ended
        # (None at the client's EOF, else the exception).
        self.open = True
        self.ended: Exception | None = None
        # The session this channel belongs to (made in its connection's context), for
        # the callbacks another session or the gateway may make (a budget drained by
        # someone else's writes, a connection closed by the admin API).
        self._tag = current_session()

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self._chan = cast(asyncssh.SSHServerChannel[bytes], chan)
        self._chan.set_encoding(None)
        self._limit = self._chan.get_recv_window()
        if self._fast:
            self._fast = asyncssh_fast.install_channel(chan, self.data_received)

    def session_started(self) -> None:
        chan = self._chan
        assert chan is not None
        server = self._factory(chan)
        self._budget = server.ctx.write_budget
        self._handler = GatewaySFTPHandler(server, self, chan, fast=self._fast)
        self._handler.arrived()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.inbox.append(data)
        self._recharge()
        if self._limit and len(self.inbox) >= self._limit:
            self._full = True
        budget = self._budget
        if budget is not None and budget.spent and not self._over_budget and self._head_whole():
            self._over_budget = True
            budget.wait(self)
        self._apply()
        if self._handler is not None:
            self._handler.arrived()

    def consumed(self) -> None:
        """The handler took a request out of the buffer."""
        self._recharge()
        if self._full and len(self.inbox) < self._limit:
            self._full = False
        if self._over_budget and not self._head_whole():
            # Part of a request: read on until it is whole, budget or not.
            self._over_budget = False
        self._apply()

    def budget_drained(self) -> None:
        """The budget has room again (called by WriteBudget, from any session)."""
        self._over_budget = False
        with in_session(self._tag):  # resuming runs our requests: on our behalf
            self._apply()

    def _head_whole(self) -> bool:
        """Whether the buffer starts with a whole request (the handler can take it)."""
        inbox = self.inbox
        return len(inbox) >= 4 and len(inbox) >= 4 + inbox.peek_u32()

    def _recharge(self) -> None:
        """Count what the buffer holds now in the budget (nothing once the channel is gone)."""
        if self._budget is None:
            return
        now = 0 if self._gone else len(self.inbox)
        if now != self._charged:
            delta, self._charged = now - self._charged, now
            self._budget.change(received=delta)

    def _apply(self) -> None:
        pause = (self._full or self._over_budget) and not self._gone
        if pause == self._paused:
            return
        self._paused = pause
        chan = self._chan
        assert chan is not None
        if pause:
            chan.pause_reading()
            if self._fast:
                asyncssh_fast.pause_transport(chan)
        else:
            if self._fast:
                asyncssh_fast.resume_transport(chan)
            chan.resume_reading()  # delivers what asyncssh held: may call data_received

    def eof_received(self) -> bool:
        with in_session(self._tag):
            self._end(None)
        return True  # the handler closes the channel once its last reply is out

    def connection_lost(self, exc: Exception | None) -> None:
        with in_session(self._tag):
            self._connection_lost(exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        # Nothing more will be read: the budget no longer counts this buffer.
        self._gone = True
        self._recharge()
        if self._budget is not None:
            self._budget.waiting.discard(self)
        if self._paused and self._fast and self._chan is not None:
            self._paused = False
            asyncssh_fast.resume_transport(self._chan)
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if self.open:
            self.open = False
            self.ended = exc
        if self._handler is not None:
            self._handler.arrived()
