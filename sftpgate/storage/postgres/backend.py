"""The PostgreSQL :class:`~sftpgate.storage.ports.Backend`: one pool, every port on it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from psycopg_pool import ConnectionPool

from . import schema
from .admin import PgAdminStore
from .bans import PgBanStore, PgUsageLedger
from .gateways import PgGatewayRegistry
from .jobs import PgJobStore
from .journal import PgJournalPruner, PgJournalReader, PgJournalStore
from .pool import Conn, PoolPort, open_pool, unavailable_as_storage

if TYPE_CHECKING:
    from ...config import Config

P = TypeVar("P", bound=PoolPort)


class PostgresBackend:
    """``database.url: postgresql://…``. Each port checks the schema first (SchemaBehind names
    ``sftpgate db migrate``); all ports share one pool of ``size`` connections."""

    name = "postgresql"

    def __init__(self, url: str, size: int = 10) -> None:
        self._url = url
        self._size = size
        self._opened: ConnectionPool[Conn] | None = None
        self._users = 0  # ports not yet closed (and calls under way) on the pool
        self._lock = threading.Lock()
        self._checked = False

    @property
    def _pool(self) -> ConnectionPool[Conn]:
        """The pool, opened by the first port asked for (nothing is opened before)."""
        with self._lock:
            if self._opened is None:
                self._opened = open_pool(self._url, self._size)
            return self._opened

    @property
    def latest(self) -> int:
        return schema.LATEST

    def close(self) -> None:
        """Close the pool (idempotent); ports taken from this backend stop working."""
        with self._lock:
            if self._opened is not None:
                self._opened.close()
                self._opened = None
            self._users = 0

    def _acquire(self) -> ConnectionPool[Conn]:
        with self._lock:
            if self._opened is None:
                self._opened = open_pool(self._url, self._size)
            self._users += 1
            return self._opened

    def _let_go(self) -> None:
        """A port closed: the last one closes the pool (a later port opens a new one)."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0 and self._opened is not None:
                self._opened.close()
                self._opened = None

    @contextmanager
    def _borrowed(self) -> Iterator[Conn]:
        pool = self._acquire()
        try:
            with unavailable_as_storage(), pool.connection() as conn:
                yield conn
        finally:
            self._let_go()

    def _port(self, cls: type[P]) -> P:
        if not self._checked:
            with self._borrowed() as conn:
                schema.require_current(conn)
            self._checked = True
        return cls(self._acquire(), self._let_go)

    def schema_version(self) -> int:
        with self._borrowed() as conn:
            return schema.current_version(conn)

    def migrate(self) -> list[int]:
        with self._borrowed() as conn:
            applied = schema.migrate(conn)
        self._checked = False
        return applied

    def journal(self) -> PgJournalStore:
        return self._port(PgJournalStore)

    def reader(self) -> PgJournalReader:
        return self._port(PgJournalReader)

    def pruner(self) -> PgJournalPruner:
        return self._port(PgJournalPruner)

    def bans(self) -> PgBanStore:
        return self._port(PgBanStore)

    def usage(self) -> PgUsageLedger:
        return self._port(PgUsageLedger)

    def jobs(self) -> PgJobStore:
        return self._port(PgJobStore)

    def admin(self) -> PgAdminStore:
        return self._port(PgAdminStore)

    def gateways(self) -> PgGatewayRegistry:
        return self._port(PgGatewayRegistry)


_SHARED: dict[tuple[int, str, int], PostgresBackend] = {}
_SHARED_LOCK = threading.Lock()


def from_config(config: Config) -> PostgresBackend:
    """The backend of ``database.url`` (a ``postgresql://`` URL) and ``database.pool_size``:
    one per process, so the journal writer, workers, bans and quotas share one pool of at
    most ``pool_size`` connections (keyed by pid too: a forked child never uses its parent's
    connections)."""
    url = config.database.url
    assert url is not None
    key = (os.getpid(), url, config.database.pool_size)
    with _SHARED_LOCK:
        backend = _SHARED.get(key)
        if backend is None:
            backend = _SHARED[key] = PostgresBackend(url, config.database.pool_size)
        return backend
