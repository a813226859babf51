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
that CLOSE) and plain events wait for the disk to come back. A durable emit
not committed within ``durable_timeout`` raises :class:`JournalTimeout`, so a
client waits that long at most.

A record that can never be written (a value SQLite cannot bind, a field of the
wrong type, a job its rules cannot create) must not take the others with it:
when a batch fails for a reason other than the disk or the lock, it is split
and committed in halves until the bad record stands alone; that one is set
aside with an error row naming the problem, the rest commit. The thread never
dies from a record: anything unexpected is logged and the loop goes on.

Every committed batch is counted for the metrics here, on the writer's thread
(sessions, logins by method, bytes, uploads, operations: ``metrics.record_events``),
with its size and commit time; a failed commit sets ``sftpgate_journal_writable``
to 0 until the next one succeeds (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import metrics
from ..events import Event, Op, SessionInfo
from ..storage.ports import JobRule, JournalStore, StorageUnavailable
from .store import SQLiteJournal

log = logging.getLogger(__name__)

_STOP = object()  # tokens on the wake queue
_NOW = object()  # commit now: a durable event is waiting
_WORK = object()  # work arrived while the writer slept


# Status of the error rows the writer journals in place of (or beside) a record.
STATUS_SET_ASIDE = "journal_error"  # the record could not be written: why, instead of it
STATUS_TIMEOUT = "journal_timeout"  # a durable record was not committed in time
MAX_ERROR_TEXT = 300  # characters of an exception's text an error row keeps
_SESSION_OPS = {Op.LOGIN, Op.LOGIN_FAILED, Op.LOGOUT}


@dataclass(slots=True)
class _Item:
    event: Event
    future: asyncio.Future[None] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    # Under JournalWriter._lock: the writer took it into a batch; its waiter gave up.
    claimed: bool = False
    abandoned: bool = False
    # An error row standing in for a record: if even this fails, it is dropped.
    aside: bool = False


class JournalUnavailable(Exception):
    """The journal could not commit an event that had to be durable."""


class JournalTimeout(JournalUnavailable):
    """A durable event was not committed within the writer's ``durable_timeout``."""


class _Retry(Exception):
    """The disk or the lock failed a commit: ``items`` (in order) are to be retried."""

    def __init__(self, items: list[_Item], error: BaseException) -> None:
        super().__init__(str(error))
        self.items = items
        self.error = error


class JournalWriter:
    """An :class:`~sftpgate.events.EventSink` backed by a journal store (SQLite by default).

    ``on_upload`` is the pure job rule (:data:`~sftpgate.storage.ports.JobRule`):
    a complete upload it gives a spec gets its job in the upload's transaction.
    ``after_commit`` runs on the writer thread after a commit that created
    jobs (to wake the workers). ``store`` replaces the SQLite journal at
    ``path`` (another backend, or a test's).
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        batch_max: int = 1000,
        interval: float = 0.02,
        on_upload: JobRule | None = None,
        after_commit: Callable[[], None] | None = None,
        durable_timeout: float = 10.0,
        store: JournalStore | None = None,
    ) -> None:
        self.path = path
        self._durable_timeout = durable_timeout
        self._lock = threading.Lock()  # _Item.claimed / .abandoned
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
        self._store: JournalStore | None = store
        self.committed = 0
        self.batches = 0
        self.set_aside = 0  # records replaced by an error row

    @property
    def queued(self) -> int:
        """Records emitted and not yet taken into a batch."""
        return len(self._items)

    def start(self) -> None:
        """Open the database (raising if it cannot be opened) and start the thread.

        Raises :class:`~sftpgate.storage.ports.SchemaBehind` for a schema that
        needs ``sftpgate db migrate`` (a new SQLite file is created instead).
        """
        if self._store is None:
            self._store = SQLiteJournal(self.path, synchronous=self._synchronous)
        metrics.families().journal_writable.set(1)  # opened: writable until a commit fails
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()

    def emit(self, event: Event) -> None:
        self._items.append(_Item(event))
        if self._idle:
            self._idle = False
            self._wake.put(_WORK)

    async def emit_durable(self, event: Event) -> None:
        """Return once ``event`` is committed.

        Raises :class:`JournalUnavailable` if it cannot be, and
        :class:`JournalTimeout` if it is not within ``durable_timeout``
        seconds. After a timeout the event is journaled as an error row
        instead (or, if its commit was already under way, it may still land,
        followed by an error row saying its client was told it failed).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        item = _Item(event, future, loop)
        self._items.append(item)
        self._wake.put(_NOW)
        try:
            await asyncio.wait_for(future, self._durable_timeout)
        except TimeoutError:
            with self._lock:
                item.abandoned = True
            log.error(
                "journal: a durable record waited %g s; its client is told", self._durable_timeout
            )
            raise JournalTimeout(
                f"the journal did not commit within {self._durable_timeout:g} s"
            ) from None

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued and stop the thread (blocking; call off the loop)."""
        if self._thread is None:
            return
        self._wake.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        if self._store is not None:
            self._store.close()
            self._store = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        with self._lock:
            while self._items and len(batch) < self._batch_max:
                item = self._items.popleft()
                if item.abandoned:  # its client gave up: an error row, no upload, no job
                    item = _error_item(item.event, STATUS_TIMEOUT, _TIMED_OUT)
                item.claimed = True
                batch.append(item)
        return batch

    def _fail_durable(self, pending: list[_Item], exc: BaseException) -> list[_Item]:
        """Fail every durable item, pending or queued; return the plain ones to retry.

        A durable one whose client already timed out leaves an error row to retry.
        """
        pending = pending + self._take_all()
        keep: list[_Item] = []
        for item in pending:
            _settle(item, JournalUnavailable(str(exc)))
            if item.future is None:
                keep.append(item)
            elif item.abandoned:
                keep.append(_error_item(item.event, STATUS_TIMEOUT, _TIMED_OUT))
        return keep

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
                self._write(pending)
            except _Retry as retry:
                exc = retry.error
                log.error("journal: cannot commit %d events (%s); retrying", len(retry.items), exc)
                pending = self._fail_durable(retry.items, exc)
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
            except Exception:  # a bug, not a record: the journal must go on all the same
                log.exception("journal: writer error; %d events dropped", len(pending))
                for item in pending:
                    _settle(item, JournalUnavailable("journal writer error"))
            delay = 0.05
            pending = []

    def _write(self, items: list[_Item]) -> None:
        """Commit ``items``, setting aside any that can never be written.

        Raises :class:`_Retry` with what is left when the disk or the lock
        fails (nothing is wrong with the records then: retry them all later).
        """
        assert self._store is not None
        chunks = [items]  # a stack: the first half of a split is tried first
        while chunks:
            chunk = chunks.pop()
            started = time.perf_counter()
            try:
                result = self._store.record_batch([item.event for item in chunk], self._on_upload)
            except Exception as exc:
                if isinstance(exc, StorageUnavailable | MemoryError):
                    metrics.record_commit_failure()
                    rest = [item for later in reversed(chunks) for item in later]
                    raise _Retry(chunk + rest, exc) from exc
                if len(chunk) > 1:
                    half = len(chunk) // 2
                    chunks += [chunk[half:], chunk[:half]]
                    continue
                (bad,) = chunk
                why = _describe(exc)
                if bad.aside:  # even the error row failed: nothing more to try
                    log.error("journal: cannot write an error row (%s); dropped", why)
                    continue
                log.error(
                    "journal: set aside a %s record that cannot be written: %s",
                    _op_name(bad.event),
                    why,
                )
                self.set_aside += 1
                _settle(bad, JournalUnavailable(f"not journaled: {why}"))
                chunks.append([_error_item(bad.event, STATUS_SET_ASIDE, why)])
                continue
            metrics.record_commit(len(chunk), time.perf_counter() - started)
            self._committed(chunk, bool(result.jobs))

    def _committed(self, chunk: list[_Item], started_jobs: bool) -> None:
        self.committed += len(chunk)
        self.batches += 1
        try:
            metrics.record_events(item.event for item in chunk)
        except Exception:  # counting must never break the journal
            log.exception("journal: metrics failed")
        if started_jobs and self._after_commit is not None:
            try:
                self._after_commit()
            except Exception:  # a listener must never break the journal
                log.exception("journal: after-commit listener failed")
        late: list[Event] = []
        for item in chunk:
            _settle(item, None)
            if item.future is not None:
                with self._lock:
                    if item.abandoned:  # its client timed out while this commit ran
                        late.append(item.event)
        for event in late:
            self.emit(_error_item(event, STATUS_TIMEOUT, _COMMITTED_LATE).event)


_TIMED_OUT = "not journaled in time (journal.durable_timeout): the client was told it failed"
_COMMITTED_LATE = (
    "committed after journal.durable_timeout: the client was told it failed, "
    "but the upload and its job exist"
)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT]


def _op_name(event: object) -> str:
    op = getattr(event, "op", None)
    return op.value if isinstance(op, Op) else "malformed"


def _bounded(value: object, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value[:limit]


def _error_item(event: Event, status: str, why: str) -> _Item:
    """An error row standing in for ``event``: what can safely be kept of it, and why.

    The record may hold anything (that is why it failed), so every field is
    checked again: only bounded strings and in-range numbers are kept; no
    upload, no attrs, so no job follows and nothing can fail a second time.
    """
    session = getattr(event, "session", None)
    op = getattr(event, "op", None)
    if not isinstance(op, Op) or op in _SESSION_OPS:
        op = Op.PROTOCOL_ERROR
    port = getattr(session, "remote_port", 0)
    when = getattr(event, "time", None)
    key = _bounded(getattr(event, "key", None), 256)
    info = SessionInfo(
        id=_bounded(getattr(session, "id", None), 64) or "unknown",
        remote_addr=_bounded(getattr(session, "remote_addr", None), 64) or "?",
        remote_port=port if type(port) is int and 0 <= port <= 65535 else 0,
        login=_bounded(getattr(session, "login", None), 64),
        auth_method=_bounded(getattr(session, "auth_method", None), 32),
    )
    error = Event(
        op=op,
        session=info,
        time=when if type(when) is float and 0 <= when < 2**34 else time.time(),
        path=_bounded(getattr(event, "path", None), 4096),
        path2=_bounded(getattr(event, "path2", None), 4096),
        status=status,
        message=why[:MAX_ERROR_TEXT],
        # A record set aside keeps its key: a replay of it is not set aside twice.
        # One that was only late gives it up: its replay (a tap's spool) gets in.
        key=key if status == STATUS_SET_ASIDE else None,
    )
    return _Item(error, aside=True)


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
