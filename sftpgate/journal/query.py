"""Read side of the journal: filters, time parsing and the SQL behind ``sftpgate journal``.

Nothing here prints. The SQL compares indexed columns directly (never through a
function), so SQLite can answer from the indexes in :mod:`.store` even on
millions of rows: ``ts``, ``(login, ts)``, ``(op, ts)``, ``session_id`` and the
rowid for ``--follow`` (see :func:`_index_drives` for how one is chosen).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import NothingThere
from ..events import STATUS_OK, Op
from ..storage.ports import JournalCursor, SchemaBehind, StorageUnavailable
from .store import SCHEMA_VERSION, connect, schema_version

# Columns of a row returned by fetch(): the operations table, then what is
# joined from sessions. fetch_transfers() adds ``upload_state``.
OPERATION_COLUMNS = (
    "id",
    "ts",
    "session_id",
    "login",
    "remote_addr",
    "op",
    "path",
    "path2",
    "flags",
    "mode",
    "attrs",
    "bytes_read",
    "bytes_written",
    "duration_ms",
    "status",
    "message",
)
SESSION_COLUMNS = ("remote_port", "client_version", "auth_method", "node")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)

_SELECT = (
    "SELECT "
    + ", ".join(f"o.{name}" for name in OPERATION_COLUMNS)
    + ", "
    + ", ".join(f"s.{name}" for name in SESSION_COLUMNS)
)
_FROM = " FROM operations AS o LEFT JOIN sessions AS s ON s.id = o.session_id"
# Through the uploads_operation index (schema 5).
_TRANSFER_JOIN = " LEFT JOIN uploads AS u ON u.operation_id = o.id"


@dataclass(frozen=True, slots=True)
class JournalFilter:
    """What to select from the journal; every field that is set must match (AND).

    ``user`` matches the login exactly; ``since`` (inclusive) and ``until``
    (exclusive) are unix times; ``ops`` are :class:`~sftpgate.events.Op`
    values (any of them); ``path_glob`` is an SQLite GLOB (case-sensitive,
    ``*`` also matches ``/``) tried on ``path`` and on ``path2``; ``session``
    is a session id; ``failed_only`` keeps rows whose status is not ``ok``;
    ``limit`` keeps the *last* N matching rows (still returned oldest first);
    ``after_id`` keeps rows with an id greater than it (for following);
    ``node`` is the host the session was on (rows without a session row
    never match it).
    """

    user: str | None = None
    since: float | None = None
    until: float | None = None
    ops: tuple[str, ...] = ()
    path_glob: str | None = None
    session: str | None = None
    failed_only: bool = False
    limit: int | None = None
    after_id: int | None = None
    node: str | None = None


def parse_time(text: str, now: float | None = None) -> float:
    """Turn ``--since``/``--until`` text into a unix time.

    Accepts a duration before ``now`` (``90s``, ``15m``, ``1h``, ``2d``, ``1w``;
    ``now`` defaults to the current time) or an ISO 8601 date/time
    (``2026-11-23``, ``2026-11-23T10:00``, ``2026-11-23 10:00:00+01:00``,
    ``...Z``); a time without a zone is local time.

    Raises ``ValueError`` with a message saying what is accepted.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty time; use e.g. 15m, 2h, 1d or 2026-11-23T10:00")
    match = _RELATIVE_RE.match(stripped)
    if match:
        amount = float(match.group(1)) * _UNITS[match.group(2).lower()]
        return (time.time() if now is None else now) - amount
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r}; use a duration before now (90s, 15m, 1h, 2d, 1w) "
            "or ISO 8601 (2026-11-23T10:00, optionally with a zone like +01:00 or Z)"
        ) from None
    # A naive datetime's timestamp() is taken in local time, which is what we promise.
    return moment.timestamp()


def _index_drives(flt: JournalFilter, *, transfers: bool) -> bool:
    """Say whether an index on a filter column should drive the query (else the rowid).

    Without statistics SQLite likes to walk the table in rowid order to skip a
    sort, even when the ts, (login, ts), (op, ts) or session index would find a
    few matches at once; and when following, it picks those indexes over the
    rowid range, which holds only the few new rows. So we choose, and hide the
    loser from the planner with a unary ``+`` (which is not a function call).
    """
    if flt.after_id is not None:
        return False
    if (
        flt.user is not None
        or flt.since is not None
        or flt.until is not None
        or flt.session is not None
    ):
        return True
    if transfers:
        # Transfers are common closes: with a limit, walking back from the
        # newest row stops early; without one, the (op, ts) index is smaller.
        return flt.limit is None
    return bool(flt.ops)


def _build(
    flt: JournalFilter, select: str, joins: str, extra: tuple[str, ...], *, transfers: bool
) -> tuple[str, tuple[Any, ...]]:
    if flt.limit is not None and flt.limit < 0:
        raise ValueError(f"limit must be 0 or more, got {flt.limit}")
    by_index = _index_drives(flt, transfers=transfers)
    col = "o." if by_index else "+o."  # for the indexed columns login, ts, op, session_id
    clauses: list[str] = []
    params: list[Any] = []
    if flt.user is not None:
        clauses.append(f"{col}login = ?")
        params.append(flt.user)
    if flt.since is not None:
        clauses.append(f"{col}ts >= ?")
        params.append(flt.since)
    if flt.until is not None:
        clauses.append(f"{col}ts < ?")
        params.append(flt.until)
    if flt.ops:
        clauses.append(f"{col}op IN ({', '.join('?' for _ in flt.ops)})")
        params.extend(flt.ops)
    if flt.path_glob is not None:
        clauses.append("(o.path GLOB ? OR o.path2 GLOB ?)")
        params.extend((flt.path_glob, flt.path_glob))
    if flt.session is not None:
        clauses.append(f"{col}session_id = ?")
        params.append(flt.session)
    if flt.node is not None:
        clauses.append("s.node = ?")
        params.append(flt.node)
    if flt.failed_only:
        clauses.append("o.status != ?")
        params.append(STATUS_OK)
    if flt.after_id is not None:
        clauses.append("o.id > ?")
        params.append(flt.after_id)
    clauses.extend(extra)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    order = "+o.id" if by_index else "o.id"
    if flt.limit is None:
        return f"{select}{joins}{where} ORDER BY {order}", tuple(params)
    # The last N rows, newest first, then put back in id order.
    inner = f"{select}{joins}{where} ORDER BY {order} DESC LIMIT ?"
    # Only constant SQL text is pasted together; every value is a parameter.
    return f"SELECT * FROM ({inner}) ORDER BY id", (*params, flt.limit)  # noqa: S608


def build_query(flt: JournalFilter) -> tuple[str, tuple[Any, ...]]:
    """Return ``(sql, params)`` selecting operations that match ``flt``, by id ascending.

    The columns are :data:`OPERATION_COLUMNS` then :data:`SESSION_COLUMNS`
    (``NULL`` when the session has no row). Raises ``ValueError`` for a
    negative limit.
    """
    return _build(flt, _SELECT, _FROM, (), transfers=False)


def build_transfers_query(flt: JournalFilter) -> tuple[str, tuple[Any, ...]]:
    """Return ``(sql, params)`` for the transfers of :func:`fetch_transfers`.

    ``flt.ops`` is ignored: a transfer is always a ``close``. Raises
    ``ValueError`` for a negative limit.
    """
    return _build(
        replace(flt, ops=(Op.CLOSE.value,)),
        f"{_SELECT}, u.state AS upload_state",
        _FROM + _TRANSFER_JOIN,
        ("(o.bytes_read > 0 OR o.bytes_written > 0)",),
        transfers=True,
    )


def _rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> Iterator[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [column[0] for column in cursor.description]
    try:
        for values in cursor:
            yield dict(zip(names, values, strict=True))
    finally:
        cursor.close()


def iter_operations(conn: sqlite3.Connection, flt: JournalFilter) -> Iterator[dict[str, Any]]:
    """Like :func:`fetch`, one row at a time (for output that must not hold a million rows)."""
    return _rows(conn, *build_query(flt))


def iter_transfers(conn: sqlite3.Connection, flt: JournalFilter) -> Iterator[dict[str, Any]]:
    """Like :func:`fetch_transfers`, one row at a time."""
    return _rows(conn, *build_transfers_query(flt))


def fetch(conn: sqlite3.Connection, flt: JournalFilter) -> list[dict[str, Any]]:
    """Return the operations matching ``flt`` as dicts, oldest (lowest id) first.

    Keys are the operations columns plus ``remote_port``, ``client_version``
    and ``auth_method`` from the session. Works whatever the connection's
    row factory is. Raises ``sqlite3.Error`` (e.g. no journal schema yet) and
    ``ValueError`` for a negative limit.
    """
    return list(iter_operations(conn, flt))


def fetch_transfers(conn: sqlite3.Connection, flt: JournalFilter) -> list[dict[str, Any]]:
    """Return file transfers (``close`` operations that read or wrote bytes), oldest first.

    Each row is a :func:`fetch` row plus ``upload_state``: ``complete``,
    ``incomplete`` (the session ended with the file open) or ``None`` for a
    download. ``flt.ops`` is ignored. Raises like :func:`fetch`.
    """
    return list(iter_transfers(conn, flt))


def max_id(conn: sqlite3.Connection) -> int:
    """Return the highest operation id in the journal, 0 when it is empty."""
    value = conn.execute("SELECT MAX(id) FROM operations").fetchone()[0]
    return int(value or 0)


class SQLiteReader:
    """The :class:`~sftpgate.storage.ports.JournalReader` on the SQLite journal (read-only).

    SQLite has one writer at a time and every writer numbers its operations
    inside its write lock, so ids are commit order: the cursor is the highest
    id seen. The connection opens at the first scan.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if not self.path.exists():
            raise NothingThere(
                f"journal {self.path} does not exist yet (nothing journaled so far, "
                "or journal.path in the config points elsewhere)"
            )
        try:
            conn = connect(self.path, readonly=True)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot read journal {self.path}: {exc}") from exc
        try:
            version = schema_version(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StorageUnavailable(f"cannot read journal {self.path}: {exc}") from exc
        if version < SCHEMA_VERSION:
            conn.close()
            if version == 0:  # the writer makes the file a moment before the tables
                raise NothingThere(f"journal {self.path} has no tables yet")
            raise SchemaBehind(
                f"journal {self.path} has schema version {version}, this sftpgate reads "
                f"{SCHEMA_VERSION}: run `sftpgate db migrate -c <config>`"
            )
        self._conn = conn
        return conn

    def scan(
        self,
        flt: JournalFilter,
        emit: Callable[[dict[str, Any]], None],
        *,
        transfers: bool = False,
        after: JournalCursor | None = None,
    ) -> JournalCursor:
        conn = self._open()
        start = int(after) if after else 0
        flt = replace(flt, after_id=start if after else None)
        sql, params = build_transfers_query(flt) if transfers else build_query(flt)
        try:
            # One read transaction: the rows and the high-water mark share a snapshot.
            conn.execute("BEGIN")
            try:
                for row in _rows(conn, sql, params):
                    emit(row)
                top = max_id(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Reading, nothing is wrong with a record: whatever failed, failed to read.
            raise StorageUnavailable(f"cannot read journal {self.path}: {exc}") from exc
        return str(max(start, top))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
