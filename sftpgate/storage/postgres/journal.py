"""The journal on PostgreSQL: record a batch with the jobs it starts, scan (query and follow),
prune. The SQL of SQLite's ``sftpgate/journal/store.py`` and ``query.py``, in PostgreSQL's words.

Commit order: a batch takes its operation and upload ids by updating its rows
of ``journal_ids`` (schema.py). That row lock is held until the batch commits,
so a second batch waits for the first to be visible before it numbers its
rows: ids are commit-ordered, and a cursor "highest id seen" skips nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from psycopg import IsolationLevel

from ...events import STATUS_OK, Event, Op, UploadState, current_process
from ...journal.query import OPERATION_COLUMNS, SESSION_COLUMNS, JournalFilter
from ..ports import BatchResult, JobRule, JobSpec, JournalCursor, PruneReport
from .pool import Conn, PoolPort, unavailable_as_storage

_SESSION_OPS = {Op.LOGIN, Op.LOGIN_FAILED, Op.LOGOUT}

_SESSION_UPSERT = """
INSERT INTO sessions (id, login, remote_addr, remote_port, client_version, auth_method,
                      result, node, process, started_at, ended_at)
VALUES (%(id)s, %(login)s, %(remote_addr)s, %(remote_port)s, %(client_version)s,
        %(auth_method)s, %(result)s, %(node)s, %(process)s, %(started_at)s, %(ended_at)s)
ON CONFLICT (id) DO UPDATE SET
    login = COALESCE(excluded.login, sessions.login),
    client_version = COALESCE(excluded.client_version, sessions.client_version),
    auth_method = COALESCE(excluded.auth_method, sessions.auth_method),
    node = COALESCE(excluded.node, sessions.node),
    result = CASE WHEN sessions.result = 'ok' THEN 'ok' ELSE excluded.result END,
    ended_at = COALESCE(excluded.ended_at, sessions.ended_at)
"""

_OPERATION_INSERT = """
INSERT INTO operations (id, ts, session_id, login, remote_addr, op, path, path2, flags, mode,
                        attrs, bytes_read, bytes_written, duration_ms, status, message)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""

_UPLOAD_INSERT = """
INSERT INTO uploads (id, ts, session_id, login, path, bytes, state, operation_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"""

# Takes n ids of a series and its row lock (held to commit): the commit-order guarantee.
_TAKE_IDS = "UPDATE journal_ids SET last = last + %s WHERE name = %s RETURNING last"


def take_ids(conn: Conn, series: str, count: int) -> int:
    """Reserve ``count`` ids of ``series`` inside the caller's transaction; the first one."""
    row = conn.execute(_TAKE_IDS, (count, series)).fetchone()
    assert row is not None
    return int(row["last"]) - count + 1


def operation_row(event: Event) -> tuple[object, ...]:
    """An operations row of ``event``, without its id."""
    s = event.session
    return (
        event.time,
        s.id,
        s.login,
        s.remote_addr,
        event.op.value,
        event.path,
        event.path2,
        event.flags,
        event.mode,
        json.dumps(event.attrs, sort_keys=True) if event.attrs is not None else None,
        event.bytes_read,
        event.bytes_written,
        round(event.duration * 1000, 3) if event.duration is not None else None,
        event.status,
        event.message,
    )


def insert_operations(conn: Conn, rows: Sequence[tuple[object, ...]]) -> list[int]:
    """Journal operations ``rows`` (:func:`operation_row`) with ids in commit order; the ids.

    Every writer of the operations table goes through here: the id lock is what
    keeps ``--follow`` exact.
    """
    if not rows:
        return []
    first = take_ids(conn, "operations", len(rows))
    ids = list(range(first, first + len(rows)))
    with conn.cursor() as cursor:
        cursor.executemany(_OPERATION_INSERT, [(i, *row) for i, row in zip(ids, rows, strict=True)])
    return ids


def enqueue(conn: Conn, upload_id: int, path: str, event: Event, spec: JobSpec) -> int:
    """A queued job row for an upload, in the caller's transaction (jobs/store.py's enqueue)."""
    from ...jobs.model import EmailState, Outcome

    now = time.time()
    login = event.session.login or ""
    data: dict[str, Any] = {}
    if event.device is not None and event.inode is not None:
        data = {"device": event.device, "inode": event.inode}
    outcome: str | None = None
    email_state = EmailState.NONE.value
    if spec.queue_cap is not None:
        row = conn.execute(
            "SELECT count(*) AS n FROM jobs WHERE login = %s AND state IN ('queued', 'running')"
            " AND outcome IS NULL",
            (login,),
        ).fetchone()
        waiting = int(row["n"]) if row else 0
        if waiting >= spec.queue_cap:
            outcome = Outcome.REFUSED.value
            data["refused"] = (
                f"not converted: {waiting} of your uploads are already waiting (at most "
                f"{spec.queue_cap}); upload it again once they are done"
            )
            told = conn.execute(
                "SELECT 1 FROM jobs WHERE login = %(l)s AND outcome = 'refused' AND id > COALESCE("
                " (SELECT max(id) FROM jobs WHERE login = %(l)s"
                "  AND (outcome IS NULL OR outcome != 'refused')), 0) LIMIT 1",
                {"l": login},
            ).fetchone()
            if told is not None:
                email_state = EmailState.SKIPPED.value
    row = conn.execute(
        "INSERT INTO jobs (upload_id, session_id, login, path, state, outcome, max_attempts,"
        " next_run_at, created_at, updated_at, email_state, data, node)"
        " VALUES (%s, %s, %s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            upload_id,
            event.session.id,
            login,
            path,
            outcome,
            spec.max_attempts,
            now,
            now,
            now,
            email_state,
            json.dumps(data),
            getattr(event.session, "node", None),
        ),
    ).fetchone()
    assert row is not None
    return int(row["id"])


class PgJournalStore(PoolPort):
    """:class:`~sftpgate.storage.ports.JournalStore` on PostgreSQL. Thread-safe (a pool)."""

    def record_batch(self, events: Sequence[Event], rule: JobRule | None = None) -> BatchResult:
        with unavailable_as_storage(), self._pool.connection() as conn, conn.transaction():
            return _record(conn, events, rule)


def _record(conn: Conn, events: Sequence[Event], rule: JobRule | None) -> BatchResult:
    kept: list[Event] = []
    for event in events:
        if event.key is not None:
            seen = conn.execute(
                "INSERT INTO event_keys (key) VALUES (%s) ON CONFLICT DO NOTHING", (event.key,)
            )
            if seen.rowcount == 0:
                continue
        s = event.session
        if event.op in _SESSION_OPS:
            conn.execute(
                _SESSION_UPSERT,
                {
                    "id": s.id,
                    "login": s.login,
                    "remote_addr": s.remote_addr,
                    "remote_port": s.remote_port,
                    "client_version": s.client_version,
                    "auth_method": s.auth_method,
                    "result": "ok" if event.op is Op.LOGIN else "failed",
                    "node": getattr(s, "node", None),
                    "process": current_process(),
                    "started_at": s.started_at,
                    "ended_at": event.time if event.op is Op.LOGOUT else None,
                },
            )
        kept.append(event)
    op_ids = insert_operations(conn, [operation_row(e) for e in kept])
    uploads: list[tuple[int, str, Event]] = []  # (operation id, final path, event)
    for op_id, event in zip(op_ids, kept, strict=True):
        final = event.path2 if event.op is Op.RENAME else event.path
        if event.upload is not None and final is not None:
            uploads.append((op_id, final, event))
    jobs: list[int] = []
    if uploads:
        first = take_ids(conn, "uploads", len(uploads))
        rows = []
        for n, (op_id, final, event) in enumerate(uploads):
            state = UploadState(event.upload)
            rows.append(
                (
                    first + n,
                    event.time,
                    event.session.id,
                    event.session.login,
                    final,
                    event.bytes_written or 0,
                    state.value,
                    op_id,
                )
            )
        with conn.cursor() as cursor:
            cursor.executemany(_UPLOAD_INSERT, rows)
        if rule is not None:
            for n, (_, final, event) in enumerate(uploads):
                if UploadState(event.upload) is not UploadState.COMPLETE:
                    continue
                spec = rule(final, event)
                if spec is not None:
                    jobs.append(enqueue(conn, first + n, final, event, spec))
    return BatchResult(tuple(jobs))


# -- reading ------------------------------------------------------------------------

_SELECT = (
    "SELECT "
    + ", ".join(f"o.{name}" for name in OPERATION_COLUMNS)
    + ", "
    + ", ".join(f"s.{name}" for name in dict.fromkeys((*SESSION_COLUMNS, "node")))
)
_FROM = " FROM operations AS o LEFT JOIN sessions AS s ON s.id = o.session_id"
_TRANSFER_JOIN = " LEFT JOIN uploads AS u ON u.operation_id = o.id"


def glob_regex(glob: str) -> str:
    """SQLite's GLOB as a PostgreSQL regex: ``*`` any run (``/`` too), ``?`` one character,
    ``[...]`` a class (``[^...]`` negated); case-sensitive, anchored."""
    out = ["^"]
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := glob.find("]", i + 2)) != -1:
            body = glob[i + 1 : end]
            neg = body.startswith("^")
            body = body[1:] if neg else body
            body = body.replace("\\", "\\\\")
            out.append("[" + ("^" if neg else "") + body + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return "".join(out)


def _build(flt: JournalFilter, *, transfers: bool, after: int) -> tuple[str, dict[str, Any]]:
    if flt.limit is not None and flt.limit < 0:
        raise ValueError(f"limit must be 0 or more, got {flt.limit}")
    if transfers:
        flt = replace(flt, ops=(Op.CLOSE.value,))
    clauses = ["o.id > %(after)s", "o.id <= %(top)s"]
    params: dict[str, Any] = {"after": after}
    if flt.user is not None:
        clauses.append("o.login = %(user)s")
        params["user"] = flt.user
    if flt.since is not None:
        clauses.append("o.ts >= %(since)s")
        params["since"] = flt.since
    if flt.until is not None:
        clauses.append("o.ts < %(until)s")
        params["until"] = flt.until
    if flt.ops:
        clauses.append("o.op = ANY(%(ops)s)")
        params["ops"] = list(flt.ops)
    if flt.path_glob is not None:
        clauses.append("(o.path ~ %(glob)s OR o.path2 ~ %(glob)s)")
        params["glob"] = glob_regex(flt.path_glob)
    if flt.session is not None:
        clauses.append("o.session_id = %(session)s")
        params["session"] = flt.session
    if flt.node is not None:
        clauses.append("s.node = %(node)s")
        params["node"] = flt.node
    if flt.failed_only:
        clauses.append("o.status != %(ok)s")
        params["ok"] = STATUS_OK
    select, joins = _SELECT, _FROM
    if transfers:
        clauses.append("(o.bytes_read > 0 OR o.bytes_written > 0)")
        select, joins = f"{_SELECT}, u.state AS upload_state", _FROM + _TRANSFER_JOIN
    where = " WHERE " + " AND ".join(clauses)
    if flt.limit is None:
        return f"{select}{joins}{where} ORDER BY o.id", params
    params["limit"] = flt.limit
    inner = f"{select}{joins}{where} ORDER BY o.id DESC LIMIT %(limit)s"
    return f"SELECT * FROM ({inner}) AS last ORDER BY id", params  # noqa: S608


class PgJournalReader(PoolPort):
    """:class:`~sftpgate.storage.ports.JournalReader` on PostgreSQL.

    A scan reads the top id and the rows in one REPEATABLE READ snapshot: ids
    are commit-ordered (see the module), so every row with an id up to the top
    is in the snapshot, and the next scan starts right after it.
    """

    def scan(
        self,
        flt: JournalFilter,
        emit: Callable[[dict[str, Any]], None],
        *,
        transfers: bool = False,
        after: JournalCursor | None = None,
    ) -> JournalCursor:
        start = int(after) if after else 0
        with unavailable_as_storage(), self._pool.connection() as conn:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            try:
                with conn.transaction():
                    row = conn.execute("SELECT last FROM journal_ids WHERE name = 'operations'")
                    got = row.fetchone()
                    top = int(got["last"]) if got else 0
                    sql, params = _build(flt, transfers=transfers, after=start)
                    params["top"] = top
                    with conn.cursor(name="journal_scan") as cursor:
                        cursor.execute(sql.encode(), params)
                        for values in cursor:
                            emit(dict(values))
            finally:
                conn.isolation_level = None
        return str(max(top, start))


class PgJournalPruner(PoolPort):
    """:class:`~sftpgate.storage.ports.JournalPruner` on PostgreSQL."""

    def prune(self, before: float, *, batch: int = 5000) -> PruneReport:
        # (table, statement deleting at most %(batch)s rows); order matters: jobs first, so
        # their uploads, operations and sessions become free to go.
        steps = (
            (
                "jobs",
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state NOT IN"
                " ('queued', 'running') AND COALESCE(finished_at, updated_at) < %(before)s"
                " LIMIT %(batch)s)",
            ),
            (
                "uploads",
                "DELETE FROM uploads WHERE id IN (SELECT u.id FROM uploads AS u WHERE"
                " u.ts < %(before)s AND NOT EXISTS (SELECT 1 FROM jobs AS j"
                " WHERE j.upload_id = u.id) LIMIT %(batch)s)",
            ),
            (
                "operations",
                "DELETE FROM operations WHERE id IN (SELECT o.id FROM operations AS o WHERE"
                " o.ts < %(before)s AND NOT EXISTS (SELECT 1 FROM uploads AS u"
                " WHERE u.operation_id = o.id) LIMIT %(batch)s)",
            ),
            (
                "sessions",
                "DELETE FROM sessions WHERE id IN (SELECT s.id FROM sessions AS s WHERE"
                " COALESCE(s.ended_at, s.started_at) < %(before)s"
                " AND NOT EXISTS (SELECT 1 FROM operations AS o WHERE o.session_id = s.id)"
                " AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.session_id = s.id"
                "   AND j.state IN ('queued', 'running')) LIMIT %(batch)s)",
            ),
            (
                "email_log",
                "DELETE FROM email_log WHERE id IN (SELECT id FROM email_log"
                " WHERE sent_at < %(before)s LIMIT %(batch)s)",
            ),
            (
                "bans",
                "DELETE FROM bans WHERE address IN (SELECT address FROM bans"
                " WHERE until < %(before)s LIMIT %(batch)s)",
            ),
        )
        removed: dict[str, int] = {}
        params = {"before": before, "batch": batch}
        with unavailable_as_storage(), self._pool.connection() as conn:
            for table, sql in steps:
                total = 0
                while True:
                    with conn.transaction():
                        count = conn.execute(sql.encode(), params).rowcount
                    total += count
                    if count < batch:
                        break
                if total:
                    removed[table] = total
        return PruneReport(removed)
