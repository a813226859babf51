"""The defender's bans and users' quota usage on PostgreSQL (journal/bans.py and
journal/usage.py in PostgreSQL's words). Both thread-safe: every call takes a pooled
connection."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ...defender import Ban
from ...events import Event
from .journal import PgJournalStore
from .pool import PoolPort, unavailable_as_storage

_UPSERT = """
INSERT INTO bans (address, until, strikes, reason, created_at, lifted)
VALUES (%s, %s, %s, %s, %s, 0)
ON CONFLICT (address) DO UPDATE SET
    until = excluded.until, strikes = excluded.strikes, reason = excluded.reason,
    created_at = excluded.created_at, lifted = 0
WHERE excluded.created_at >= bans.created_at
"""


def _ban(row: dict[str, Any]) -> Ban:
    return Ban(row["address"], row["until"], row["strikes"], row["reason"], row["created_at"])


class PgBanStore(PoolPort):
    """:class:`~sftpgate.storage.ports.BanStore` on PostgreSQL."""

    def upsert(self, bans: Iterable[Ban]) -> None:
        # One transaction, in address order: two gateways upserting together lock rows
        # in the same order and never deadlock.
        rows = sorted((b.address, b.until, b.strikes, b.reason, b.created_at) for b in bans)
        if not rows:
            return
        with (
            unavailable_as_storage(),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cursor,
        ):
            cursor.executemany(_UPSERT, rows)

    def load(self, now: float, memory: float) -> tuple[list[Ban], list[Ban]]:
        with unavailable_as_storage(), self._pool.connection() as conn, conn.transaction():
            conn.execute("DELETE FROM bans WHERE until < %s", (now - memory,))
            # UPDATE ... RETURNING under row locks: of gateways racing, each ended ban is
            # returned (and so journaled) by exactly one.
            lifted = [
                _ban(r)
                for r in conn.execute(
                    "UPDATE bans SET lifted = 1 WHERE lifted = 0 AND until <= %s RETURNING *",
                    (now,),
                ).fetchall()
            ]
            rows = [_ban(r) for r in conn.execute("SELECT * FROM bans ORDER BY address")]
        return rows, lifted

    def list(self) -> list[Ban]:
        with unavailable_as_storage(), self._pool.connection() as conn:
            return [_ban(r) for r in conn.execute("SELECT * FROM bans ORDER BY address")]

    def active(self, now: float) -> int:
        with unavailable_as_storage(), self._pool.connection() as conn:
            row = conn.execute("SELECT count(*) AS n FROM bans WHERE until > %s", (now,)).fetchone()
        return int(row["n"]) if row else 0

    def remove(self, address: str) -> Ban | None:
        with unavailable_as_storage(), self._pool.connection() as conn:
            row = conn.execute(
                "DELETE FROM bans WHERE address = %s RETURNING *", (address,)
            ).fetchone()
        return _ban(row) if row else None

    def journal(self, event: Event) -> None:
        PgJournalStore(self._pool).record_batch([event])


class PgUsageLedger(PoolPort):
    """:class:`~sftpgate.storage.ports.UsageLedger` on PostgreSQL: sums added in SQL."""

    def load(self, login: str) -> tuple[int, int] | None:
        with unavailable_as_storage(), self._pool.connection() as conn:
            row = conn.execute(
                "SELECT bytes, files FROM quota_usage WHERE login = %s", (login,)
            ).fetchone()
        return None if row is None else (int(row["bytes"]), int(row["files"]))

    def store(self, login: str, used_bytes: int, files: int) -> None:
        now = time.time()
        with unavailable_as_storage(), self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO quota_usage (login, bytes, files, scanned_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (login) DO UPDATE SET "
                "bytes = excluded.bytes, files = excluded.files, "
                "scanned_at = excluded.scanned_at, updated_at = excluded.updated_at",
                (login, used_bytes, files, now, now),
            )

    def add(self, login: str, used_bytes: int, files: int) -> tuple[int, int] | None:
        with unavailable_as_storage(), self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE quota_usage SET bytes = greatest(0, bytes + %s),"
                " files = greatest(0, files + %s), updated_at = %s WHERE login = %s"
                " RETURNING bytes, files",
                (used_bytes, files, time.time(), login),
            ).fetchone()
        return None if row is None else (int(row["bytes"]), int(row["files"]))

    def forget(self, login: str) -> None:
        with unavailable_as_storage(), self._pool.connection() as conn:
            conn.execute("DELETE FROM quota_usage WHERE login = %s", (login,))
