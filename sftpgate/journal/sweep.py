"""Sessions left open by a gateway process that died, ended in the journal.

A gateway process that dies without its own shutdown (SIGKILL, the OOM killer, a crash, the
1.5 s limit of a second SIGTERM cutting the journal flush) cannot journal its sessions' ends.
So every gateway process (each child with ``server.processes > 1``; every node of a cluster)
registers a row in the ``gateways`` table (storage port
:class:`~sftpgate.storage.ports.GatewayRegistry`) and heartbeats it every
``server.session_sweep`` seconds, and the journal stamps each session it inserts with the
process's id (``sessions.process``). Each gateway process also sweeps, at start and then at
that interval: a registered process that is

- of this node, and proven dead here (``jobs/registry.py``: an earlier boot, or this boot and
  pid namespace with its pid gone or reused), or
- of another node (or pid namespace, where /proc cannot tell) whose heartbeat is older than
  ``server.gateway_timeout`` seconds

is claimed by a conditional delete of its row, and its sessions still open are ended in the
same transaction: ``ended_at``, a ``logout`` row saying "gateway process <pid> on <node>
ended without closing this session", and an ``incomplete`` upload for each file the journal
saw it open for write and never close. Exactly one sweeper in the cluster does it. A process
alive on this node is never swept, however old its heartbeat.

All database work runs on a thread; a failure is logged and retried at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ..events import Event, Op, SessionInfo, UploadState
from ..jobs.registry import Stamp, dead, new_worker_id, stamp
from ..storage.ports import GatewayRegistry, GatewayRow

log = logging.getLogger(__name__)

T = TypeVar("T")


def session_why(row: GatewayRow) -> str:
    return f"gateway process {row.pid} on {row.node} ended without closing this session"


def upload_why(row: GatewayRow) -> str:
    return f"gateway process {row.pid} on {row.node} ended with this upload open"


def swept(row: GatewayRow, me: str, node: str, now: float, timeout: float) -> bool:
    """Whether process ``row`` is to be taken for dead by the process ``me`` on ``node``.

    Of this node, boot and pid namespace: only when /proc shows it gone (or its pid reused),
    never by its heartbeat. Elsewhere: when its heartbeat is older than ``timeout``; and of
    this node but an earlier boot: at once."""
    if row.id == me:
        return False
    process = Stamp(row.node, row.boot, row.pid, row.start)
    if dead(process, node):
        return True
    if process.here(node):
        return False  # alive here: a stalled loop is not a death
    return row.heartbeat_at < now - timeout


def ending_events(
    session: Mapping[str, Any],
    open_paths: Iterable[str],
    now: float,
    row: GatewayRow,
    why: str,
    upload_why: str,
) -> list[Event]:
    """The journal rows that end ``session`` (a sessions row) of dead process ``row``: an
    ``incomplete`` close for each path in ``open_paths`` (message ``upload_why``), then its
    ``logout`` (message ``why``)."""
    info = SessionInfo(
        id=session["id"],
        remote_addr=session["remote_addr"] or "",
        remote_port=session["remote_port"] or 0,
        login=session["login"],
        client_version=session["client_version"],
        auth_method=session["auth_method"],
        started_at=session["started_at"],
        node=session["node"] or row.node,
    )
    events = [
        Event(
            Op.CLOSE,
            info,
            time=now,
            path=path,
            status="failure",
            message=upload_why,
            upload=UploadState.INCOMPLETE,
        )
        for path in open_paths
    ]
    events.append(Event(Op.LOGOUT, info, time=now, message=why))
    return events


def open_uploads(opens: Iterable[Mapping[str, Any]]) -> list[str]:
    """Paths opened for write and never closed, from one session's ``open`` (ok, with the
    write flag) and ``close`` operations rows in id order (columns ``op``, ``path``)."""
    still: dict[str, int] = {}
    for op in opens:
        path = op["path"]
        if path is None:
            continue
        if op["op"] == Op.OPEN.value:
            still[path] = still.get(path, 0) + 1
        elif still.get(path):
            still[path] -= 1
    return [path for path, count in still.items() if count > 0]


class SessionSweeper:
    """This gateway process's row in the registry (heartbeated) and the sweep, as a task.

    ``opener`` opens the :class:`GatewayRegistry` port (blocking; run on a thread).
    """

    def __init__(
        self,
        opener: Callable[[], GatewayRegistry],
        node: str,
        interval: float,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._opener = opener
        self.node = node
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self.id = new_worker_id(node)
        self._store: GatewayRegistry | None = None
        self._task: asyncio.Task[None] | None = None
        self._registered = False
        # One thread at a time on the store: a round cancelled mid-call still runs on its
        # thread, and stop's retire waits for it.
        self._lock = threading.Lock()
        self.rounds = 0
        self.ended: list[str] = []  # the sessions this process ended, oldest first

    def _row(self) -> GatewayRow:
        me = stamp(os.getpid(), self.node)
        now = self._clock()
        boot, start = (me.boot, me.start) if me is not None else ("", 0)
        return GatewayRow(self.id, self.node, os.getpid(), boot, start, now, now)

    async def start(self) -> None:
        """Register (a failure is logged; the task tries again) and start the task, whose
        first round sweeps at once."""
        try:
            await self._register()
        except Exception as exc:
            log.warning("gateway registry: %s; retrying", exc)
            await self._forget_store()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the task, and take this process's row out (unless its sessions are open in
        the journal: the flush was cut; a sweeper ends them once this process is gone)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            store = await self._open()
            if not await asyncio.to_thread(self._locked, store.retire, self.id):
                log.warning(
                    "sessions of this process are still open in the journal: kept its "
                    "row %s, so a sweeper ends them",
                    self.id,
                )
        except Exception as exc:
            log.warning("gateway registry: %s (row %s left for a sweeper)", exc, self.id)
        await self._forget_store()

    def _locked(self, call: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return call(*args)

    async def _open(self) -> GatewayRegistry:
        if self._store is None:
            self._store = await asyncio.to_thread(self._opener)
        return self._store

    async def _forget_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._locked, store.close)

    async def _register(self) -> None:
        store = await self._open()
        await asyncio.to_thread(lambda: self._locked(store.register, self._row()))  # /proc
        self._registered = True

    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("session sweep: %s; retrying", exc)
                await self._forget_store()
            self.rounds += 1
            await asyncio.sleep(self._interval)

    async def round(self) -> list[str]:
        """Heartbeat (or register), then end the sessions of processes taken for dead; their
        ids. On a thread: the database, and /proc for who is alive."""
        store = await self._open()
        ended = await asyncio.to_thread(self._locked, self._round, store)
        self.ended.extend(ended)
        return ended

    def _round(self, store: GatewayRegistry) -> list[str]:
        if not self._registered:
            store.register(self._row())
            self._registered = True
        elif not store.heartbeat(self.id, self._clock()):
            log.warning(
                "gateway process row %s was gone (taken for dead: its heartbeat was older than "
                "server.gateway_timeout); its sessions were ended in the journal; registering "
                "again",
                self.id,
            )
            store.register(self._row())
        now = self._clock()
        ended: list[str] = []
        for row in store.gateways():
            if not swept(row, self.id, self.node, now, self._timeout):
                continue
            sessions = store.end_process(row, now, session_why(row), upload_why(row))
            if sessions:
                log.warning(
                    "gateway process %d on %s ended without closing its sessions: ended %d "
                    "session(s) in the journal: %s",
                    row.pid,
                    row.node,
                    len(sessions),
                    " ".join(sessions),
                )
            ended.extend(sessions)
        return ended
