"""The commands on `database.url: postgresql://…` against a real PostgreSQL: `sftpgate db
migrate|status`, `sftpgate journal` (query, --follow while two writers commit, prune)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import pg_kit
from conftest import write_config
from sftpgate.cli.main import main
from sftpgate.events import Event, Op, SessionInfo
from sftpgate.storage.postgres.backend import PostgresBackend
from sftpgate.storage.postgres.schema import LATEST


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


@pytest.fixture
def setup(
    pg: pg_kit.PgServer, tmp_path: Path, user_keys: dict[str, Path]
) -> Iterator[tuple[str, str]]:
    with pg.database() as url:
        cfg = write_config(tmp_path, user_keys, {"database": {"url": url}})
        yield str(cfg), url


def _session(sid: str, node: str = "gw1") -> SessionInfo:
    return SessionInfo(id=sid, remote_addr="192.0.2.7", remote_port=1, login="alice", node=node)


def test_db_status_says_behind_until_db_migrate_runs(
    setup: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _ = setup
    assert main(["db", "status", "-c", cfg]) == 1
    assert "run `sftpgate db migrate`" in capsys.readouterr().out
    assert main(["journal", "-c", cfg]) == 2  # refused, naming the command
    assert "sftpgate db migrate" in capsys.readouterr().err
    assert main(["db", "migrate", "-c", cfg, "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["backend"] == "postgresql" and done["applied"] == list(range(1, LATEST + 1))
    assert main(["db", "status", "-c", cfg]) == 0
    current = f"postgresql schema version {LATEST}, this sftpgate's {LATEST}: current"
    assert current in capsys.readouterr().out


def test_journal_reads_filters_and_prunes_on_postgresql(
    setup: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, url = setup
    assert main(["db", "migrate", "-c", cfg]) == 0
    backend = PostgresBackend(url, size=2)
    try:
        old = time.time() - 3 * 86400
        with_close = backend.journal()
        with_close.record_batch(
            [
                Event(Op.LOGIN, _session("a", "gw1"), time=old),
                Event(Op.MKDIR, _session("a", "gw1"), time=old, path="/old"),
                Event(Op.LOGIN, _session("b", "gw2")),
                Event(Op.MKDIR, _session("b", "gw2"), path="/new"),
            ]
        )
        with_close.close()
    finally:
        backend.close()
    capsys.readouterr()
    assert main(["journal", "-c", cfg, "--json", "--node", "gw2", "--op", "mkdir"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["path"], r["node"]) for r in rows] == [("/new", "gw2")]
    assert main(["journal", "prune", "-c", cfg, "--before", "1d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"]["operations"] == 2
    assert main(["journal", "-c", cfg, "--json"]) == 0
    paths = [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()]
    assert paths == [None, "/new"]


def test_journal_follow_on_postgresql_prints_every_row_of_two_concurrent_writers_once(
    setup: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, url = setup
    assert main(["db", "migrate", "-c", cfg]) == 0
    capsys.readouterr()
    backend = PostgresBackend(url, size=4)
    try:
        argv = ["journal", "-c", cfg, "--json", "--follow", "--interval", "0.02"]
        with ThreadPoolExecutor(3) as pool:
            started = time.monotonic()
            follower = pool.submit(main, [*argv, "--follow-for", "8"])

            def write(name: str) -> None:
                journal = backend.journal()
                for n in range(60):
                    journal.record_batch(
                        [Event(Op.MKDIR, _session(name), path=f"/{name}/{n}/{k}") for k in range(3)]
                    )
                journal.close()

            for w in [pool.submit(write, "w1"), pool.submit(write, "w2")]:
                w.result(60)
            # The follower looks every 20 ms until its 8 s are up: the writers' last rows
            # (committed long before) are read by then.
            assert time.monotonic() < started + 7, "writers too slow for the follow window"
            assert follower.result(60) == 0
    finally:
        backend.close()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == 2 * 60 * 3 and ids == sorted(set(ids))


def test_bans_cli_on_postgresql_adds_lists_and_removes(
    setup: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, url = setup
    assert main(["db", "migrate", "-c", cfg]) == 0
    assert main(["bans", "add", "192.0.2.5", "-c", cfg, "--reason", "abuse"]) == 0
    capsys.readouterr()
    assert main(["bans", "list", "-c", cfg, "--json"]) == 0
    (ban,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (ban["address"], ban["reason"], ban["active"]) == ("192.0.2.5", "abuse", True)
    backend = PostgresBackend(url, size=1)
    try:
        assert [b.address for b in backend.bans().list()] == ["192.0.2.5"]  # in PostgreSQL
    finally:
        backend.close()
    assert main(["bans", "remove", "192.0.2.5", "-c", cfg]) == 0
    capsys.readouterr()
    assert main(["bans", "list", "-c", cfg, "--json"]) == 0
    assert capsys.readouterr().out == ""
