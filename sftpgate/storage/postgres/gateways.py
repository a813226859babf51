"""The registry of gateway processes on PostgreSQL (journal/gateways.py in PostgreSQL's words;
see journal/sweep.py). Thread-safe: every call takes a pooled connection."""

from __future__ import annotations

from ...journal.gateways import gateway_row
from ...journal.sweep import ending_events, open_uploads
from ..ports import GatewayRow
from .journal import _record
from .pool import PoolPort, unavailable_as_storage

OPENS_AND_CLOSES = (
    "SELECT op, path FROM operations WHERE session_id = %s AND ("
    "(op = 'open' AND status = 'ok' AND flags & 2 <> 0) OR op = 'close')"  # 2: FXF_WRITE
    " ORDER BY id"
)


class PgGatewayRegistry(PoolPort):
    """:class:`~sftpgate.storage.ports.GatewayRegistry` on PostgreSQL."""

    def register(self, row: GatewayRow) -> None:
        with unavailable_as_storage(), self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO gateways (id, node, pid, boot_id, pid_start, started_at, heartbeat_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (row.id, row.node, row.pid, row.boot, row.start, row.started_at, row.heartbeat_at),
            )

    def heartbeat(self, gateway_id: str, now: float) -> bool:
        with unavailable_as_storage(), self._pool.connection() as conn:
            done = conn.execute(
                "UPDATE gateways SET heartbeat_at = %s WHERE id = %s", (now, gateway_id)
            )
        return done.rowcount == 1

    def gateways(self) -> list[GatewayRow]:
        with unavailable_as_storage(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT id, node, pid, boot_id, pid_start, started_at, heartbeat_at FROM gateways"
                " ORDER BY started_at, id"
            ).fetchall()
        return [gateway_row(r) for r in rows]

    def end_process(self, row: GatewayRow, now: float, why: str, upload_why: str) -> list[str]:
        with unavailable_as_storage(), self._pool.connection() as conn, conn.transaction():
            # The row's lock, held to commit: a second sweeper's DELETE waits, then finds none.
            claimed = conn.execute(
                "DELETE FROM gateways WHERE id = %s AND heartbeat_at = %s",
                (row.id, row.heartbeat_at),
            ).rowcount
            if not claimed:
                return []
            sessions = sorted(
                (
                    dict(s)
                    for s in conn.execute(
                        "UPDATE sessions SET ended_at = %s WHERE process = %s"
                        " AND ended_at IS NULL RETURNING *",
                        (now, row.id),
                    ).fetchall()
                ),
                key=lambda s: (s["started_at"], s["id"]),
            )
            events = []
            for session in sessions:
                opens = conn.execute(OPENS_AND_CLOSES, (session["id"],)).fetchall()
                events.extend(
                    ending_events(session, open_uploads(opens), now, row, why, upload_why)
                )
            _record(conn, events, None)
            ended = [str(s["id"]) for s in sessions]
            if ended:
                conn.execute(
                    "UPDATE disconnect_requests SET done_at = %s WHERE session_id = ANY(%s)"
                    " AND done_at IS NULL",
                    (now, ended),
                )
        return ended

    def retire(self, gateway_id: str) -> bool:
        with unavailable_as_storage(), self._pool.connection() as conn:
            done = conn.execute(
                "DELETE FROM gateways WHERE id = %s AND NOT EXISTS (SELECT 1 FROM sessions"
                " WHERE process = %s AND ended_at IS NULL)",
                (gateway_id, gateway_id),
            )
        return done.rowcount == 1
