"""Sessions an admin asked to end (``POST /v1/sessions/{id}/disconnect``), acted on by the
gateway process that holds them.

The request is a row in the journal database (storage port ``AdminStore``), not a message to
a process: every gateway process, on every node, polls the rows every ``api.disconnect_poll``
seconds and closes the sessions it holds. Exactly one process marks a request done
(``disconnected``), and that one journals a ``disconnect`` row on the session before closing
it, so the session's own rows say who ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..events import Event, EventSink, Op

log = logging.getLogger(__name__)

# A request whose session no gateway holds (it ended, or its process died) is dropped after this.
EXPIRE = 3600.0


class DisconnectWatch:
    """A task polling disconnect requests for the sessions of ``connections()``.

    ``opener`` opens the ``AdminStore`` port (blocking; run on a thread). Failures of the
    database are logged and retried at the next round; they never end the task.
    """

    def __init__(
        self,
        opener: Callable[[], Any],
        connections: Callable[[], Iterable[Any]],
        sink: EventSink,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._opener = opener
        self._connections = connections
        self._sink = sink
        self._interval = interval
        self._clock = clock
        self._store: Any = None
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None

    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("disconnect requests: %s; retrying", exc)
                if self._store is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self._store.close)
                    self._store = None
            self.rounds += 1
            await asyncio.sleep(self._interval)

    async def round(self) -> int:
        """Look once; end the sessions asked for that this process holds. How many it ended."""
        if self._store is None:
            self._store = await asyncio.to_thread(self._opener)
        store = self._store
        wanted = set(await asyncio.to_thread(store.disconnects, self._clock(), EXPIRE))
        if not wanted:
            return 0
        ended = 0
        for server in list(self._connections()):
            info = getattr(server, "info", None)
            conn = getattr(server, "conn", None)
            if info is None or conn is None or info.id not in wanted:
                continue
            by = await asyncio.to_thread(store.disconnected, info.id, self._clock())
            if by is None:
                continue  # another process took it
            log.info("disconnecting session %s (%s) at the request of %s", info.id, info.login, by)
            self._sink.emit(
                Event(Op.DISCONNECT, info, message=f"disconnected by an administrator ({by})")
            )
            conn.close()
            ended += 1
        return ended
