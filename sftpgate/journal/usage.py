"""Users' quota usage in the journal database: the ledger behind frontdoor/limits.py.

Its own connection (every call comes from a pool thread, one at a time
under a lock), not the journal writer's: usage is a running sum, not a
record of what happened. Changes are added (``bytes = bytes + ?``), so
several gateway processes sharing the database add up rather than
overwrite each other.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

from .store import connect


class SQLiteUsageLedger:
    """:class:`~sftpgate.frontdoor.limits.UsageLedger` on the journal's SQLite file."""

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._conn = connect(path, synchronous=synchronous)
        self._lock = threading.Lock()

    def load(self, login: str) -> tuple[int, int] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT bytes, files FROM quota_usage WHERE login = ?", (login,)
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def store(self, login: str, used_bytes: int, files: int) -> None:
        now = time.time()
        with self._lock:
            self._conn.execute(
                "INSERT INTO quota_usage (login, bytes, files, scanned_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (login) DO UPDATE SET "
                "bytes = excluded.bytes, files = excluded.files, "
                "scanned_at = excluded.scanned_at, updated_at = excluded.updated_at",
                (login, used_bytes, files, now, now),
            )

    def add(self, login: str, used_bytes: int, files: int) -> tuple[int, int] | None:
        with self._lock:
            row = self._conn.execute(
                "UPDATE quota_usage SET bytes = max(0, bytes + ?), files = max(0, files + ?), "
                "updated_at = ? WHERE login = ? RETURNING bytes, files",
                (used_bytes, files, time.time(), login),
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def forget(self, login: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM quota_usage WHERE login = ?", (login,))

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()
