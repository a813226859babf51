"""The SQLite backend: every port on the journal file in the state folder (the default)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from ..jobs.store import JobStore as SQLiteJobStore
from ..journal import store
from ..journal.bans import BanStore as SQLiteBanStore
from ..journal.prune import SQLitePruner
from ..journal.query import SQLiteReader
from ..journal.store import SQLiteJournal
from ..journal.usage import SQLiteUsageLedger
from .ports import (
    AdminStore,
    BanStore,
    GatewayRegistry,
    JobStore,
    JournalPruner,
    JournalReader,
    JournalStore,
    UsageLedger,
)


class SQLiteBackend:
    """:class:`~sftpgate.storage.ports.Backend` on one SQLite file.

    A new (empty) file is created at the current schema by the first port that
    writes: the single-host default needs no ``sftpgate db migrate`` before its
    first start. A file whose schema is behind is refused until migrated.
    """

    name = "sqlite"

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self.synchronous = synchronous

    @property
    def latest(self) -> int:
        return store.SCHEMA_VERSION

    def schema_version(self) -> int:
        if not self.path.exists():
            return 0
        with contextlib.closing(store.connect(self.path, readonly=True)) as conn:
            try:
                return store.schema_version(conn)
            except sqlite3.DatabaseError:
                return 0

    def migrate(self) -> list[int]:
        with contextlib.closing(store.open_rw(self.path, synchronous=self.synchronous)) as conn:
            return store.migrate(conn)

    def journal(self) -> JournalStore:
        return SQLiteJournal(self.path, synchronous=self.synchronous)

    def reader(self) -> JournalReader:
        return SQLiteReader(self.path)

    def pruner(self) -> JournalPruner:
        return SQLitePruner(self.path, synchronous=self.synchronous)

    def jobs(self) -> JobStore:
        return SQLiteJobStore(self.path, synchronous=self.synchronous)

    def bans(self) -> BanStore:
        return SQLiteBanStore(self.path, synchronous=self.synchronous)

    def usage(self) -> UsageLedger:
        return SQLiteUsageLedger(self.path, synchronous=self.synchronous)

    def admin(self) -> AdminStore:
        from ..journal.admin import SQLiteAdminStore

        return SQLiteAdminStore(self.path, synchronous=self.synchronous)

    def gateways(self) -> GatewayRegistry:
        from ..journal.gateways import SQLiteGatewayRegistry

        return SQLiteGatewayRegistry(self.path, synchronous=self.synchronous)
