"""The registry of gateway processes on the SQLite journal (storage port ``GatewayRegistry``;
see journal/sweep.py). All its SQL is here; ``storage/postgres/gateways.py`` says the same in
PostgreSQL's words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..storage.ports import GatewayRow
from .store import _record_all, connect
from .sweep import ending_events, open_uploads

# Write opens that succeeded and every close, of one session, in order (sweep.open_uploads).
OPENS_AND_CLOSES = (
    "SELECT op, path FROM operations WHERE session_id = ? AND ("
    "(op = 'open' AND status = 'ok' AND flags & 2 != 0) OR op = 'close')"  # 2: FXF_WRITE
    " ORDER BY id"
)


def gateway_row(row: Any) -> GatewayRow:
    """A ``gateways`` row (sqlite3.Row or dict) as a GatewayRow."""
    return GatewayRow(
        str(row["id"]),
        str(row["node"]),
        int(row["pid"]),
        str(row["boot_id"]),
        int(row["pid_start"]),
        float(row["started_at"]),
        float(row["heartbeat_at"]),
    )


class SQLiteGatewayRegistry:
    """:class:`~sftpgate.storage.ports.GatewayRegistry` on the SQLite journal. Blocking: a
    thread; one thread at a time."""

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        self._conn = connect(path, synchronous=synchronous)

    def close(self) -> None:
        self._conn.close()

    def register(self, row: GatewayRow) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT OR REPLACE INTO gateways (id, node, pid, boot_id, pid_start, started_at,"
                " heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.id, row.node, row.pid, row.boot, row.start, row.started_at, row.heartbeat_at),
            )

    def heartbeat(self, gateway_id: str, now: float) -> bool:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            done = self._conn.execute(
                "UPDATE gateways SET heartbeat_at = ? WHERE id = ?", (now, gateway_id)
            )
        return done.rowcount == 1

    def gateways(self) -> list[GatewayRow]:
        rows = self._conn.execute(
            "SELECT id, node, pid, boot_id, pid_start, started_at, heartbeat_at FROM gateways"
            " ORDER BY started_at, id"
        ).fetchall()
        return [gateway_row(r) for r in rows]

    def end_process(self, row: GatewayRow, now: float, why: str, upload_why: str) -> list[str]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            claimed = conn.execute(
                "DELETE FROM gateways WHERE id = ? AND heartbeat_at = ?",
                (row.id, row.heartbeat_at),
            ).rowcount
            ended: list[str] = []
            if claimed:
                # The sessions claimed by a conditional UPDATE: one still open is ended once.
                sessions = sorted(
                    (
                        dict(s)
                        for s in conn.execute(
                            "UPDATE sessions SET ended_at = ? WHERE process = ?"
                            " AND ended_at IS NULL RETURNING *",
                            (now, row.id),
                        ).fetchall()
                    ),
                    key=lambda s: (s["started_at"], s["id"]),
                )
                events = []
                for session in sessions:
                    opens = [dict(r) for r in conn.execute(OPENS_AND_CLOSES, (session["id"],))]
                    events.extend(
                        ending_events(session, open_uploads(opens), now, row, why, upload_why)
                    )
                    ended.append(str(session["id"]))
                _record_all(conn, events, None)
                conn.executemany(
                    "UPDATE disconnect_requests SET done_at = ? WHERE session_id = ?"
                    " AND done_at IS NULL",
                    [(now, s) for s in ended],
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return ended

    def retire(self, gateway_id: str) -> bool:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            done = self._conn.execute(
                "DELETE FROM gateways WHERE id = ? AND NOT EXISTS (SELECT 1 FROM sessions"
                " WHERE process = ? AND ended_at IS NULL)",
                (gateway_id, gateway_id),
            )
        return done.rowcount == 1
