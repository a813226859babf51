"""Retention on the SQLite journal: ``sftpgate journal prune`` (``journal.retention``).

Rows go in short transactions of at most ``batch`` rows each, oldest tables'
dependants first (jobs, then the uploads no job needs, then the operations no
upload needs, then sessions with nothing left), so the journal writer waits
for one short batch at most and a crash leaves a consistent journal.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..storage.ports import PruneReport, StorageUnavailable
from .store import connect, transient

# Each statement deletes one batch of rows older than :before. The newest row of a
# numbered table is always kept: ids are max(id) + 1, so emptying a table would
# hand out old ids again (and `sftpgate journal --follow` would miss rows).
_BATCHES: tuple[tuple[str, str], ...] = (
    (
        "jobs",
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs"
        " WHERE state NOT IN ('queued', 'running')"
        " AND COALESCE(finished_at, updated_at) < :before"
        " AND id < (SELECT max(id) FROM jobs) LIMIT :batch)",
    ),
    (
        "uploads",
        "DELETE FROM uploads WHERE id IN (SELECT u.id FROM uploads AS u WHERE u.ts < :before"
        " AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.upload_id = u.id)"
        " AND u.id < (SELECT max(id) FROM uploads) LIMIT :batch)",
    ),
    (
        "operations",
        "DELETE FROM operations WHERE id IN (SELECT o.id FROM operations AS o"
        " WHERE o.ts < :before"
        " AND NOT EXISTS (SELECT 1 FROM uploads AS u WHERE u.operation_id = o.id)"
        " AND o.id < (SELECT max(id) FROM operations) LIMIT :batch)",
    ),
    (
        "sessions",
        "DELETE FROM sessions WHERE id IN (SELECT s.id FROM sessions AS s"
        " WHERE s.started_at < :before AND COALESCE(s.ended_at, s.started_at) < :before"
        " AND NOT EXISTS (SELECT 1 FROM operations AS o WHERE o.session_id = s.id)"
        " AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.session_id = s.id) LIMIT :batch)",
    ),
    (
        "email_log",
        "DELETE FROM email_log WHERE id IN (SELECT id FROM email_log WHERE sent_at < :before"
        " AND id < (SELECT max(id) FROM email_log) LIMIT :batch)",
    ),
    (
        "job_turns",
        "DELETE FROM job_turns WHERE login IN (SELECT login FROM job_turns"
        " WHERE last_turn < :before LIMIT :batch)",
    ),
)


class SQLitePruner:
    """The :class:`~sftpgate.storage.ports.JournalPruner` of the SQLite journal.

    ``event_keys`` (keys of events a tap may deliver twice) carry no time and
    are kept; bans are pruned by the defender itself (``defender.ban_memory``).
    """

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self._conn = connect(path, synchronous=synchronous)

    def prune(self, before: float, *, batch: int = 5000) -> PruneReport:
        if batch < 1:
            raise ValueError(f"batch must be 1 or more, got {batch}")
        removed: dict[str, int] = {}
        params = {"before": before, "batch": batch}
        try:
            for table, sql in _BATCHES:
                total = 0
                while True:
                    self._conn.execute("BEGIN IMMEDIATE")
                    try:
                        count = self._conn.execute(sql, params).rowcount
                    except BaseException:
                        self._conn.execute("ROLLBACK")
                        raise
                    self._conn.execute("COMMIT")
                    total += count
                    if count < batch:
                        break
                removed[table] = total
        except sqlite3.Error as exc:
            if transient(exc):
                raise StorageUnavailable(f"journal {self.path}: {exc}") from exc
            raise
        return PruneReport(removed)

    def close(self) -> None:
        self._conn.close()
