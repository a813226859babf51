"""Storage contract, journal side: record, query, follow, prune (ports.JournalStore,
JournalReader, JournalPruner), and the schema's migrations. Runs against every backend
in contract_kit.BACKENDS, unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract_kit import BACKENDS, collect, fresh_backend, opened, session, upload
from sftpgate.events import Event, Op, UploadState
from sftpgate.jobs.model import JobState
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.ports import Backend, JobSpec

T0 = 1_700_000_000.0  # an old day: rows at T0 + n are long past any retention
DAY = 86400.0


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from fresh_backend(request, tmp_path)


def _mp4s(path: str, event: Event) -> JobSpec | None:
    return JobSpec(max_attempts=3) if path.endswith(".mp4") else None


# -- schema -------------------------------------------------------------------------


def test_migrate_brings_the_schema_to_latest_once(backend: Backend) -> None:
    assert backend.schema_version() == backend.latest
    assert backend.migrate() == []  # nothing left to run; running it again is harmless


def test_a_fresh_database_has_no_schema_until_migrated(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    for name, make in BACKENDS.items():
        fresh = make(request, tmp_path / name)
        assert fresh.schema_version() == 0
        applied = fresh.migrate()
        assert applied and applied[-1] == fresh.latest and applied == sorted(applied)
        assert fresh.schema_version() == fresh.latest


# -- recording -----------------------------------------------------------------------


def test_a_batch_records_operations_in_order_and_its_uploads_jobs_with_them(
    backend: Backend,
) -> None:
    alice, bob = session("s1", "alice", "gw1"), session("s2", "bob", "gw2")
    seen: list[str] = []

    def rule(path: str, event: Event) -> JobSpec | None:
        seen.append(path)
        return _mp4s(path, event)

    events = [
        Event(Op.LOGIN, alice, time=T0),
        upload(alice, "/a.mp4", T0 + 1),
        upload(alice, "/notes.txt", T0 + 2),
        upload(bob, "/cut.mp4", T0 + 3, state=UploadState.INCOMPLETE),
        Event(
            Op.RENAME, bob, time=T0 + 4, path="/b.part", path2="/b.mp4", upload=UploadState.COMPLETE
        ),
        Event(Op.LOGOUT, alice, time=T0 + 5),
    ]
    with opened(backend.journal()) as journal:
        result = journal.record_batch(events, rule)
    # The rule is asked about complete uploads only, by their final name.
    assert seen == ["/a.mp4", "/notes.txt", "/b.mp4"]
    assert len(result.jobs) == 2
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter())
    assert [(r["op"], r["path"], r["login"]) for r in rows] == [
        ("login", None, "alice"),
        ("close", "/a.mp4", "alice"),
        ("close", "/notes.txt", "alice"),
        ("close", "/cut.mp4", "bob"),
        ("rename", "/b.part", "bob"),
        ("logout", None, "alice"),
    ]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert rows[0]["node"] == "gw1" and rows[0]["remote_port"] == 50000
    with opened(backend.jobs()) as jobs:
        made = [jobs.get(job_id) for job_id in result.jobs]
    assert [(j.path, j.login, j.state, j.max_attempts) for j in made] == [
        ("/a.mp4", "alice", JobState.QUEUED, 3),
        ("/b.mp4", "bob", JobState.QUEUED, 3),
    ]
    assert [j.node for j in made] == ["gw1", "gw2"]
    assert all(j.upload_id is not None for j in made)


def test_a_rule_that_raises_leaves_nothing_of_its_batch(backend: Backend) -> None:
    alice = session()

    def broken(path: str, event: Event) -> JobSpec | None:
        raise ValueError("no")

    with opened(backend.journal()) as journal:
        journal.record_batch([Event(Op.MKDIR, alice, time=T0, path="/kept")])
        with pytest.raises(ValueError):
            journal.record_batch(
                [
                    Event(Op.MKDIR, alice, time=T0 + 1, path="/lost"),
                    upload(alice, "/x.mp4", T0 + 2),
                ],
                broken,
            )
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter())
    with opened(backend.jobs()) as jobs:
        assert jobs.list() == []
    assert [r["path"] for r in rows] == ["/kept"]


def test_an_event_key_is_recorded_once_across_batches(backend: Backend) -> None:
    alice = session()
    with opened(backend.journal()) as journal:
        first = journal.record_batch([upload(alice, "/a.mp4", T0)], _mp4s)
        again = Event(
            Op.CLOSE,
            alice,
            time=T0,
            path="/a.mp4",
            bytes_written=100,
            upload=UploadState.COMPLETE,
            key="tap:1",
        )
        journal.record_batch([again], _mp4s)
        second = journal.record_batch([again], _mp4s)  # the spool replays it
    assert len(first.jobs) == 1 and second.jobs == ()
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter())
    assert len(rows) == 2


def test_a_queue_cap_records_a_refusal_instead_of_a_job_to_run(backend: Backend) -> None:
    alice = session()
    capped = lambda path, event: JobSpec(max_attempts=3, queue_cap=1)  # noqa: E731
    with opened(backend.journal()) as journal:
        ids = [
            journal.record_batch([upload(alice, f"/{n}.mp4", T0 + n)], capped).jobs[0]
            for n in range(2)
        ]
    with opened(backend.jobs()) as jobs:
        first, second = (jobs.get(i) for i in ids)
    assert first.outcome is None
    assert second.outcome == "refused" and "already waiting" in second.data["refused"]


# -- querying ------------------------------------------------------------------------


def _seed(backend: Backend) -> None:
    alice, bob = session("s1", "alice", "gw1"), session("s2", "bob", "gw2")
    events = [
        Event(Op.LOGIN, alice, time=T0),
        Event(Op.LOGIN, bob, time=T0 + 1),
        upload(alice, "/in/a.mp4", T0 + 10),
        Event(Op.CLOSE, bob, time=T0 + 20, path="/out/b.bin", bytes_read=7),
        Event(Op.REMOVE, bob, time=T0 + 30, path="/in/gone", status="permission_denied"),
        upload(bob, "/in/c.zip", T0 + 40, state=UploadState.INCOMPLETE),
        Event(Op.MKDIR, alice, time=T0 + 50, path="/in/new"),
    ]
    with opened(backend.journal()) as journal:
        journal.record_batch(events)


@pytest.mark.parametrize(
    ("flt", "paths"),
    [
        (JournalFilter(user="bob"), [None, "/out/b.bin", "/in/gone", "/in/c.zip"]),
        (JournalFilter(since=T0 + 20, until=T0 + 40), ["/out/b.bin", "/in/gone"]),
        (JournalFilter(ops=("mkdir", "remove")), ["/in/gone", "/in/new"]),
        (JournalFilter(path_glob="/in/*"), ["/in/a.mp4", "/in/gone", "/in/c.zip", "/in/new"]),
        (JournalFilter(session="s1"), [None, "/in/a.mp4", "/in/new"]),
        (JournalFilter(failed_only=True), ["/in/gone"]),
        (JournalFilter(limit=2), ["/in/c.zip", "/in/new"]),
        (JournalFilter(node="gw2", ops=("close",)), ["/out/b.bin", "/in/c.zip"]),
    ],
)
def test_query_filters_select_and_order(
    backend: Backend, flt: JournalFilter, paths: list[str | None]
) -> None:
    _seed(backend)
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, flt)
    assert [r["path"] for r in rows] == paths


def test_transfers_are_closes_with_bytes_and_their_upload_state(backend: Backend) -> None:
    _seed(backend)
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter(ops=("mkdir",)), transfers=True)
    assert [(r["path"], r["upload_state"]) for r in rows] == [
        ("/in/a.mp4", "complete"),
        ("/out/b.bin", None),
        ("/in/c.zip", "incomplete"),
    ]


def test_following_emits_every_committed_row_once(backend: Backend) -> None:
    alice = session()
    with opened(backend.journal()) as journal, opened(backend.reader()) as reader:
        rows, cursor = collect(reader, JournalFilter())
        assert rows == []
        followed: list[str] = []
        for n in range(5):
            journal.record_batch(
                [Event(Op.MKDIR, alice, time=T0 + n, path=f"/d{n}.{i}") for i in range(3)]
            )
            if n % 2:  # sometimes twice in a row with nothing new
                cursor = reader.scan(
                    JournalFilter(), lambda r: followed.append(r["path"]), after=cursor
                )
            cursor = reader.scan(
                JournalFilter(), lambda r: followed.append(r["path"]), after=cursor
            )
        # A filter is applied to the new rows too, and the cursor still passes the others.
        only = JournalFilter(path_glob="/d9*")
        journal.record_batch(
            [
                Event(Op.MKDIR, alice, time=T0, path="/x"),
                Event(Op.MKDIR, alice, time=T0, path="/d9"),
            ]
        )
        late: list[str] = []
        cursor = reader.scan(only, lambda r: late.append(r["path"]), after=cursor)
        assert (
            reader.scan(JournalFilter(), lambda r: late.append(r["path"]), after=cursor) == cursor
        )
    assert followed == [f"/d{n}.{i}" for n in range(5) for i in range(3)]
    assert late == ["/d9"]


# -- retention -----------------------------------------------------------------------


def test_prune_removes_old_rows_but_never_an_active_jobs(backend: Backend) -> None:
    old, new = session("old", "alice", "gw1"), session("new", "alice", "gw1")
    # Jobs end at the store's clock (now), so the cutoff is a minute ahead and the rows
    # that must stay are stamped a day ahead.
    recent = time.time() + DAY
    with opened(backend.journal()) as journal:
        done, queued, running = journal.record_batch(
            [
                Event(Op.LOGIN, old, time=T0),
                upload(old, "/done.mp4", T0 + 1),
                upload(old, "/waits.mp4", T0 + 2),
                upload(old, "/runs.mp4", T0 + 3),
                *[Event(Op.STAT, old, time=T0 + 4, path=f"/s{n}") for n in range(7)],
                upload(old, "/notes.txt", T0 + 5),
                Event(Op.LOGOUT, old, time=T0 + 6),
            ],
            _mp4s,
        ).jobs
        journal.record_batch([Event(Op.LOGIN, new, time=recent), upload(new, "/fresh.txt", recent)])
    with opened(backend.jobs()) as jobs:
        # Lease the oldest job and finish it, then lease the next and keep it running.
        first = jobs.lease("w1", 60)
        assert first is not None and first.id == done
        jobs.finish(first, "w1", JobState.SUCCEEDED, outcome="converted")
        second = jobs.lease("w1", 60)
        assert second is not None and second.id == queued
        jobs.release(second, "w1")  # queued again: still active
        third = jobs.lease("w1", 60, per_user=None)
        assert third is not None
    with opened(backend.pruner()) as pruner:
        cutoff = time.time() + 60
        report = pruner.prune(cutoff, batch=2)  # several small batches
        assert report.removed.get("jobs") == 1
        again = pruner.prune(cutoff, batch=2)
        assert again.total == 0
    with opened(backend.jobs()) as jobs:
        left = {j.id: j for j in jobs.list()}
        assert set(left) == {queued, running}
        assert all(jobs.upload_time(j.upload_id) is not None for j in left.values())
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter())
    kept = [(r["path"], r["session_id"]) for r in rows]
    # The active jobs' uploads (and the operations they point at) stay, with their
    # session; the finished job's, the plain rows and the old session's others go.
    assert ("/waits.mp4", "old") in kept and ("/runs.mp4", "old") in kept
    assert ("/done.mp4", "old") not in kept and ("/notes.txt", "old") not in kept
    assert not any(path and path.startswith("/s") for path, _ in kept)
    assert kept[-2:] == [(None, "new"), ("/fresh.txt", "new")]
    assert rows[-3]["remote_port"] == 50000  # the old session's row is kept for them


def test_prune_of_everything_old_never_reuses_ids(backend: Backend) -> None:
    alice = session()
    with opened(backend.journal()) as journal, opened(backend.reader()) as reader:
        journal.record_batch([Event(Op.MKDIR, alice, time=T0 + n, path=f"/{n}") for n in range(5)])
        _, cursor = collect(reader, JournalFilter())
        with opened(backend.pruner()) as pruner:
            pruner.prune(time.time())
        journal.record_batch([Event(Op.MKDIR, alice, time=time.time(), path="/after")])
        new: list[str] = []
        reader.scan(JournalFilter(), lambda r: new.append(r["path"]), after=cursor)
    assert new == ["/after"]  # a follower that had read up to the pruned rows misses nothing
