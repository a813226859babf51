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
import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(slots=True)
class WriteBudget:
    """Bytes queued but not yet written, over all handles of a gateway."""

    limit: int
    queued: int = 0


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
        self._budget.queued += len(data)
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
        trip); a failed fsync is returned as the close's error.
        """
        self._cancel_timer()
        while self._task is not None:
            await asyncio.shield(self._task)
        chunks = self._take()
        result: tuple[int, OSError | None, OSError | None]
        # An fsync waits for the disk: never inline on the loop, always the pool.
        runner = self._run_io if fsync else self._runner(chunks)
        result = await runner(self._finish, chunks, fsync)
        written, error, close_error = result
        self._account(chunks, written, error)
        return close_error

    def _finish(
        self, chunks: list[Chunk], fsync: bool = False
    ) -> tuple[int, OSError | None, OSError | None]:
        # In a worker thread: the last batch (if any), fsync(2) if asked, then close(2).
        written, error = self._write(self.fd, chunks) if chunks else (0, None)
        sync_error: OSError | None = None
        if fsync and error is None and self.error is None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                sync_error = exc
        try:
            os.close(self.fd)
        except OSError as exc:
            return written, error, sync_error or exc
        return written, error, sync_error

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
        self._budget.queued -= size
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
                except Exception as exc:  # the executor itself failed (e.g. shut down)
                    written, error = 0, OSError(errno.EIO, f"write not started: {exc}")
                self._account(batch, written, error)
                self._batch_finished()
            self._take()  # after a failure: drop the rest
        finally:
            self._task = None
            self._batch_finished()
