"""The one journal writer: a thread that group-commits events.

The event loop only appends to a queue. The writer thread takes everything
queued so far and commits it in one transaction, so while one commit waits on
fsync the next batch gathers: thousands of operations per second cost a few
fsyncs. ``emit_durable`` resolves once its batch is committed.

If the disk is full or the database is locked, the batch is kept and retried
with backoff; durable emits in it fail at once (the client gets an error for
that CLOSE) and plain events wait for the disk to come back.
"""

from __future__ import annotations

import asyncio
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

_STOP = object()


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
        on_upload: UploadHook | None = None,
        after_commit: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self._on_upload = on_upload
        self._after_commit = after_commit
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
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
        self._queue.put(_Item(event))

    async def emit_durable(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Item(event, future, loop))
        await future

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued and stop the thread (blocking; call off the loop)."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _take_batch(self, first: _Item) -> tuple[list[_Item], bool]:
        batch, stop = [first], False
        while len(batch) < self._batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            assert isinstance(item, _Item)
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        pending: list[_Item] = []
        stop = False
        delay = 0.05
        while True:
            if not pending:
                if stop:
                    return
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, _Item)
                pending, stop = self._take_batch(item)
            try:
                assert self._conn is not None
                record_batch(self._conn, (item.event for item in pending), self._on_upload)
            except (sqlite3.Error, OSError) as exc:
                log.error("journal: cannot commit %d events (%s); retrying", len(pending), exc)
                for item in pending:
                    _settle(item, JournalUnavailable(str(exc)))
                pending = [item for item in pending if item.future is None]
                if stop and pending:
                    log.error("journal: dropping %d events at shutdown", len(pending))
                    return
                time.sleep(delay)
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
