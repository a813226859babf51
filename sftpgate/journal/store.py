"""SQLite journal: schema and the one connection helper.

Tables are constants; every access goes through :func:`connect`. WAL mode, so
readers (``sftpgate journal``) never block the writer.
"""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

from ..events import Event, Op, UploadState
from ..private import private_dir, private_file

SCHEMA_VERSION = 4

SESSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS sessions (
    id             TEXT PRIMARY KEY,
    login          TEXT,
    remote_addr    TEXT,
    remote_port    INTEGER,
    client_version TEXT,
    auth_method    TEXT,
    result         TEXT NOT NULL,        -- ok | failed
    started_at     REAL NOT NULL,
    ended_at       REAL
)"""

OPERATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS operations (
    id            INTEGER PRIMARY KEY,
    ts            REAL NOT NULL,         -- unix time, UTC
    session_id    TEXT NOT NULL,
    login         TEXT,
    remote_addr   TEXT,
    op            TEXT NOT NULL,
    path          TEXT,
    path2         TEXT,                  -- rename target, symlink target
    flags         INTEGER,               -- SFTP open pflags
    mode          INTEGER,               -- permission bits asked for
    attrs         TEXT,                  -- JSON: setstat attributes, listing size ...
    bytes_read    INTEGER,
    bytes_written INTEGER,
    duration_ms   REAL,
    status        TEXT NOT NULL,         -- ok | SFTP status name
    message       TEXT
)"""

UPLOADS_TABLE = """
CREATE TABLE IF NOT EXISTS uploads (
    id            INTEGER PRIMARY KEY,
    ts            REAL NOT NULL,
    session_id    TEXT NOT NULL,
    login         TEXT,
    path          TEXT NOT NULL,
    bytes         INTEGER NOT NULL,
    state         TEXT NOT NULL,         -- complete | incomplete
    operation_id  INTEGER REFERENCES operations(id)
)"""

JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY,
    upload_id        INTEGER REFERENCES uploads(id),
    session_id       TEXT NOT NULL,
    login            TEXT NOT NULL,
    path             TEXT NOT NULL,          -- the upload, as the user sees it
    state            TEXT NOT NULL,          -- queued running succeeded failed dead cancelled
    outcome          TEXT,                   -- converted | rejected
    step             TEXT,
    progress         REAL NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    next_run_at      REAL NOT NULL,
    lease_owner      TEXT,
    lease_expires_at REAL,
    pid              INTEGER,                -- ffmpeg, so a crash's leftover can be killed
    pid_marker       TEXT,                   -- a string its command line holds (pid reuse)
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    last_error       TEXT,
    email_state      TEXT NOT NULL DEFAULT 'none',  -- none sending sent failed uncertain
    steps            TEXT NOT NULL DEFAULT '{}',    -- JSON: step -> {started, finished, error}
    data             TEXT NOT NULL DEFAULT '{}'     -- JSON: facts, chosen output names
)"""

EVENT_KEYS_TABLE = """
CREATE TABLE IF NOT EXISTS event_keys (
    key TEXT PRIMARY KEY                    -- events that may be delivered twice
) WITHOUT ROWID"""

# Fair jobs: when each user last had a job taken, so workers serve users round-robin.
JOB_TURNS_TABLE = """
CREATE TABLE IF NOT EXISTS job_turns (
    login     TEXT PRIMARY KEY,
    last_turn REAL NOT NULL
) WITHOUT ROWID"""

# Emails to users, one row per message (a digest is one row): the rate limit counts
# these, and a row is written in the same transaction that marks its jobs `sending`.
EMAIL_LOG_TABLE = """
CREATE TABLE IF NOT EXISTS email_log (
    id      INTEGER PRIMARY KEY,
    login   TEXT NOT NULL,
    sent_at REAL NOT NULL,
    kind    TEXT NOT NULL,                  -- single | digest
    jobs    TEXT NOT NULL DEFAULT '[]'      -- JSON: the job ids it tells about
)"""

# The defender's bans (sftpgate/defender.py, journal/bans.py): shared by every gateway on this
# database. A row outlives its ban by a day, so a repeat offender's next ban is longer.
BANS_TABLE = """
CREATE TABLE IF NOT EXISTS bans (
    address    TEXT PRIMARY KEY,             -- an IPv4 address or an IPv6 /64
    until      REAL NOT NULL,                -- unix time the ban ends
    strikes    INTEGER NOT NULL DEFAULT 1,   -- bans of this address in a row
    reason     TEXT NOT NULL,
    created_at REAL NOT NULL,
    lifted     INTEGER NOT NULL DEFAULT 0    -- its end has been journaled
) WITHOUT ROWID"""

# Quotas (frontdoor/limits.py, journal/usage.py): each user's usage, scanned once and then
# kept current by sums from the front door, so no home is rescanned at each start.
QUOTA_USAGE_TABLE = """
CREATE TABLE IF NOT EXISTS quota_usage (
    login      TEXT PRIMARY KEY,
    bytes      INTEGER NOT NULL,             -- regular files, each inode once
    files      INTEGER NOT NULL,
    scanned_at REAL NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID"""

INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_login_state ON jobs(login, state)",
    "CREATE INDEX IF NOT EXISTS jobs_login_created ON jobs(login, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_email_state ON jobs(email_state)",
    "CREATE INDEX IF NOT EXISTS email_log_login_sent ON email_log(login, sent_at)",
    "CREATE INDEX IF NOT EXISTS jobs_state_next ON jobs(state, next_run_at)",
    "CREATE INDEX IF NOT EXISTS operations_ts ON operations(ts)",
    "CREATE INDEX IF NOT EXISTS operations_login_ts ON operations(login, ts)",
    "CREATE INDEX IF NOT EXISTS operations_op_ts ON operations(op, ts)",
    "CREATE INDEX IF NOT EXISTS operations_session ON operations(session_id)",
    "CREATE INDEX IF NOT EXISTS uploads_ts ON uploads(ts)",
)


def connect(path: Path, *, synchronous: str = "full", readonly: bool = False) -> sqlite3.Connection:
    """Open the journal, creating the schema when writing.

    When writing, the file (and its WAL and shared memory) is 0600 and a
    folder created for it 0700. Raises ``sqlite3.Error`` (and ``OSError`` for
    the folder or the file's mode) on failure.
    """
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn
    # The journal is the audit trail: 0600 in a folder made 0700, whatever the
    # umask. SQLite creates -wal and -shm with the database file's mode, so the
    # file is made private before SQLite opens it; older ones are tightened.
    private_dir(path.parent, tighten=False)
    private_file(path)
    for suffix in ("-wal", "-shm"):
        private_file(path.with_name(path.name + suffix), create=False)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version < SCHEMA_VERSION:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            for statement in (
                SESSIONS_TABLE,
                OPERATIONS_TABLE,
                UPLOADS_TABLE,
                JOBS_TABLE,
                EVENT_KEYS_TABLE,
                BANS_TABLE,
                QUOTA_USAGE_TABLE,
                JOB_TURNS_TABLE,
                EMAIL_LOG_TABLE,
                *INDEXES,
            ):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


_SESSION_UPSERT = """
INSERT INTO sessions (id, login, remote_addr, remote_port, client_version, auth_method,
                      result, started_at, ended_at)
VALUES (:id, :login, :remote_addr, :remote_port, :client_version, :auth_method,
        :result, :started_at, :ended_at)
ON CONFLICT(id) DO UPDATE SET
    login = COALESCE(excluded.login, sessions.login),
    client_version = COALESCE(excluded.client_version, sessions.client_version),
    auth_method = COALESCE(excluded.auth_method, sessions.auth_method),
    result = CASE WHEN sessions.result = 'ok' THEN 'ok' ELSE excluded.result END,
    ended_at = COALESCE(excluded.ended_at, sessions.ended_at)
"""

# Ids are given explicitly: a batch learns the last ids once and numbers its
# rows itself, so the rows of a batch go in through a few multi-row INSERTs.
_OPERATION_INSERT = """
INSERT INTO operations (id, ts, session_id, login, remote_addr, op, path, path2, flags, mode,
                        attrs, bytes_read, bytes_written, duration_ms, status, message)
VALUES """
_OPERATION_COLUMNS = 16

_UPLOAD_INSERT = """
INSERT INTO uploads (id, ts, session_id, login, path, bytes, state, operation_id)
VALUES """
_UPLOAD_COLUMNS = 8

# Rows per INSERT statement, largest first: a batch of any size takes a few
# statements, and only these few texts are ever prepared (sqlite3 caches them).
_CHUNKS = (64, 16, 4, 1)


@functools.cache
def _values_sql(head: str, columns: int, rows: int) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    return head + ", ".join([row] * rows)


def _insert_rows(
    conn: sqlite3.Connection, head: str, columns: int, rows: list[tuple[object, ...]]
) -> None:
    """Insert ``rows`` through multi-row INSERTs of :data:`_CHUNKS` rows.

    ``executemany`` runs one SQLite step per row, and sqlite3 lets go of the
    GIL around each step: with the event loop busy, every row of a batch
    handed the GIL to the loop and back (a thread wake-up each way). One
    statement per chunk binds its rows in C and lets go of the GIL once.
    """
    start = 0
    for size in _CHUNKS:
        while len(rows) - start >= size:
            params = list(itertools.chain.from_iterable(rows[start : start + size]))
            conn.execute(_values_sql(head, columns, size), params)
            start += size


_SESSION_OPS = {Op.LOGIN, Op.LOGIN_FAILED, Op.LOGOUT}

# Called inside the transaction that records a complete upload, with the new
# upload's id and its final path: where rules add the job row, so the upload
# and its job commit (or fail) together.
UploadHook = Callable[[sqlite3.Connection, int, str, Event], None]


def record_batch(
    conn: sqlite3.Connection, events: Iterable[Event], on_upload: UploadHook | None = None
) -> None:
    """Write events in one transaction (one fsync for the lot).

    An event whose ``key`` was recorded before is skipped. Operation and
    upload rows are numbered here, in order, and written by a few
    multi-row INSERTs: the writer thread runs little Python per event and
    lets go of the GIL it shares with the event loop rarely. ``on_upload`` runs for
    each complete upload once its row is in, inside the transaction.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        _record_all(conn, events, on_upload)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _record_all(
    conn: sqlite3.Connection, events: Iterable[Event], on_upload: UploadHook | None
) -> None:
    # Inside BEGIN IMMEDIATE: no other writer can take these ids meanwhile.
    op_id = conn.execute("SELECT coalesce(max(id), 0) FROM operations").fetchone()[0]
    upload_id: int | None = None  # looked up at the batch's first upload
    operations: list[tuple[object, ...]] = []
    uploads: list[tuple[object, ...]] = []
    completed: list[tuple[int, str, Event]] = []
    for event in events:
        if event.key is not None:
            seen = conn.execute("INSERT OR IGNORE INTO event_keys (key) VALUES (?)", (event.key,))
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
                    "started_at": s.started_at,
                    "ended_at": event.time if event.op is Op.LOGOUT else None,
                },
            )
        op_id += 1
        operations.append(
            (
                op_id,
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
        )
        # A rename that completes a temporary upload names the file by its new name.
        final = event.path2 if event.op is Op.RENAME else event.path
        if event.upload is not None and final is not None:
            if upload_id is None:
                upload_id = conn.execute("SELECT coalesce(max(id), 0) FROM uploads").fetchone()[0]
            upload_id += 1
            state = UploadState(event.upload)
            uploads.append(
                (
                    upload_id,
                    event.time,
                    s.id,
                    s.login,
                    final,
                    event.bytes_written or 0,
                    state.value,
                    op_id,
                )
            )
            if state is UploadState.COMPLETE:
                completed.append((upload_id, final, event))
    _insert_rows(conn, _OPERATION_INSERT, _OPERATION_COLUMNS, operations)
    _insert_rows(conn, _UPLOAD_INSERT, _UPLOAD_COLUMNS, uploads)
    if on_upload is not None:
        for upload, final, event in completed:
            on_upload(conn, upload, final, event)
