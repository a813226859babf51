"""SQLite journal: schema and the one connection helper.

Tables are constants; every access goes through :func:`connect`. WAL mode, so
readers (``sftpgate journal``) never block the writer.
"""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..events import Event, Op, UploadState, current_process
from ..private import private_dir, private_file
from ..storage.ports import (
    MIGRATE_COMMAND,
    BatchResult,
    JobRule,
    JobSpec,
    SchemaAhead,
    SchemaBehind,
    StorageUnavailable,
)

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

# Live job workers (jobs/registry.py): each `serve` or `worker` process heartbeats its row and
# deletes it on a clean exit. A job's lease owner is `<id>/<slot>`. Jobs are taken over by lease
# expiry; a row only proves death where /proc can tell (same node and boot, that pid gone).
WORKERS_TABLE = """
CREATE TABLE IF NOT EXISTS workers (
    id           TEXT PRIMARY KEY,            -- node:pid:random, never reused
    node         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    boot_id      TEXT NOT NULL,               -- boot_id/pid namespace (registry.boot_id)
    pid_start    INTEGER NOT NULL,            -- /proc/<pid>/stat field 22 (pid reuse)
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
) WITHOUT ROWID"""

# The admin API's disconnect requests (api/, journal/admin.py): a row per session asked to end.
DISCONNECT_REQUESTS_TABLE = """
CREATE TABLE IF NOT EXISTS disconnect_requests (
    session_id   TEXT PRIMARY KEY,
    requested_at REAL NOT NULL,
    requested_by TEXT NOT NULL,              -- the API token's name
    done_at      REAL                        -- when a gateway ended the session
) WITHOUT ROWID"""

# Live gateway processes (journal/sweep.py): each gateway process heartbeats its row; sessions
# name theirs (sessions.process). A process proven dead, or another node's whose heartbeat is
# too old, has its sessions ended by a sweeper; a clean exit deletes the row.
GATEWAYS_TABLE = """
CREATE TABLE IF NOT EXISTS gateways (
    id           TEXT PRIMARY KEY,            -- node:pid:random, never reused
    node         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    boot_id      TEXT NOT NULL,               -- boot_id/pid namespace (registry.boot_id)
    pid_start    INTEGER NOT NULL,            -- /proc/<pid>/stat field 22 (pid reuse)
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
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


# Versioned migrations: version N is reached by running MIGRATIONS[N - 1] in one
# transaction with its ``PRAGMA user_version = N``. Version 4 is the schema every
# earlier build made (its CREATEs are idempotent, so versions 1-3 reach it too).
# The tables above are version 4's; later versions change them by ALTER only.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (),
    (),
    (),
    (
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
    ),
    (
        # 5 (issue 18): which host a session or a job belongs to; the live workers'
        # registry (jobs/registry.py); the indexes retention (prune) walks by.
        "ALTER TABLE sessions ADD COLUMN node TEXT",
        "ALTER TABLE jobs ADD COLUMN node TEXT",
        WORKERS_TABLE,
        "CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_at)",
        "CREATE INDEX IF NOT EXISTS uploads_operation ON uploads(operation_id)",
        "CREATE INDEX IF NOT EXISTS jobs_upload ON jobs(upload_id)",
        "CREATE INDEX IF NOT EXISTS jobs_session ON jobs(session_id)",
        "CREATE INDEX IF NOT EXISTS email_log_sent ON email_log(sent_at)",
    ),
    (
        # 6 (issue 19): an admin's request to end a session (sftpgate/api/); every gateway
        # process polls it and ends the session it holds.
        DISCONNECT_REQUESTS_TABLE,
    ),
    (
        # 7: the gateway process each session belongs to, and the registry of live gateway
        # processes, so sessions of a process that died are ended (journal/sweep.py).
        "ALTER TABLE sessions ADD COLUMN process TEXT",
        GATEWAYS_TABLE,
        "CREATE INDEX IF NOT EXISTS sessions_open_process ON sessions(process)"
        " WHERE ended_at IS NULL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of the database behind ``conn`` (0: none)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _behind(path: Path, version: int) -> SchemaBehind:
    return SchemaBehind(
        f"journal {path} has schema version {version}, this sftpgate needs "
        f"{SCHEMA_VERSION}: run `{MIGRATE_COMMAND} -c <config>` first "
        "(back the file up before; stop the gateways and workers using it)"
    )


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Raise :class:`SchemaBehind` or :class:`SchemaAhead` unless the schema is current."""
    version = schema_version(conn)
    if version < SCHEMA_VERSION:
        raise _behind(path, version)
    if version > SCHEMA_VERSION:
        raise SchemaAhead(
            f"journal {path} has schema version {version}, newer than this sftpgate's "
            f"{SCHEMA_VERSION}: upgrade sftpgate"
        )


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Run the migrations the database lacks, each in its own transaction; the versions run.

    The version is read again inside each ``BEGIN IMMEDIATE``, so processes
    migrating at once never run a step twice. Raises :class:`SchemaAhead` for
    a database newer than this sftpgate.
    """
    applied: list[int] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaAhead(
                    f"schema version {version} is newer than this sftpgate's {SCHEMA_VERSION}"
                )
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return applied
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(version + 1)


def connect(
    path: Path, *, synchronous: str = "full", readonly: bool = False, create: bool = True
) -> sqlite3.Connection:
    """Open the journal, checking its schema.

    Read-only: the schema is not checked (the reader does, see
    :class:`~sftpgate.journal.query.SQLiteReader`). Writing: a database with no
    schema yet (a new file) is created at the current version when ``create``
    (the single-host default needs no extra step); one that is behind raises
    :class:`SchemaBehind` naming ``sftpgate db migrate``, one that is ahead
    :class:`SchemaAhead`.

    When writing, the file (and its WAL and shared memory) is 0600 and a
    folder created for it 0700. Raises ``sqlite3.Error`` (and ``OSError`` for
    the folder or the file's mode) on failure.
    """
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn
    conn = open_rw(path, synchronous=synchronous)
    try:
        if create and schema_version(conn) == 0:
            migrate(conn)
        check_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def open_rw(path: Path, *, synchronous: str = "full") -> sqlite3.Connection:
    """Open the journal for writing without looking at its schema (``sftpgate db migrate``)."""
    # The journal is the audit trail: 0600 in a folder made 0700, whatever the
    # umask. SQLite creates -wal and -shm with the database file's mode, so the
    # file is made private before SQLite opens it; older ones are tightened.
    private_dir(path.parent, tighten=False)
    private_file(path)
    for suffix in ("-wal", "-shm"):
        private_file(path.with_name(path.name + suffix), create=False)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


_SESSION_UPSERT = """
INSERT INTO sessions (id, login, remote_addr, remote_port, client_version, auth_method,
                      result, node, process, started_at, ended_at)
VALUES (:id, :login, :remote_addr, :remote_port, :client_version, :auth_method,
        :result, :node, :process, :started_at, :ended_at)
ON CONFLICT(id) DO UPDATE SET
    login = COALESCE(excluded.login, sessions.login),
    client_version = COALESCE(excluded.client_version, sessions.client_version),
    auth_method = COALESCE(excluded.auth_method, sessions.auth_method),
    node = COALESCE(excluded.node, sessions.node),
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


def record_batch(
    conn: sqlite3.Connection, events: Iterable[Event], rule: JobRule | None = None
) -> BatchResult:
    """Write events in one transaction (one fsync for the lot): the JournalStore contract.

    An event whose ``key`` was recorded before is skipped. Operation and
    upload rows are numbered here, in order, and written by a few
    multi-row INSERTs: the writer thread runs little Python per event and
    lets go of the GIL it shares with the event loop rarely. Each complete
    upload is put to ``rule`` (pure) and, when it returns a spec, its job is
    inserted in the same transaction. Returns the new jobs' ids.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        jobs = _record_all(conn, events, rule)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return BatchResult(tuple(jobs))


def _record_all(
    conn: sqlite3.Connection, events: Iterable[Event], rule: JobRule | None
) -> list[int]:
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
                    "node": _node(s),
                    "process": current_process(),
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
    jobs: list[int] = []
    if rule is None:
        return jobs
    for upload, final, event in completed:
        spec = rule(final, event)
        if spec is not None:
            jobs.append(_insert_job(conn, upload, final, event, spec))
    return jobs


def _node(session: object) -> str | None:
    """The host a session is on, once the front doors say (``SessionInfo.node``)."""
    node = getattr(session, "node", None)
    return node if isinstance(node, str) else None


def _insert_job(
    conn: sqlite3.Connection, upload_id: int, path: str, event: Event, spec: JobSpec
) -> int:
    # The job row's SQL is the job store's (one place for it); imported here, not at the
    # top, because the job store opens its database through this module.
    from ..jobs.store import enqueue

    job_id = enqueue(conn, upload_id, path, event, spec.max_attempts, spec.queue_cap)
    node = _node(event.session)
    if node is not None:
        conn.execute("UPDATE jobs SET node = ? WHERE id = ?", (node, job_id))
    return job_id


class SQLiteJournal:
    """The :class:`~sftpgate.storage.ports.JournalStore` on the SQLite journal file.

    One connection, used by one thread at a time (the journal writer's). The
    driver's errors of the disk, the lock or the file become
    :class:`~sftpgate.storage.ports.StorageUnavailable`; an error of a record
    (a value SQLite cannot bind, a constraint) goes through as it is.
    """

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = connect(path, synchronous=synchronous)

    def record_batch(self, events: Sequence[Event], rule: JobRule | None = None) -> BatchResult:
        if self._conn is None:
            raise StorageUnavailable(f"journal {self.path} is closed")
        try:
            return record_batch(self._conn, events, rule)
        except Exception as exc:
            if transient(exc):
                raise StorageUnavailable(f"journal {self.path}: {exc}") from exc
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def transient(exc: BaseException) -> bool:
    """Whether a failed statement says the disk or the lock failed, not the records.

    OperationalError is locked, busy, full, I/O, a schema gone; a bare
    DatabaseError is a corrupt file. Everything else (a value SQLite cannot
    bind, a constraint, a field of the wrong type) is about one record.
    """
    return isinstance(exc, OSError | MemoryError | sqlite3.OperationalError) or (
        type(exc) is sqlite3.DatabaseError
    )
