"""The PostgreSQL backend against a real PostgreSQL (tests/pg_kit.py): schema migrations, the
journal (batches with their jobs, scan, exact follow under concurrent writers, prune), bans."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

import pg_kit
from sftpgate.defender import Ban
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.ports import JobSpec, SchemaBehind
from sftpgate.storage.postgres import schema
from sftpgate.storage.postgres.backend import PostgresBackend
from sftpgate.storage.postgres.journal import glob_regex


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


@pytest.fixture
def db_url(pg: pg_kit.PgServer) -> Iterator[str]:
    with pg.database() as url:
        yield url


@pytest.fixture
def backend(db_url: str) -> Iterator[PostgresBackend]:
    b = PostgresBackend(db_url, size=8)
    b.migrate()
    try:
        yield b
    finally:
        b.close()


SESSION = SessionInfo(id="s1", remote_addr="192.0.2.7", remote_port=5000, login="alice")


def ev(op: Op, path: str | None = None, **kw: Any) -> Event:
    return Event(op, kw.pop("session", SESSION), path=path, **kw)


def upload(path: str, **kw: Any) -> Event:
    return ev(Op.CLOSE, path, bytes_written=10, upload=UploadState.COMPLETE, **kw)


def all_rows(backend: PostgresBackend, **kw: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    backend.reader().scan(JournalFilter(**kw), rows.append)
    return rows


# -- schema ---------------------------------------------------------------------------


def test_ports_refuse_a_database_without_the_schema_naming_the_migrate_command(
    db_url: str,
) -> None:
    b = PostgresBackend(db_url, size=2)
    try:
        assert b.schema_version() == 0
        with pytest.raises(SchemaBehind, match="sftpgate db migrate"):
            b.journal()
        assert b.migrate() == [v for v, _, _ in schema.MIGRATIONS]
        assert b.schema_version() == schema.LATEST
        assert b.migrate() == []
        b.journal()  # now accepted
    finally:
        b.close()


def test_two_processes_migrating_at_once_apply_each_migration_once(db_url: str) -> None:
    def one() -> list[int]:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return schema.migrate(conn)  # type: ignore[arg-type]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: one(), range(4)))
    assert sorted(map(len, results)) == [0, 0, 0, len(schema.MIGRATIONS)]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (
            len(schema.MIGRATIONS),
        )
        # Procrastinate's own schema came with migration 2.
        assert conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone() == (
            True,
        )


# -- record_batch ---------------------------------------------------------------------


def test_batch_writes_session_operations_upload_and_its_job_in_one_transaction(
    backend: PostgresBackend,
) -> None:
    journal = backend.journal()
    result = journal.record_batch(
        [ev(Op.LOGIN), ev(Op.OPEN, "/a.mp4"), upload("/a.mp4", device=5, inode=77)],
        lambda path, event: JobSpec(max_attempts=3) if path.endswith(".mp4") else None,
    )
    assert len(result.jobs) == 1
    rows = all_rows(backend)
    assert [r["op"] for r in rows] == ["login", "open", "close"]
    assert rows[0]["remote_port"] == 5000  # joined from the session row
    job = backend.jobs().get(result.jobs[0])
    assert (job.path, job.state.value, job.max_attempts) == ("/a.mp4", "queued", 3)
    assert job.data == {"device": 5, "inode": 77}
    assert backend.jobs().upload_time(job.upload_id) == pytest.approx(rows[2]["ts"])


def test_a_rule_that_raises_leaves_nothing_of_the_batch(backend: PostgresBackend) -> None:
    def broken(path: str, event: Event) -> JobSpec | None:
        raise RuntimeError("rule failed")

    with pytest.raises(RuntimeError):
        backend.journal().record_batch([ev(Op.LOGIN), upload("/b.mp4")], broken)
    assert all_rows(backend) == []
    assert backend.jobs().list() == []


def test_an_event_key_seen_before_is_skipped(backend: PostgresBackend) -> None:
    journal = backend.journal()
    journal.record_batch([ev(Op.MKDIR, "/d", key="k1")])
    journal.record_batch([ev(Op.MKDIR, "/d", key="k1"), ev(Op.RMDIR, "/d", key="k2")])
    assert [r["op"] for r in all_rows(backend)] == ["mkdir", "rmdir"]


def test_queue_cap_writes_a_refusal_and_tells_the_user_once(backend: PostgresBackend) -> None:
    journal = backend.journal()
    rule = lambda path, event: JobSpec(max_attempts=3, queue_cap=1)  # noqa: E731
    ids = [journal.record_batch([upload(f"/{n}.mp4")], rule).jobs[0] for n in range(3)]
    jobs = [backend.jobs().get(i) for i in ids]
    assert [j.outcome for j in jobs] == [None, "refused", "refused"]
    assert [j.email_state.value for j in jobs] == ["none", "none", "skipped"]


def test_scan_filters_as_sqlite_does(backend: PostgresBackend) -> None:
    other = SessionInfo(id="s2", remote_addr="192.0.2.8", remote_port=1, login="bob")
    backend.journal().record_batch(
        [
            ev(Op.LOGIN),
            ev(Op.RENAME, "/v/a.part", path2="/v/a.mp4"),
            ev(Op.REMOVE, "/x[1].txt", status="permission_denied"),
            ev(Op.LOGIN, session=other),
            ev(Op.OPEN, "/v/b.mp4", session=other),
        ]
    )
    assert [r["op"] for r in all_rows(backend, user="bob")] == ["login", "open"]
    assert [r["op"] for r in all_rows(backend, path_glob="/v/*.mp4")] == ["rename", "open"]
    assert [r["path"] for r in all_rows(backend, path_glob="/x[[]1].txt")] == ["/x[1].txt"]
    assert [r["op"] for r in all_rows(backend, failed_only=True)] == ["remove"]
    assert [r["op"] for r in all_rows(backend, ops=("open", "login"), limit=2)] == [
        "login",
        "open",
    ]


def test_glob_is_sqlites_glob() -> None:
    import re

    cases = {
        ("/a/*.mp4", "/a/b/c.mp4"): True,  # * crosses /
        ("/a/?.mp4", "/a/bc.mp4"): False,
        ("/a/[bc].mp4", "/a/c.mp4"): True,
        ("/a/[^bc].mp4", "/a/c.mp4"): False,
        ("/a.mp4", "/aXmp4"): False,  # . is literal
        ("*.MP4", "x.mp4"): False,  # case-sensitive
    }
    for (glob, path), want in cases.items():
        assert bool(re.search(glob_regex(glob), path)) is want, (glob, path)


# -- follow -----------------------------------------------------------------------------


def test_follow_never_skips_a_row_committed_after_a_higher_id_was_read(
    backend: PostgresBackend,
) -> None:
    """Writer A holds its batch open (its rule waits) while writer B records: B waits for A,
    and a follower sees neither until A commits, then A's rows before B's."""
    journal = backend.journal()
    reader = backend.reader()
    journal.record_batch([ev(Op.LOGIN)])
    seen: list[dict[str, Any]] = []
    cursor = reader.scan(JournalFilter(), seen.append)
    assert [r["op"] for r in seen] == ["login"]

    inside, release = threading.Event(), threading.Event()

    def slow_rule(path: str, event: Event) -> JobSpec | None:
        inside.set()
        assert release.wait(30)
        return None

    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(journal.record_batch, [upload("/a.mp4")], slow_rule)
        assert inside.wait(30)
        b = pool.submit(journal.record_batch, [ev(Op.MKDIR, "/b")])
        # B cannot number (and so commit) its row while A is open: wait until B's statement
        # is seen waiting on A's lock in pg_stat_activity, then look.
        _wait_for_lock_wait(backend)
        assert not b.done()
        new: list[dict[str, Any]] = []
        cursor = reader.scan(JournalFilter(), new.append, after=cursor)
        assert new == []
        release.set()
        a.result(30)
        b.result(30)
    cursor = reader.scan(JournalFilter(), new.append, after=cursor)
    assert [(r["op"], r["path"]) for r in new] == [("close", "/a.mp4"), ("mkdir", "/b")]
    again: list[dict[str, Any]] = []
    reader.scan(JournalFilter(), again.append, after=cursor)
    assert again == []


def _wait_for_lock_wait(backend: PostgresBackend) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with backend._pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'UPDATE journal_ids%%'"
            ).fetchone()
        if row and row["n"] >= 1:
            return
        time.sleep(0.02)  # polling a condition, bounded by the deadline
    raise AssertionError("the second writer never waited for the first")


def test_follow_with_two_concurrent_writers_sees_every_row_once_in_order(
    backend: PostgresBackend,
) -> None:
    journal = backend.journal()
    reader = backend.reader()
    batches, per_batch = 150, 5
    done = threading.Event()

    def write(name: str) -> None:
        s = SessionInfo(id=name, remote_addr="192.0.2.1", remote_port=1, login=name)
        for n in range(batches):
            journal.record_batch([ev(Op.MKDIR, f"/{name}/{n}/{k}", session=s) for k in range(5)])

    seen: list[dict[str, Any]] = []

    def follow() -> None:
        cursor = None
        while not done.is_set():
            cursor = reader.scan(JournalFilter(), seen.append, after=cursor)
        reader.scan(JournalFilter(), seen.append, after=cursor)

    with ThreadPoolExecutor(3) as pool:
        follower = pool.submit(follow)
        writers = [pool.submit(write, name) for name in ("w1", "w2")]
        for w in writers:
            w.result(120)
        done.set()
        follower.result(120)
    ids = [r["id"] for r in seen]
    assert len(ids) == 2 * batches * per_batch
    assert ids == sorted(set(ids))  # each once, in order
    for name in ("w1", "w2"):  # each writer's rows in its own order
        mine = [r["path"] for r in seen if r["session_id"] == name]
        assert mine == [f"/{name}/{n}/{k}" for n in range(batches) for k in range(per_batch)]


# -- prune ------------------------------------------------------------------------------


def test_prune_removes_old_rows_but_never_an_active_jobs_upload(backend: PostgresBackend) -> None:
    journal = backend.journal()
    old = time.time() - 1000
    rule = lambda path, event: JobSpec(max_attempts=3)  # noqa: E731
    journal.record_batch([ev(Op.LOGIN, time=old), ev(Op.MKDIR, "/old", time=old)])
    active = journal.record_batch([upload("/keep.mp4", time=old)], rule).jobs[0]
    journal.record_batch([ev(Op.MKDIR, "/new")])
    report = backend.pruner().prune(time.time() - 100, batch=1)
    assert report.removed.get("operations") == 2  # login and mkdir, one per transaction
    paths = [r["path"] for r in all_rows(backend)]
    assert paths == ["/keep.mp4", "/new"]
    assert backend.jobs().get(active).state.value == "queued"


# -- bans and usage ---------------------------------------------------------------------


def test_an_ended_ban_is_reported_lifted_to_exactly_one_of_racing_gateways(
    backend: PostgresBackend,
) -> None:
    bans = backend.bans()
    now = time.time()
    bans.upsert(
        [Ban("192.0.2.9", now - 1, 1, "test", now - 60), Ban("192.0.2.10", now + 60, 1, "t", now)]
    )
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: backend.bans().load(now, 3600), range(4)))
    lifted = [b.address for _, ended in results for b in ended]
    assert lifted == ["192.0.2.9"]
    assert [b.address for b in bans.list()] == ["192.0.2.10", "192.0.2.9"]
    removed = bans.remove("192.0.2.10")
    assert removed is not None and removed.reason == "t"


def test_usage_adds_up_across_connections_and_never_goes_below_zero(
    backend: PostgresBackend,
) -> None:
    usage = backend.usage()
    assert usage.add("alice", 5, 1) is None
    usage.store("alice", 100, 2)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: backend.usage().add("alice", 10, 1), range(20)))
    assert usage.load("alice") == (300, 22)
    assert usage.add("alice", -10_000, -100) == (0, 0)


def test_names_with_nul_or_no_utf8_are_journaled_escaped_never_lost(
    backend: PostgresBackend,
) -> None:
    """PostgreSQL text holds no NUL, and a name that is not UTF-8 arrives as lone surrogates:
    both are stored escaped, as the journal's table shows them, so no record is lost."""
    bad = "/a\x00b\udcff.mp4"
    backend.journal().record_batch([ev(Op.OPEN, bad, status="no_such_file", message="x\x00")])
    (row,) = all_rows(backend)
    assert (row["path"], row["message"]) == ("/a\\x00b\\udcff.mp4", "x\\x00")
