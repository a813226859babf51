"""The admin API's tables and queries on the SQLite journal (storage port ``AdminStore``).
All its SQL is here; ``storage/postgres/admin.py`` says the same in PostgreSQL's words."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import NotFoundError
from ..events import Event, Op, SessionInfo, current_node
from ..storage.ports import Conflict, ReplayFile
from .store import connect, record_batch

LIVE_SESSIONS = (
    "SELECT s.*, d.requested_at AS disconnect_requested_at FROM sessions s"
    " LEFT JOIN disconnect_requests d ON d.session_id = s.id AND d.done_at IS NULL"
    " WHERE s.result = 'ok' AND s.ended_at IS NULL"
)


def replay_event(upload: dict[str, Any], found: ReplayFile) -> Event:
    """The event a replayed upload's job is inserted from (both backends): the upload's
    session and login, the file as found now."""
    session = SessionInfo(
        id=upload["session_id"],
        remote_addr="",
        remote_port=0,
        login=upload["login"],
        node=current_node(),
    )
    return Event(Op.CLOSE, session, path=upload["path"], device=found.device, inode=found.inode)


def check_replayable(upload: dict[str, Any] | None, upload_id: int, live: int | None) -> None:
    """Raise NotFoundError or Conflict unless upload ``upload_id`` may be replayed."""
    if upload is None:
        raise NotFoundError(f"no upload {upload_id}")
    if upload["state"] != "complete":
        raise Conflict(f"upload {upload_id} is {upload['state']}: only a complete upload replays")
    if live is not None:
        raise Conflict(f"upload {upload_id} already has job {live} queued or running")


class SQLiteAdminStore:
    """:class:`~sftpgate.storage.ports.AdminStore` on the SQLite journal. Blocking: a thread;
    one thread at a time."""

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._conn = connect(path, synchronous=synchronous)

    def close(self) -> None:
        self._conn.close()

    def journal(self, events: Sequence[Event]) -> None:
        if events:
            record_batch(self._conn, events)

    def sessions(
        self, *, node: str | None = None, login: str | None = None
    ) -> list[dict[str, Any]]:
        sql, params = LIVE_SESSIONS, []
        for column, value in (("node", node), ("login", login)):
            if value is not None:
                sql += f" AND s.{column} = ?"
                params.append(value)
        rows = self._conn.execute(sql + " ORDER BY s.started_at, s.id", params).fetchall()
        return [dict(r) for r in rows]

    def request_disconnect(self, session_id: str, by: str, now: float) -> dict[str, Any]:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute(LIVE_SESSIONS + " AND s.id = ?", (session_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no live session {session_id}")
            self._conn.execute(
                "INSERT INTO disconnect_requests (session_id, requested_at, requested_by)"
                " VALUES (?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET"
                " requested_at = excluded.requested_at, requested_by = excluded.requested_by,"
                " done_at = NULL WHERE disconnect_requests.done_at IS NOT NULL",
                (session_id, now, by),
            )
            row = self._conn.execute(LIVE_SESSIONS + " AND s.id = ?", (session_id,)).fetchone()
        return dict(row)

    def disconnects(self, now: float, expire: float) -> list[str]:
        # Read first, delete only when there is something old: most polls find an empty table
        # and must not take the write lock from the journal writer.
        rows = self._conn.execute(
            "SELECT session_id, requested_at FROM disconnect_requests WHERE done_at IS NULL"
        ).fetchall()
        if any(r["requested_at"] < now - expire for r in rows):
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(
                    "DELETE FROM disconnect_requests WHERE requested_at < ?", (now - expire,)
                )
        return [r["session_id"] for r in rows if r["requested_at"] >= now - expire]

    def disconnected(self, session_id: str, now: float) -> str | None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute(
                "UPDATE disconnect_requests SET done_at = ? WHERE session_id = ?"
                " AND done_at IS NULL RETURNING requested_by",
                (now, session_id),
            ).fetchone()
        return None if row is None else str(row["requested_by"])

    def upload(self, upload_id: int) -> dict[str, Any] | None:
        return _upload(self._conn, upload_id)

    def replay(self, upload_id: int, found: ReplayFile, max_attempts: int) -> int:
        from ..jobs.store import enqueue

        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            upload = _upload(self._conn, upload_id)
            live = self._conn.execute(
                "SELECT id FROM jobs WHERE upload_id = ? AND state IN ('queued', 'running')"
                " ORDER BY id LIMIT 1",
                (upload_id,),
            ).fetchone()
            check_replayable(upload, upload_id, None if live is None else int(live["id"]))
            assert upload is not None
            event = replay_event(upload, found)
            job_id = enqueue(self._conn, upload_id, upload["path"], event, max_attempts)
            self._conn.execute(
                "UPDATE jobs SET node = ?, data = json_set(data, '$.replay', json('true'))"
                " WHERE id = ?",
                (event.session.node, job_id),
            )
        return job_id


def _upload(conn: sqlite3.Connection, upload_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT u.*, (SELECT data FROM jobs WHERE upload_id = u.id ORDER BY id DESC LIMIT 1)"
        " AS job_data FROM uploads u WHERE u.id = ?",
        (upload_id,),
    ).fetchone()
    return None if row is None else with_file(dict(row))


def with_file(row: dict[str, Any]) -> dict[str, Any]:
    """An uploads row with its newest job's ``device``/``inode`` instead of that job's data."""
    data = json.loads(row.pop("job_data") or "{}")
    row["device"], row["inode"] = data.get("device"), data.get("inode")
    return row
