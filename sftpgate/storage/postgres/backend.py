"""The PostgreSQL :class:`~sftpgate.storage.ports.Backend`: one pool, every port on it."""

from __future__ import annotations

from typing import Any

from ..ports import JobStore
from . import schema
from .bans import PgBanStore, PgUsageLedger
from .journal import PgJournalPruner, PgJournalReader, PgJournalStore
from .pool import open_pool, unavailable_as_storage


class PostgresBackend:
    """``database.url: postgresql://…``. Each port checks the schema first (SchemaBehind names
    ``sftpgate db migrate``); all ports share one pool of ``size`` connections."""

    name = "postgresql"

    def __init__(self, url: str, size: int = 10) -> None:
        self._pool = open_pool(url, size)
        self._checked = False

    @property
    def latest(self) -> int:
        return schema.LATEST

    def close(self) -> None:
        self._pool.close()

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
