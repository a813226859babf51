"""Storage contract: the defender's bans and the quota usage ledger, on every backend in
contract_kit.BACKENDS, unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contract_kit import BACKENDS, collect, fresh_backend, opened, session
from sftpgate.defender import Ban
from sftpgate.events import Event, Op
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.ports import Backend

NOW = 1_800_000_000.0


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from fresh_backend(request, tmp_path)


def test_a_newer_ban_replaces_an_older_one_never_the_reverse(backend: Backend) -> None:
    with opened(backend.bans()) as bans:
        bans.upsert([Ban("192.0.2.1", NOW + 60, 1, "auth", NOW)])
        bans.upsert([Ban("192.0.2.1", NOW + 600, 2, "auth again", NOW + 10)])
        bans.upsert([Ban("192.0.2.1", NOW + 5, 1, "stale", NOW - 100)])  # a slow gateway's
        bans.upsert([])
        assert bans.list() == [Ban("192.0.2.1", NOW + 600, 2, "auth again", NOW + 10)]


def test_a_ban_that_ended_is_lifted_once_and_forgotten_later(backend: Backend) -> None:
    with opened(backend.bans()) as first, opened(backend.bans()) as second:
        first.upsert(
            [
                Ban("192.0.2.1", NOW - 10, 1, "ended", NOW - 70),
                Ban("192.0.2.2", NOW + 60, 1, "on", NOW),
            ]
        )
        rows, lifted = first.load(NOW, memory=86400)
        assert [b.address for b in rows] == ["192.0.2.1", "192.0.2.2"]
        assert [b.address for b in lifted] == ["192.0.2.1"]
        # Another gateway on the same database does not journal its end again.
        assert second.load(NOW, memory=86400)[1] == []
        rows, _ = second.load(NOW + 86400, memory=86400)  # a day after it ended: forgotten
        assert [b.address for b in rows] == ["192.0.2.2"]
        assert second.remove("192.0.2.2") is not None
        assert second.remove("192.0.2.2") is None
        assert first.list() == []


def test_an_admins_ban_is_journaled(backend: Backend) -> None:
    with opened(backend.bans()) as bans:
        bans.journal(Event(Op.BAN, session("admin", "root"), time=NOW, path="192.0.2.9"))
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter(ops=("ban",)))
    assert [r["path"] for r in rows] == ["192.0.2.9"]


def test_usage_is_stored_added_up_and_forgotten(backend: Backend) -> None:
    with opened(backend.usage()) as usage, opened(backend.usage()) as other:
        assert usage.load("alice") is None
        assert usage.add("alice", 10, 1) is None  # nothing stored: nothing to add to
        usage.store("alice", 1000, 10)
        assert usage.add("alice", 500, 2) == (1500, 12)
        assert other.add("alice", -200, -1) == (1300, 11)  # two gateways add up
        assert usage.add("alice", -(10**6), -100) == (0, 0)  # never below zero
        usage.store("alice", 7, 1)
        assert other.load("alice") == (7, 1)
        usage.forget("alice")
        assert other.load("alice") is None


def test_active_counts_the_bans_still_on_at_a_time(backend: Backend) -> None:
    with opened(backend.bans()) as bans:
        assert bans.active(NOW) == 0
        bans.upsert(
            [
                Ban("192.0.2.1", NOW - 10, 1, "ended", NOW - 70),
                Ban("192.0.2.2", NOW + 60, 1, "on", NOW),
                Ban("2001:db8::1", NOW + 600, 2, "on", NOW),
            ]
        )
        assert bans.active(NOW) == 2
        assert bans.active(NOW + 100) == 1
        assert bans.active(NOW - 20) == 3
