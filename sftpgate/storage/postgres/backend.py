"""The PostgreSQL :class:`~sftpgate.storage.ports.Backend`: one pool, every port on it."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from psycopg_pool import ConnectionPool

from ..ports import JobStore
from . import schema
from .bans import PgBanStore, PgUsageLedger
from .journal import PgJournalPruner, PgJournalReader, PgJournalStore
from .pool import Conn, open_pool, unavailable_as_storage

if TYPE_CHECKING:
    from ...config import Config


class PostgresBackend:
    """``database.url: postgresql://…``. Each port checks the schema first (SchemaBehind names
    ``sftpgate db migrate``); all ports share one pool of ``size`` connections."""

    name = "postgresql"

    def __init__(self, url: str, size: int = 10) -> None:
        self._url = url
        self._size = size
        self._opened: ConnectionPool[Conn] | None = None
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

    def schema_version(self) -> int:
        with unavailable_as_storage(), self._pool.connection() as conn:
            return schema.current_version(conn)

    def migrate(self) -> list[int]:
        with unavailable_as_storage(), self._pool.connection() as conn:
            applied = schema.migrate(conn)
        self._checked = False
        return applied

    def _check(self) -> None:
        if not self._checked:
            with unavailable_as_storage(), self._pool.connection() as conn:
                schema.require_current(conn)
            self._checked = True

    def journal(self) -> PgJournalStore:
        self._check()
        return PgJournalStore(self._pool)

    def reader(self) -> PgJournalReader:
        self._check()
        return PgJournalReader(self._pool)

    def pruner(self) -> PgJournalPruner:
        self._check()
        return PgJournalPruner(self._pool)

    def bans(self) -> PgBanStore:
        self._check()
        return PgBanStore(self._pool)

    def usage(self) -> PgUsageLedger:
        self._check()
        return PgUsageLedger(self._pool)

    def jobs(self) -> JobStore:
        self._check()
        from .jobs import PgJobStore

        store: Any = PgJobStore(self._pool)
        return store  # type: ignore[no-any-return]


def from_config(config: Config) -> PostgresBackend:
    """The backend of ``database.url`` (a ``postgresql://`` URL) and ``database.pool_size``."""
    assert config.database.url is not None
    return PostgresBackend(config.database.url, config.database.pool_size)
