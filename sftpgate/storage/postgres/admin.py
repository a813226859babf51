"""The admin API's queries on PostgreSQL (journal/admin.py in PostgreSQL's words).
Thread-safe: every call takes a pooled connection."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ...errors import NotFoundError
from ...events import Event
from ...journal.admin import check_replayable, replay_event, with_file
from ..ports import JobSpec, ReplayFile
from .journal import PgJournalStore, enqueue
from .pool import Conn, PoolPort, unavailable_as_storage

LIVE_SESSIONS = (
    "SELECT s.*, d.requested_at AS disconnect_requested_at FROM sessions s"
    " LEFT JOIN disconnect_requests d ON d.session_id = s.id AND d.done_at IS NULL"
    " WHERE s.result = 'ok' AND s.ended_at IS NULL"
)


class PgAdminStore(PoolPort):
    """:class:`~sftpgate.storage.ports.AdminStore` on PostgreSQL."""

    def journal(self, events: Sequence[Event]) -> None:
        if events:
            PgJournalStore(self._pool).record_batch(events)

    def sessions(
        self, *, node: str | None = None, login: str | None = None
    ) -> list[dict[str, Any]]:
        sql, params = LIVE_SESSIONS, []
        for column, value in (("node", node), ("login", login)):
            if value is not None:
                sql += f" AND s.{column} = %s"
                params.append(value)
        with unavailable_as_storage(), self._pool.connection() as conn:
            rows = conn.execute(sql + " ORDER BY s.started_at, s.id", params).fetchall()
        return [dict(r) for r in rows]

    def request_disconnect(self, session_id: str, by: str, now: float) -> dict[str, Any]:
        with unavailable_as_storage(), self._pool.connection() as conn, conn.transaction():
            if conn.execute(LIVE_SESSIONS + " AND s.id = %s", (session_id,)).fetchone() is None:
                raise NotFoundError(f"no live session {session_id}")
            conn.execute(
                "INSERT INTO disconnect_requests (session_id, requested_at, requested_by)"
                " VALUES (%s, %s, %s) ON CONFLICT (session_id) DO UPDATE SET"
                " requested_at = excluded.requested_at, requested_by = excluded.requested_by,"
                " done_at = NULL WHERE disconnect_requests.done_at IS NOT NULL",
                (session_id, now, by),
            )
            row = conn.execute(LIVE_SESSIONS + " AND s.id = %s", (session_id,)).fetchone()
        assert row is not None
        return dict(row)

    def disconnects(self, now: float, expire: float) -> list[str]:
        with unavailable_as_storage(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT session_id, requested_at FROM disconnect_requests WHERE done_at IS NULL"
            ).fetchall()
            if any(r["requested_at"] < now - expire for r in rows):
                conn.execute(
                    "DELETE FROM disconnect_requests WHERE requested_at < %s", (now - expire,)
                )
        return [r["session_id"] for r in rows if r["requested_at"] >= now - expire]

    def disconnected(self, session_id: str, now: float) -> str | None:
        with unavailable_as_storage(), self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE disconnect_requests SET done_at = %s WHERE session_id = %s"
                " AND done_at IS NULL RETURNING requested_by",
                (now, session_id),
            ).fetchone()
        return None if row is None else str(row["requested_by"])

    def upload(self, upload_id: int) -> dict[str, Any] | None:
        with unavailable_as_storage(), self._pool.connection() as conn:
            return _upload(conn, upload_id)

    def replay(self, upload_id: int, found: ReplayFile, max_attempts: int) -> int:
        with unavailable_as_storage(), self._pool.connection() as conn, conn.transaction():
            # The upload's row locked: two replays of it at once queue one job.
            conn.execute("SELECT id FROM uploads WHERE id = %s FOR UPDATE", (upload_id,))
            upload = _upload(conn, upload_id)
            live = conn.execute(
                "SELECT id FROM jobs WHERE upload_id = %s AND state IN ('queued', 'running')"
                " ORDER BY id LIMIT 1",
                (upload_id,),
            ).fetchone()
            check_replayable(upload, upload_id, None if live is None else int(live["id"]))
            assert upload is not None
            event = replay_event(upload, found)
            job_id = enqueue(conn, upload_id, upload["path"], event, JobSpec(max_attempts))
            data = conn.execute("SELECT data FROM jobs WHERE id = %s", (job_id,)).fetchone()
            assert data is not None
            conn.execute(
                "UPDATE jobs SET data = %s WHERE id = %s",
                (json.dumps({**json.loads(data["data"]), "replay": True}), job_id),
            )
        return job_id


def _upload(conn: Conn, upload_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT u.*, (SELECT data FROM jobs WHERE upload_id = u.id ORDER BY id DESC LIMIT 1)"
        " AS job_data FROM uploads u WHERE u.id = %s",
        (upload_id,),
    ).fetchone()
    return None if row is None else with_file(dict(row))
