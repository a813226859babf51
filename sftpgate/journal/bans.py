"""The ``bans`` table of the journal database: the defender's bans, shared by every gateway
(and ``sftpgate bans``) on that database. All its SQL is here."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from ..defender import Ban
from ..events import Event
from .store import connect, record_batch

_UPSERT = """
INSERT INTO bans (address, until, strikes, reason, created_at, lifted)
VALUES (?, ?, ?, ?, ?, 0)
ON CONFLICT(address) DO UPDATE SET
    until = excluded.until, strikes = excluded.strikes, reason = excluded.reason,
    created_at = excluded.created_at, lifted = 0
WHERE excluded.created_at >= bans.created_at
"""


def _ban(row: sqlite3.Row) -> Ban:
    return Ban(row["address"], row["until"], row["strikes"], row["reason"], row["created_at"])


class BanStore:
    """The :class:`~sftpgate.storage.ports.BanStore` on the SQLite journal. Blocking: a thread."""

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._conn = connect(path, synchronous=synchronous)

    def close(self) -> None:
        self._conn.close()

    def upsert(self, bans: Iterable[Ban]) -> None:
        """Write ``bans`` (a newer ban of an address replaces an older one)."""
        rows = [(b.address, b.until, b.strikes, b.reason, b.created_at) for b in bans]
        if not rows:
            return
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(_UPSERT, rows)

    def load(self, now: float, memory: float) -> tuple[list[Ban], list[Ban]]:
        """Every ban ended less than ``memory`` s ago or still on, and those that ended since
        the last look (marked lifted here, so one gateway journals each); older rows are
        deleted."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("DELETE FROM bans WHERE until < ?", (now - memory,))
            lifted = [
                _ban(r)
                for r in self._conn.execute(
                    "UPDATE bans SET lifted = 1 WHERE lifted = 0 AND until <= ? RETURNING *",
                    (now,),
                )
            ]
            rows = [_ban(r) for r in self._conn.execute("SELECT * FROM bans ORDER BY address")]
        return rows, lifted

    def list(self) -> list[Ban]:
        return [_ban(r) for r in self._conn.execute("SELECT * FROM bans ORDER BY address")]

    def active(self, now: float) -> int:
        """How many addresses are banned at ``now``."""
        row = self._conn.execute("SELECT COUNT(*) FROM bans WHERE until > ?", (now,)).fetchone()
        return int(row[0])

    def remove(self, address: str) -> Ban | None:
        """Delete the ban of ``address``; the ban it was, or None."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            rows = self._conn.execute(
                "DELETE FROM bans WHERE address = ? RETURNING *", (address,)
            ).fetchall()
        return _ban(rows[0]) if rows else None

    def journal(self, event: Event) -> None:
        """Journal ``event`` (a ban or unban by ``sftpgate bans``) in its own transaction."""
        record_batch(self._conn, [event])
