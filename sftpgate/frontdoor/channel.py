"""The ``sftp`` subsystem's channel session: what the client sends, buffered for the handler.

:class:`SFTPSession` is asyncssh's public ``SSHServerSession``: data arrives
in ``data_received``, waits in one :class:`~.bytequeue.ByteQueue`, and the
session's :class:`~.handler.GatewaySFTPHandler` takes whole requests from
it. Reading from the client pauses while more than the channel's receive
window is buffered (a client pipelining faster than requests are served).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import asyncssh

from . import asyncssh_fast
from .bytequeue import ByteQueue
from .handler import GatewaySFTPHandler
from .sftp import GatewaySFTPServer

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
        self._handler: GatewaySFTPHandler | None = None
        # Whether the client may still send; once not, why the channel ended
        # (None at the client's EOF, else the exception).
        self.open = True
        self.ended: Exception | None = None

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
        if self.open:
            self.open = False
            self.ended = exc
        if self._handler is not None:
            self._handler.arrived()
