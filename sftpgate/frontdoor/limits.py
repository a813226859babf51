"""What one user may hold through ``serve``: handles, upload size, quota (bytes and files).

:class:`DoorLimits` is made once per gateway from ``server.*`` and handed to
every session. :class:`Quotas` keeps each user's usage (bytes of regular
files, counted once per inode, and how many) on the event loop, current from
the front door's own changes: WRITEs past a file's end, truncation, removal,
a rename over a file. Nothing rescans a home: the first session that needs a
user's usage reads it from the :class:`UsageLedger` (the journal database),
and only if there is none there scans the home once, in the pool, as the
user. Changes are written back to the ledger as sums every few seconds, so
several gateway processes sharing one database add up.

What it cannot see: files changed outside the gateway (a shell, the NFS
server, OpenSSH's own sftp-server: under ``sftpgate subsystem`` quotas are
only observed, never enforced) and sessions of a user while they had no
quota (the stored usage is then dropped, and the next need scans again).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import User
from ..logsetup import outside_sessions

log = logging.getLogger(__name__)

# The default of server.max_handles: OpenSSH's sftp-server allows 512.
MAX_HANDLES = 512
# Descriptors kept free of client handles, over every session (sockets, the journal, logs).
FD_RESERVE = 256
# How often changed usage is written back to the ledger (seconds).
FLUSH_EVERY = 2.0


class UsageLedger(Protocol):
    """Where usage survives a restart (the journal database). Every method blocks: pool only."""

    def load(self, login: str) -> tuple[int, int] | None:
        """The stored (bytes, files) of ``login``, or None if never scanned."""

    def store(self, login: str, used_bytes: int, files: int) -> None:
        """Replace the stored usage of ``login`` (after a scan)."""

    def add(self, login: str, used_bytes: int, files: int) -> tuple[int, int] | None:
        """Add to the stored usage; the new totals (None if nothing is stored)."""

    def forget(self, login: str) -> None:
        """Drop the stored usage of ``login`` (it is no longer kept current)."""

    def close(self) -> None:
        """Let go of the database."""


@dataclass(slots=True)
class Usage:
    """One user's usage as this gateway knows it, and what the ledger has not been told."""

    used_bytes: int
    files: int
    unsaved_bytes: int = 0
    unsaved_files: int = 0


class Quotas:
    """Every user's usage in this gateway (see module doc). Used on the event loop only."""

    def __init__(
        self,
        ledger: Callable[[], UsageLedger] | None = None,
        executor: Executor | None = None,
    ) -> None:
        # Opened (it may create a table) at first need, in the pool.
        self._open_ledger = ledger
        self._ledger: UsageLedger | None = None
        self._ledger_lock = threading.Lock()
        self._executor = executor
        self._usage: dict[str, Usage] = {}
        self._loading: dict[str, asyncio.Future[Usage]] = {}
        self._forgotten: set[str] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._saving: asyncio.Task[None] | None = None

    def known(self, login: str) -> Usage | None:
        return self._usage.get(login)

    async def usage(self, login: str, scan: Callable[[], Awaitable[tuple[int, int]]]) -> Usage:
        """``login``'s usage: in memory, else the ledger's, else ``scan()`` once (then stored)."""
        known = self._usage.get(login)
        if known is not None:
            return known
        loading = self._loading.get(login)
        if loading is None:
            loading = asyncio.get_running_loop().create_future()
            self._loading[login] = loading
            try:
                stored = await self._call("load", login)
                if stored is None:
                    used_bytes, files = await scan()
                    log.info("quota: %s holds %d bytes in %d files", login, used_bytes, files)
                    await self._call("store", login, used_bytes, files)
                    stored = used_bytes, files
                usage = self._usage[login] = Usage(*stored)
                self._forgotten.discard(login)
                loading.set_result(usage)
            except BaseException as exc:
                loading.set_exception(exc)
                loading.exception()  # retrieved: a later call scans again
                raise
            finally:
                del self._loading[login]
            return usage
        return await asyncio.shield(loading)

    def change(self, login: str, used_bytes: int = 0, files: int = 0) -> None:
        """Count a change the front door made (known usage only); saved within FLUSH_EVERY s."""
        usage = self._usage.get(login)
        if usage is None or not (used_bytes or files):
            return
        usage.used_bytes = max(0, usage.used_bytes + used_bytes)
        usage.files = max(0, usage.files + files)
        usage.unsaved_bytes += used_bytes
        usage.unsaved_files += files
        if self._open_ledger is not None and self._flush is None:
            loop = asyncio.get_running_loop()
            # Saves every user's usage: not the line of the session that changed first.
            self._flush = loop.call_later(FLUSH_EVERY, self._start_save, context=outside_sessions())

    def untracked(self, login: str) -> None:
        """A session of ``login`` without a quota began: its changes will not be counted."""
        if login in self._forgotten:
            return
        self._forgotten.add(login)
        self._usage.pop(login, None)
        if self._open_ledger is not None:
            task: asyncio.Future[None] = asyncio.ensure_future(self._call("forget", login))
            task.add_done_callback(_log_failure)

    def _start_save(self) -> None:
        self._flush = None
        if self._saving is None:
            self._saving = asyncio.get_running_loop().create_task(self.save())
            self._saving.add_done_callback(_log_failure)

    async def save(self) -> None:
        """Write every unsaved change to the ledger; take back the totals other processes made."""
        try:
            for login, usage in list(self._usage.items()):
                add_bytes, add_files = usage.unsaved_bytes, usage.unsaved_files
                if not (add_bytes or add_files) or self._open_ledger is None:
                    continue
                usage.unsaved_bytes -= add_bytes
                usage.unsaved_files -= add_files
                totals = await self._call("add", login, add_bytes, add_files)
                if totals is not None and self._usage.get(login) is usage:
                    usage.used_bytes = max(0, totals[0] + usage.unsaved_bytes)
                    usage.files = max(0, totals[1] + usage.unsaved_files)
        finally:
            self._saving = None

    async def aclose(self) -> None:
        """Save what is unsaved (at the gateway's stop)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._saving is not None:
            await asyncio.shield(self._saving)
        await self.save()
        if self._ledger is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._ledger.close)

    async def _call(self, method: str, *args: object) -> Any:
        """Call the ledger's ``method`` in the pool (None, without a ledger)."""
        if self._open_ledger is None:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._in_pool, method, args)

    def _in_pool(self, method: str, args: tuple[object, ...]) -> Any:
        with self._ledger_lock:
            if self._ledger is None:
                assert self._open_ledger is not None
                self._ledger = self._open_ledger()
            ledger = self._ledger
        return getattr(ledger, method)(*args)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("quota usage not saved: %s", task.exception())


def fd_allowance(reserve: int = FD_RESERVE) -> int:
    """How many client handles all sessions may hold: the open-files limit less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(64, soft - reserve)


@dataclass(slots=True, eq=False)
class DoorLimits:
    """The gateway's limits on what sessions hold (``server.*``; per user in ``users[]``)."""

    max_handles: int = MAX_HANDLES
    max_upload_size: int = 0  # 0: none
    quota_bytes: int = 0  # server-wide defaults; 0: none
    quota_files: int = 0
    quotas: Quotas = field(default_factory=Quotas)
    # Client handles that hold a descriptor, over every session, and how many may.
    open_files: int = 0
    most_open_files: int = field(default_factory=fd_allowance)

    def quota_of(self, user: User) -> tuple[int, int]:
        """(bytes, files) ``user`` may hold; 0 for no limit."""
        used_bytes = user.quota_bytes if user.quota_bytes is not None else self.quota_bytes
        files = user.quota_files if user.quota_files is not None else self.quota_files
        return used_bytes, files
