"""The admin API's storage port (``AdminStore``) on every backend: one contract, SQLite and
PostgreSQL (tests/contract_kit.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract_kit import BACKENDS, fresh_backend, opened, session
from sftpgate.errors import NotFoundError
from sftpgate.events import Event, Op, UploadState
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.ports import Backend, Conflict, JobSpec, ReplayFile


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from fresh_backend(request, tmp_path)


def test_live_sessions_and_a_disconnect_request_taken_by_exactly_one(backend: Backend) -> None:
    live, other, ended = session("live"), session("other", "bob", "gw2"), session("ended")
    with opened(backend.journal()) as journal:
        journal.record_batch(
            [Event(Op.LOGIN, live), Event(Op.LOGIN, other), Event(Op.LOGIN, ended)]
        )
        journal.record_batch([Event(Op.LOGOUT, ended)])
    with opened(backend.admin()) as first, opened(backend.admin()) as second:
        assert [s["id"] for s in first.sessions()] == ["live", "other"]
        assert [s["id"] for s in first.sessions(node="gw2")] == ["other"]
        assert [s["id"] for s in first.sessions(login="alice")] == ["live"]
        with pytest.raises(NotFoundError):
            first.request_disconnect("ended", "ops", time.time())
        row = first.request_disconnect("live", "ops", time.time())
        assert row["id"] == "live" and row["disconnect_requested_at"] is not None
        assert second.disconnects(time.time(), 3600) == ["live"]
        assert first.disconnected("live", time.time()) == "ops"
        assert second.disconnected("live", time.time()) is None  # the other process lost
        assert second.disconnects(time.time(), 3600) == []
        # An old request nobody acted on is dropped.
        first.request_disconnect("other", "ops", time.time() - 7200)
        assert first.disconnects(time.time(), 3600) == []


def test_admin_rows_are_journaled_in_one_batch(backend: Backend) -> None:
    api = session("api", login="ops")
    with opened(backend.admin()) as admin:
        admin.journal(
            [Event(Op.ADMIN, api, path="/v1/jobs", status="http_401"), Event(Op.ADMIN, api)]
        )
    rows: list[dict[str, object]] = []
    with opened(backend.reader()) as reader:
        reader.scan(JournalFilter(ops=("admin",)), rows.append)
    assert [(r["path"], r["status"]) for r in rows] == [("/v1/jobs", "http_401"), (None, "ok")]


def test_replay_queues_one_job_for_a_complete_upload_only(backend: Backend) -> None:
    s = session("up")
    done = Event(
        Op.CLOSE, s, path="/a.mp4", bytes_written=3, upload=UploadState.COMPLETE, device=1, inode=2
    )
    cut = Event(Op.CLOSE, s, path="/b.mp4", bytes_written=3, upload=UploadState.INCOMPLETE)
    with opened(backend.journal()) as journal:
        (job_id,) = journal.record_batch(
            [Event(Op.LOGIN, s), done, cut], lambda path, event: JobSpec(3)
        ).jobs
    with opened(backend.admin()) as admin, opened(backend.jobs()) as jobs:
        first = admin.upload(1)
        assert first is not None
        assert (first["path"], first["device"], first["inode"]) == ("/a.mp4", 1, 2)
        with pytest.raises(Conflict):
            admin.replay(1, ReplayFile(1, 2), 3)  # its job is still queued
        jobs.cancel(job_id)
        again = admin.replay(1, ReplayFile(1, 2), 3)
        job = jobs.get(again)
        assert (job.upload_id, job.state.value, job.login) == (1, "queued", "alice")
        assert job.data == {"device": 1, "inode": 2, "replay": True}
        with pytest.raises(Conflict):
            admin.replay(2, ReplayFile(1, 3), 3)  # incomplete
        with pytest.raises(NotFoundError):
            admin.replay(99, ReplayFile(1, 2), 3)
        assert admin.upload(99) is None
