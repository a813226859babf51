"""The one journal writer: a thread that group-commits events.

The event loop only appends to a deque; it does not wake the writer for each
event. A plain event wakes the writer only if it is asleep with nothing to do,
and the writer then lets a burst gather for ``interval`` seconds before
committing it in one transaction (at most that long before a record is on
disk). A durable event (``emit_durable``: an upload whose job must exist
before the client's reply) wakes it at once and resolves once its batch is
committed. So thousands of operations per second cost a few commits and few
thread wake-ups, and the loop never waits on the disk.

If the disk is full or the database is locked, the batch is kept and retried
with backoff; durable emits in it fail at once (the client gets an error for
that CLOSE) and plain events wait for the disk to come back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..events import Event
from .store import UploadHook, connect, record_batch

log = logging.getLogger(__name__)

_STOP = object()  # tokens on the wake queue
_NOW = object()  # commit now: a durable event is waiting
_WORK = object()  # work arrived while the writer slept


@dataclass(slots=True)
class _Item:
    event: Event
    future: asyncio.Future[None] | None = None
    loop: asyncio.AbstractEventLoop | None = None


class JournalUnavailable(Exception):
    """The journal could not commit an event that had to be durable."""


class JournalWriter:
    """An :class:`~sftpgate.events.EventSink` backed by the SQLite journal."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        batch_max: int = 1000,
        interval: float = 0.02,
        on_upload: UploadHook | None = None,
        after_commit: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self._on_upload = on_upload
        self._after_commit = after_commit
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._interval = interval
        # Events in emission order; deque appends and pops are thread-safe.
        self._items: collections.deque[_Item] = collections.deque()
        self._wake: queue.SimpleQueue[object] = queue.SimpleQueue()
        # True while the writer sleeps with nothing to do: only then does a
        # plain emit pay for waking it.
        self._idle = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self.committed = 0
        self.batches = 0

    def start(self) -> None:
        """Open the database (raising if it cannot be opened) and start the thread."""
        self._conn = connect(self.path, synchronous=self._synchronous)
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()

    def emit(self, event: Event) -> None:
        self._items.append(_Item(event))
        if self._idle:
            self._idle = False
            self._wake.put(_WORK)

    async def emit_durable(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._items.append(_Item(event, future, loop))
        self._wake.put(_NOW)
        await future

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued and stop the thread (blocking; call off the loop)."""
        if self._thread is None:
            return
        self._wake.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        while self._items and len(batch) < self._batch_max:
            batch.append(self._items.popleft())
        return batch

    def _fail_durable(self, pending: list[_Item], exc: BaseException) -> list[_Item]:
        """Fail every durable item, pending or queued; return the plain ones to retry."""
        pending = pending + self._take_all()
        for item in pending:
            _settle(item, JournalUnavailable(str(exc)))
        return [item for item in pending if item.future is None]

    def _take_all(self) -> list[_Item]:
        items: list[_Item] = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def _wait(self) -> bool:
        """Sleep until there is work; let plain work gather. True once asked to stop."""
        token: object = None
        if not self._items:
            self._idle = True
            if not self._items:  # checked again after saying so: no emit is missed
                token = self._wake.get()
            self._idle = False
        if token is _STOP:
            return True
        if token is _NOW or len(self._items) >= self._batch_max:
            return False  # a durable record waits, or a full batch is ready
        deadline = time.monotonic() + self._interval
        while (left := deadline - time.monotonic()) > 0:
            try:
                token = self._wake.get(timeout=left)
            except queue.Empty:
                break
            if token is _STOP:
                return True
            if token is _NOW or len(self._items) >= self._batch_max:
                break
        return False

    def _run(self) -> None:
        pending: list[_Item] = []
        stop = False
        delay = 0.05
        while True:
            if not pending:
                if not stop:
                    stop = self._wait()
                pending = self._take_batch()
                if not pending:
                    if stop:
                        return
                    continue
            try:
                assert self._conn is not None
                record_batch(self._conn, (item.event for item in pending), self._on_upload)
            except (sqlite3.Error, OSError) as exc:
                log.error("journal: cannot commit %d events (%s); retrying", len(pending), exc)
                pending = self._fail_durable(pending, exc)
                if stop and pending:
                    log.error("journal: dropping %d events at shutdown", len(pending))
                    return
                # Wait before retrying, but a durable emit arriving meanwhile
                # fails at once instead of waiting for the disk to come back.
                deadline = time.monotonic() + delay
                while not stop and (left := deadline - time.monotonic()) > 0:
                    try:
                        token = self._wake.get(timeout=left)
                    except queue.Empty:
                        break
                    stop = token is _STOP
                    pending = self._fail_durable(pending, exc)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05
            self.committed += len(pending)
            self.batches += 1
            if self._after_commit is not None:
                try:
                    self._after_commit()
                except Exception:  # a listener must never break the journal
                    log.exception("journal: after-commit listener failed")
            for item in pending:
                _settle(item, None)
            pending = []


def _settle(item: _Item, exc: BaseException | None) -> None:
    if item.future is None or item.loop is None:
        return
    future = item.future

    def _resolve() -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)

    # A closed loop raises RuntimeError: nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        item.loop.call_soon_threadsafe(_resolve)


class NullSink:
    """An event sink that drops everything (``journal.enabled: false``)."""

    def emit(self, event: Event) -> None:
        pass

    async def emit_durable(self, event: Event) -> None:
        pass
