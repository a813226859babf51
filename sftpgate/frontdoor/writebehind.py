"""Write-behind for upload handles: the WRITE reply does not wait for the disk.

asyncssh serves one request of a session at a time, and the gateway keeps
blocking file I/O off the event loop. Writing each WRITE before replying would
put one thread-pool round trip in series with every request (with 32 KiB
writes, the hand-off alone was a quarter of the gateway's CPU). Instead a WRITE
is queued on its handle and answered at once, and a flusher writes whatever has
queued since its last trip in one thread-pool call, contiguous runs joined into
one ``pwritev``. Network and disk then overlap, as they do in a kernel's page
cache. Less than ``FLUSH_AT`` waits up to ``FLUSH_DELAY`` for more, so a small
file's only WRITE is written in the same call as its CLOSE (one thread trip, or
inline on a local disk: small batches may run on the loop, see inline.py).

What the client is promised stays the same: every other request on the
handle (READ, FSTAT, FSETSTAT, FSYNC, CLOSE), and every path request of the
session, waits until the queue is on disk. A write that fails is journaled
when it fails and reported on the handle's next WRITE or on its CLOSE, whose
reply is then an error: a CLOSE that says OK still means every byte is
written. Queues are bounded per handle and gateway-wide; past either bound a
WRITE waits for its own handle's queue to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# Bounds of what is answered but not yet written: per handle (a few SFTP
# windows' worth) and per gateway (so 1,000 sessions can't hold gigabytes).
HANDLE_LIMIT = 4 * 1024 * 1024
WRITE_BUDGET = 64 * 1024 * 1024
# Below this much queued, a handle's writes wait up to FLUSH_DELAY seconds for
# more (or for the CLOSE) before a thread writes them.
FLUSH_AT = 256 * 1024
FLUSH_DELAY = 0.005

# Linux's IOV_MAX: pwritev takes at most this many buffers.
_IOV_MAX = 1024

# A WRITE's data: a view into the request it came in, which it keeps alive.
Data = bytes | memoryview
Chunk = tuple[int, Data]  # (offset, data)
RunIO = Callable[..., Awaitable[Any]]


class Pausable(Protocol):
    """A session that stopped reading because the budget was spent (see channel.py)."""

    def budget_drained(self) -> None: ...


@dataclass(slots=True, eq=False)
class WriteBudget:
    """Bytes received but not yet written, over every session of a gateway.

    Two kinds are counted: ``queued``, WRITEs answered and waiting for the
    disk (write-behind); ``received``, bytes waiting in sessions' receive
    buffers for their request to be taken. A WRITE waits while ``queued`` is
    over ``limit``; a session stops reading from its client (and so stops
    re-opening its SSH window) while the sum is (see
    :class:`~.channel.SFTPSession`), and reads again once it has drained
    below three quarters of ``limit``. ``peak`` and ``pauses`` say how high
    it went and how often sessions had to wait (for tests and the bench).
    """

    limit: int
    queued: int = 0
    received: int = 0
    peak: int = 0
    pauses: int = 0
    waiting: set[Pausable] = field(default_factory=set)

    @property
    def held(self) -> int:
        return self.queued + self.received

    @property
    def spent(self) -> bool:
        return self.queued + self.received >= self.limit

    def change(self, queued: int = 0, received: int = 0) -> None:
        """Count bytes in (positive) or out (negative); wake waiting sessions once drained."""
        self.queued += queued
        self.received += received
        held = self.queued + self.received
        if held > self.peak:
            self.peak = held
        elif self.waiting and held * 4 < self.limit * 3:
            waiting, self.waiting = self.waiting, set()
            for session in waiting:
                session.budget_drained()

    def wait(self, session: Pausable) -> None:
        """``session`` paused for the budget: tell it once the budget has drained."""
        self.pauses += 1
        self.waiting.add(session)


def write_chunks(fd: int, chunks: list[Chunk]) -> tuple[int, OSError | None]:
    """Write ``chunks`` in order; return (bytes written, the error that stopped it).

    Runs in a worker thread. Chunks at contiguous offsets go out as one
    ``pwritev``; short writes are resumed. Pure apart from the writes.
    """
    written = 0
    try:
        for offset, buffers in coalesce(chunks):
            views = [memoryview(b) for b in buffers]
            while views:
                n = os.pwritev(fd, views[:_IOV_MAX], offset)
                written += n
                offset += n
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
    except OSError as exc:
        return written, exc
    except (OverflowError, ValueError) as exc:
        # An offset past off_t (the edge refuses these; this is the backstop):
        # reported as the kernel would, never raised out of the batch.
        return written, OSError(errno.EFBIG, f"File too large ({exc})")
    return written, None


def coalesce(chunks: list[Chunk]) -> list[tuple[int, list[Data]]]:
    """Group chunks into runs of contiguous offsets, keeping their order. Pure."""
    runs: list[tuple[int, list[Data]]] = []
    end = -1
    for offset, data in chunks:
        if runs and offset == end:
            runs[-1][1].append(data)
        else:
            runs.append((offset, [data]))
        end = offset + len(data)
    return runs


class WriteQueue:
    """The queued writes of one handle and the task writing them.

    All state is touched on the event loop only; a thread sees one batch.
    Small amounts wait (up to ``FLUSH_DELAY``) for more or for the CLOSE, so a
    small file's data and its close share one thread trip.
    """

    def __init__(
        self,
        fd: int,
        run_io: RunIO,
        budget: WriteBudget,
        *,
        per_handle_limit: int,
        write: Callable[[int, list[Chunk]], tuple[int, OSError | None]] = write_chunks,
        run_small: RunIO | None = None,
        small: int = 0,
    ) -> None:
        self.fd = fd
        self._run_io = run_io
        # While the file has at most ``small`` bytes, its batches and its close
        # go through run_small (which may run them inline on a local disk, see
        # inline.py); a bigger file's go to the pool, all of them.
        self._run_small = run_small or run_io
        self._small = small
        self._budget = budget
        self._limit = per_handle_limit
        self._write = write
        self._chunks: list[Chunk] = []
        self._queued = 0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Resolved each time a batch is done: what a WRITE over a bound waits for.
        self._batch_done: asyncio.Future[None] | None = None
        self.written = 0
        # Set (once) when the descriptor has been closed, by whichever path closed it.
        self.closed = False
        self.error: OSError | None = None
        # Set once a failure has been told to the client (a WRITE reply).
        self.reported = False
        # Called on the loop with the error when a batch fails.
        self.on_error: Callable[[OSError], None] | None = None

    @property
    def idle(self) -> bool:
        return not self._chunks and self._task is None

    async def add(self, offset: int, data: Data) -> None:
        """Queue one WRITE; wait only if a bound is passed."""
        self._chunks.append((offset, data))
        self._queued += len(data)
        self._budget.change(queued=len(data))
        if self._task is None:
            if self._queued >= FLUSH_AT:
                self._start()
            elif self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(FLUSH_DELAY, self._start)
        # Past a bound, wait for the batch being written, not for the whole
        # queue: the next batch starts at once, so the disk never idles.
        while self._queued > 0 and (
            self._queued > self._limit or self._budget.queued > self._budget.limit
        ):
            self._start()
            if self._task is None:
                break
            await self._next_batch()

    def _next_batch(self) -> asyncio.Future[None]:
        if self._batch_done is None or self._batch_done.done():
            self._batch_done = asyncio.get_running_loop().create_future()
        return self._batch_done

    def _batch_finished(self) -> None:
        if self._batch_done is not None and not self._batch_done.done():
            self._batch_done.set_result(None)

    async def drain(self) -> None:
        """Return once everything queued so far is written (or has failed)."""
        self._start()
        while self._task is not None:
            await asyncio.shield(self._task)

    async def close(self, *, fsync: bool = False) -> OSError | None:
        """Write what is left and close the fd, in one thread trip; the close's error.

        With ``fsync`` the file is fsync'd before it is closed (in the same
        trip); a failed fsync is returned as the close's error. Whatever
        fails on the way (the trip itself, a bug, a cancelled CLOSE) the
        descriptor is closed exactly once and the budget given back.
        """
        self._cancel_timer()
        while self._task is not None:
            await asyncio.shield(self._task)
        chunks = self._take()
        # An fsync waits for the disk: never inline on the loop, always the pool.
        runner = self._run_io if fsync else self._runner(chunks)
        trip: asyncio.Future[tuple[int, OSError | None, OSError | None]]
        trip = asyncio.ensure_future(runner(self._finish, chunks, fsync))
        try:
            written, error, close_error = await asyncio.shield(trip)
        except asyncio.CancelledError:
            # The trip goes on without us (a thread cannot be stopped): settle after it.
            trip.add_done_callback(lambda _: self._after_failed_trip(chunks))
            raise
        except Exception as exc:
            self._after_failed_trip(chunks)
            return OSError(errno.EIO, f"close failed: {type(exc).__name__}")
        self._account(chunks, written, error)
        return close_error

    def _after_failed_trip(self, chunks: list[Chunk]) -> None:
        """The closing trip failed (or was left): return the budget; close the fd if it didn't."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self._account(chunks, 0, None)

    def _finish(
        self, chunks: list[Chunk], fsync: bool = False
    ) -> tuple[int, OSError | None, OSError | None]:
        # In a worker thread: the last batch (if any), fsync(2) if asked, then
        # close(2), which happens whatever the rest raised.
        try:
            written, error = self._write(self.fd, chunks) if chunks else (0, None)
            sync_error: OSError | None = None
            if fsync and error is None and self.error is None:
                try:
                    os.fsync(self.fd)
                except OSError as exc:
                    sync_error = exc
        finally:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError as exc:
                close_error: OSError | None = exc
            else:
                close_error = None
        return written, error, sync_error or close_error

    def _runner(self, chunks: list[Chunk]) -> RunIO:
        size = self.written + sum(len(data) for _, data in chunks)
        return self._run_small if size <= self._small else self._run_io

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self) -> None:
        self._cancel_timer()
        if self._task is None and self._chunks:
            self._task = asyncio.get_running_loop().create_task(self._flush())

    def _take(self) -> list[Chunk]:
        """The queued chunks, or none if an earlier batch failed (they are dropped)."""
        chunks, self._chunks = self._chunks, []
        if self.error is not None:
            self._account(chunks, 0, None)
            return []
        return chunks

    def _account(self, chunks: list[Chunk], written: int, error: OSError | None) -> None:
        size = sum(len(data) for _, data in chunks)
        self._queued -= size
        self._budget.change(queued=-size)
        self.written += written
        if error is not None and self.error is None:
            self.error = error
            if self.on_error is not None:
                self.on_error(error)

    async def _flush(self) -> None:
        try:
            while self._chunks and self.error is None:
                batch = self._take()
                try:
                    written, error = await self._runner(batch)(self._write, self.fd, batch)
                except asyncio.CancelledError:
                    self._account(batch, 0, OSError(errno.EIO, "write cancelled"))
                    raise
                except Exception as exc:  # the trip itself failed (pool shut down, a bug)
                    written, error = 0, OSError(errno.EIO, f"write failed: {type(exc).__name__}")
                self._account(batch, written, error)
                self._batch_finished()
            self._take()  # after a failure: drop the rest
        finally:
            self._task = None
            self._batch_finished()
