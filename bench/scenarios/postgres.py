"""Figures 18 and 19: the PostgreSQL backend beside SQLite (issue 18).

Both start their own PostgreSQL (bench/pgserver.py: Debian's initdb + pg_ctl on a temp dir,
**durable**: fsync, synchronous_commit and full_page_writes on, so a commit waits for its WAL
flush as SQLite's ``synchronous=full`` waits for its fsync). Each side runs interleaved with
the other (A B, B A, ...; warm-up discarded).

- **18, journal writes/s.** Figure 7's measure: a
  :class:`~sftpgate.journal.writer.JournalWriter` driven in this process with
  ``options.journal_ops`` realistic events built first and emitted back to back; the clock
  stops when the last one is committed. A: its PostgreSQL store
  (``PostgresBackend(url).journal()``, a new migrated database each round). B: SQLite
  (``synchronous=full``, a new file each round). Each round checks that every event became
  one ``operations`` row. Value: A's median events/s; the ratio A ÷ B is in the text.
- **19, CLOSE → job started.** Figure 6's measure, on two gateways at once with the same
  settings (pipeline on, 1 embedded worker, ``jobs.poll_interval`` 1 s so only a wake-up can
  start a job quickly, journal ``synchronous: full``, email off): A with ``database.url`` on
  that PostgreSQL (the commit wakes the hand-over, which claims the job row and defers it to
  Procrastinate; Procrastinate's worker hears the NOTIFY, fetches it and our task leases the
  row), B on SQLite (the commit wakes the embedded worker, which leases the row). One asyncssh
  session to each uploads tiny ``*.mp4`` files (ffprobe rejects them in a few tens of ms), one
  upload to A and one to B per pair, each waiting for its job to finish, so every job meets an
  idle worker. Times: the gateway's ``started_at`` minus the client's ``time.time()`` just
  before it sent CLOSE (same clock). Value: A's p99 (ms); B's beside it, and the ratio. A's
  time is split by the row's ``handed_at`` and Procrastinate's own ``deferred``/``started``
  events.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from sftpgate.journal.writer import JournalWriter
from sftpgate.storage.postgres.backend import PostgresBackend

from ..common import Figure, Options, interleave, median, percentile
from ..pgserver import BenchPostgres, running_postgres
from ..servers import Endpoint, Servers, extra_gateway
from . import journal, latency
from .concurrency import connect, load_key

POLL = 0.005  # seconds between the client's polls of a job row
Row = dict[str, Any]


# -- figure 18: journal writes ------------------------------------------------------------


@dataclass
class SqliteWrites:
    folder: Path
    count: int
    batches: list[int] = field(default_factory=list)

    def __call__(self) -> float:
        path = self.folder / f"writes-{len(self.batches)}.sqlite3"
        seconds, rows, batches = journal.measure_writes(path, self.count)
        for leftover in self.folder.glob(f"{path.name}*"):
            leftover.unlink()
        if rows != self.count:
            raise RuntimeError(f"SQLite journal: {rows} rows for {self.count} events")
        self.batches.append(batches)
        return self.count / seconds


@dataclass
class PostgresWrites:
    pg: BenchPostgres
    count: int
    batches: list[int] = field(default_factory=list)

    def __call__(self) -> float:
        with self.pg.database() as url:
            backend = PostgresBackend(url, size=2)
            try:
                backend.migrate()
                writer = JournalWriter(Path("unused"), store=backend.journal())
                seconds, batches = journal.drive(writer, self.count)
            finally:
                backend.close()
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM operations").fetchone()
        rows = int(row[0]) if row else 0
        if rows != self.count:
            raise RuntimeError(f"PostgreSQL journal: {rows} rows for {self.count} events")
        self.batches.append(batches)
        return self.count / seconds


def journal_figure(servers: Servers, options: Options, pg: BenchPostgres) -> Figure:
    folder = servers.workdir / "fig18"
    folder.mkdir()
    count = options.journal_ops
    a, b = PostgresWrites(pg, count), SqliteWrites(folder, count)
    rates_a, rates_b = interleave(a, b, rounds=options.rounds, warmup=options.warmup)
    med_a, med_b = median(rates_a), median(rates_b)
    kept_a, kept_b = a.batches[options.warmup :], b.batches[options.warmup :]
    return Figure(
        number=18,
        title="journal: sustained operations/s on PostgreSQL beside SQLite (durable commits)",
        measured=(
            f"{med_a:,.0f} vs {med_b:,.0f} ops/s, ratio {med_a / med_b:.2f} "
            f"({count:,} events a round; commits {median([float(n) for n in kept_a]):.0f} "
            f"vs {median([float(n) for n in kept_b]):.0f})"
        ),
        value=med_a,
        target=">= 20000",  # figure 7's bar for SQLite
        notes=(
            "Figure 7's JournalWriter driven in the bench process, A with its PostgreSQL store "
            "(a new migrated database a round; fsync, synchronous_commit, full_page_writes on), "
            "B with SQLite synchronous=full (a new file a round), interleaved; each round "
            "checks one operations row per event. Target: figure 7's bar."
        ),
        extra={
            "postgres_ops_s": rates_a,
            "sqlite_ops_s": rates_b,
            "ratio": med_a / med_b,
            "postgres_batches": kept_a,
            "sqlite_batches": kept_b,
            "events": count,
            "postgres": pg.settings(),
        },
    )


# -- figure 19: CLOSE -> job started ------------------------------------------------------


@dataclass
class Sample:
    sent: float  # client: CLOSE about to go
    reply: float  # client: CLOSE reply in
    row: Row  # the finished job row (created_at, started_at, state; handed_at on PostgreSQL)
    events: dict[str, float] = field(default_factory=dict)  # Procrastinate's, on PostgreSQL

    @property
    def start_ms(self) -> float:
        return (float(self.row["started_at"]) - self.sent) * 1000


def _wait(fetch: Callable[[str], Row | None], path: str) -> Row:
    deadline = time.monotonic() + latency.JOB_TIMEOUT
    while True:
        row = fetch(path)
        if row is not None and row["state"] in latency.FINISHED:
            return row
        if time.monotonic() > deadline:
            state = None if row is None else row["state"]
            raise TimeoutError(
                f"job for {path} not finished after {latency.JOB_TIMEOUT} s ({state})"
            )
        time.sleep(POLL)  # the job runs in another process: polled, bounded by the deadline


class SqliteJobs:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    def __call__(self, path: str) -> Row | None:
        if self.db is None:
            self.db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False
            )
            self.db.row_factory = sqlite3.Row
        row = self.db.execute(
            "SELECT id, created_at, started_at, state FROM jobs WHERE path = ? ORDER BY id DESC",
            (path,),
        ).fetchone()
        return None if row is None else dict(row)

    def events(self, row: Row) -> dict[str, float]:
        return {}

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


class PostgresJobs:
    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def __call__(self, path: str) -> Row | None:
        cur = self.conn.execute(
            "SELECT id, created_at, started_at, handed_at, state FROM jobs WHERE path = %s"
            " ORDER BY id DESC LIMIT 1",
            (path,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        assert cur.description is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))

    def events(self, row: Row) -> dict[str, float]:
        """Procrastinate's first ``deferred`` and ``started`` times of this job (its queueing
        lock is ``sftpgate-job-<id>``, storage/postgres/queue.py)."""
        found: dict[str, float] = {}
        for kind, at in self.conn.execute(
            "SELECT e.type::text, extract(epoch FROM e.at)::float8 FROM procrastinate_events e"
            " JOIN procrastinate_jobs j ON j.id = e.job_id WHERE j.queueing_lock = %s"
            " ORDER BY e.id",
            (f"sftpgate-job-{row['id']}",),
        ):
            found.setdefault(str(kind), float(at))
        return found

    def close(self) -> None:
        self.conn.close()


async def _upload(sftp: Any, name: str, jobs: SqliteJobs | PostgresJobs) -> Sample:
    f = await sftp.open(name, "wb")
    await f.write(latency.CONTENT)
    sent = time.time()
    await f.close()
    reply = time.time()
    row = await asyncio.to_thread(_wait, jobs, f"/{name}")
    if row["started_at"] is None:
        raise RuntimeError(f"{name}: job {row['state']} without started_at")
    return Sample(sent, reply, row, await asyncio.to_thread(jobs.events, row))


async def _pairs(
    servers: Servers,
    ports: tuple[int, int],
    jobs: tuple[SqliteJobs | PostgresJobs, SqliteJobs | PostgresJobs],
    count: int,
    warmup: int,
) -> tuple[list[Sample], list[Sample]]:
    """``warmup + count`` uploads to each gateway, alternating who goes first."""
    key = load_key(servers)
    out: tuple[list[Sample], list[Sample]] = ([], [])
    async with (
        await connect(Endpoint("pg", ports[0], Path(), 0), servers.login, key) as conn_a,
        await connect(Endpoint("sqlite", ports[1], Path(), 0), servers.login, key) as conn_b,
        conn_a.start_sftp_client() as sftp_a,
        conn_b.start_sftp_client() as sftp_b,
    ):
        sides = ((sftp_a, jobs[0], out[0]), (sftp_b, jobs[1], out[1]))
        for index in range(warmup + count):
            first = index < warmup or (index - warmup) % 2 == 0
            for sftp, store, samples in sides if first else sides[::-1]:
                samples.append(await _upload(sftp, f"close-{index:05d}.mp4", store))
    return out


def _p(values: list[float], pct: float) -> float:
    return percentile(values, pct)


def latency_figure(servers: Servers, options: Options, pg: BenchPostgres) -> Figure:
    sections: dict[str, Any] = {
        "pipeline": {"enabled": True},
        "jobs": {"workers": 1, "poll_interval": 1.0},
        "journal": {"synchronous": "full"},
        "email": {"enabled": False},
        "smtp": {
            "host": "127.0.0.1",
            "port": latency.closed_port(),
            "retries": 0,
            "timeout": 1.0,
        },
    }
    with pg.database() as url:
        backend = PostgresBackend(url, size=2)
        try:
            backend.migrate()
        finally:
            backend.close()
        pg_jobs = PostgresJobs(url)
        sqlite_jobs = SqliteJobs(servers.workdir / "fig19-sqlite" / "state" / "journal.sqlite3")
        try:
            with (
                extra_gateway(servers, "fig19-pg", database={"url": url}, **sections) as gw_a,
                extra_gateway(servers, "fig19-sqlite", **sections) as gw_b,
            ):
                samples_a, samples_b = asyncio.run(
                    _pairs(
                        servers,
                        (gw_a.port, gw_b.port),
                        (pg_jobs, sqlite_jobs),
                        options.latency_uploads,
                        options.warmup,
                    )
                )
        finally:
            pg_jobs.close()
            sqlite_jobs.close()
    kept_a, kept_b = samples_a[options.warmup :], samples_b[options.warmup :]
    start_a = [s.start_ms for s in kept_a]
    start_b = [s.start_ms for s in kept_b]
    a50, a99, b50, b99 = _p(start_a, 50), _p(start_a, 99), _p(start_b, 50), _p(start_b, 99)
    phases = _phases(kept_a, POSTGRES_MARKS)
    phases_b = _phases(kept_b, SQLITE_MARKS)
    split = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
    split_b = ", ".join(f"{k} {v:.1f}" for k, v in phases_b.items())
    return Figure(
        number=19,
        title="upload CLOSE sent -> job started: PostgreSQL + Procrastinate beside SQLite",
        measured=(
            f"p99 {a99:.1f} vs {b99:.1f} ms, ratio {a99 / b99:.2f}; p50 {a50:.1f} vs "
            f"{b50:.1f} ms ({len(kept_a)} uploads each; medians split, ms: PostgreSQL {split}; "
            f"SQLite {split_b})"
        ),
        value=a99,
        target="<= 20",  # figure 6's bar for SQLite
        notes=(
            "Two gateways at once with figure 6's settings (1 embedded worker, poll_interval "
            "1 s, journal synchronous: full, email off), A on database.url (durable "
            "PostgreSQL: the commit wakes the hand-over, Procrastinate's worker hears the "
            "NOTIFY, fetches, our task leases the row), B on SQLite; one asyncssh session "
            "each, one upload to each per pair, who goes first alternating, each waiting for "
            "its job to finish. Time: the job row's started_at minus the client's time.time() "
            "before CLOSE. Split (medians): write = CLOSE sent to the row's created_at "
            "(written in the batch's transaction, before its commit); A: commit+claim = to "
            "handed_at (the hand-over's clock as it starts its claim: the commit and the "
            "wake-up), defer = to Procrastinate's 'deferred' event (the claim, then the defer "
            "up to the start of its transaction: PostgreSQL's now()), fetch = to its 'started' "
            "event (the defer's commit, its NOTIFY, the worker's fetch transaction starting), "
            "lease = to our started_at; B: commit+lease = to started_at. Target: figure 6's bar."
        ),
        extra={
            "postgres_start_ms": start_a,
            "sqlite_start_ms": start_b,
            "p99_ratio": a99 / b99,
            "postgres_phases_ms": phases,
            "sqlite_phases_ms": phases_b,
            "states": sorted({str(s.row["state"]) for s in samples_a + samples_b}),
            "uploads": (len(samples_a), len(samples_b)),
            "postgres": pg.settings(),
        },
    )


# Where a job is between CLOSE sent and our lease: (name, when it ended) in order.
Marks = list[tuple[str, Callable[[Sample], float]]]
POSTGRES_MARKS: Marks = [
    ("write", lambda s: float(s.row["created_at"])),  # row written; its commit follows
    ("commit+claim", lambda s: float(s.row["handed_at"] or "nan")),  # hand-over claimed it
    ("defer", lambda s: s.events.get("deferred", float("nan"))),  # in Procrastinate
    ("fetch", lambda s: s.events.get("started", float("nan"))),  # its worker fetched it
    ("lease", lambda s: float(s.row["started_at"])),  # our task leased the row
]
SQLITE_MARKS: Marks = [
    ("write", lambda s: float(s.row["created_at"])),
    ("commit+lease", lambda s: float(s.row["started_at"])),  # the woken worker leased it
]


def _phases(samples: list[Sample], marks: Marks) -> dict[str, float]:
    """Medians (ms) of each step from CLOSE sent to the lease."""
    spans: dict[str, list[float]] = {}
    for s in samples:
        before = s.sent
        for name, mark in marks:
            at = mark(s)
            spans.setdefault(name, []).append((at - before) * 1000)
            before = at
    return {name: median(values) for name, values in spans.items()}


def run(servers: Servers, options: Options) -> list[Figure]:
    figures: list[Figure] = []
    with running_postgres() as pg:
        if options.wants(18):
            figures.append(journal_figure(servers, options, pg))
        if options.wants(19):
            figures.append(latency_figure(servers, options, pg))
    return figures
