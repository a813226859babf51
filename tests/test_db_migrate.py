"""Versioned schema: `sftpgate db migrate` upgrades an older journal; every command refuses a
schema that is behind and names the command; a new journal is still created on first start."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from conftest import write_config
from sftpgate.cli.main import main
from sftpgate.config import load_config
from sftpgate.gateway import Gateway
from sftpgate.journal import store
from sftpgate.journal.writer import JournalWriter
from sftpgate.storage.ports import SchemaAhead, SchemaBehind


def _config(tmp_path: Path, user_keys: dict[str, Path], **journal: object) -> Path:
    return write_config(tmp_path, user_keys, {"journal": {"synchronous": "normal", **journal}})


def _journal(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


def _version_4(path: Path) -> None:
    """A journal as the last build before migrations made it (schema 4), with a row in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for statement in store.MIGRATIONS[3]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version=4")
        conn.execute(
            "INSERT INTO sessions (id, login, remote_addr, remote_port, result, started_at)"
            " VALUES ('old', 'alice', '192.0.2.1', 22, 'ok', ?)",
            (time.time(),),
        )
        conn.execute(
            "INSERT INTO operations (ts, session_id, login, op, path, status)"
            " VALUES (?, 'old', 'alice', 'mkdir', '/from-v4', 'ok')",
            (time.time(),),
        )


def test_a_journal_behind_is_refused_until_migrated(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(_config(tmp_path, user_keys))
    _version_4(_journal(tmp_path))
    # Reading, writing, serving: each refuses and names the command.
    for argv in (["journal", "-c", cfg], ["jobs", "-c", cfg, "list"], ["bans", "list", "-c", cfg]):
        assert main(argv) == 2
        assert "run `sftpgate db migrate -c <config>`" in capsys.readouterr().err
    with pytest.raises(SchemaBehind, match="sftpgate db migrate"):
        JournalWriter(_journal(tmp_path)).start()
    gateway = Gateway(load_config(cfg))
    with pytest.raises(SchemaBehind, match="sftpgate db migrate"):
        asyncio.run(gateway.start())
    asyncio.run(gateway.stop())
    assert main(["db", "status", "-c", cfg]) == 1
    assert f"version 4, this sftpgate's {store.SCHEMA_VERSION}: behind" in capsys.readouterr().out

    assert main(["db", "migrate", "-c", cfg]) == 0
    assert f"migrated to version {store.SCHEMA_VERSION} (5" in capsys.readouterr().out
    assert main(["db", "migrate", "-c", cfg]) == 0
    assert "is current" in capsys.readouterr().out
    assert main(["db", "status", "-c", cfg]) == 0
    # What the old build journaled is all there, with the new column empty.
    assert main(["journal", "-c", cfg, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"path": "/from-v4"' in out and '"node": null' in out


def test_a_newer_schema_is_never_written_by_an_older_sftpgate(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    with contextlib.closing(store.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version={store.SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaAhead, match="upgrade sftpgate"):
        store.connect(path)
    with pytest.raises(SchemaAhead), contextlib.closing(store.open_rw(path)) as conn:
        store.migrate(conn)


def test_the_first_start_creates_a_new_journal_with_no_extra_step(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    writer = JournalWriter(path)
    writer.start()
    writer.close()
    with contextlib.closing(store.connect(path, readonly=True)) as conn:
        assert store.schema_version(conn) == store.SCHEMA_VERSION
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_db_migrate_creates_a_private_journal(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(_config(tmp_path, user_keys))
    assert main(["db", "status", "-c", cfg, "--json"]) == 1
    assert '"version": 0' in capsys.readouterr().out
    assert main(["db", "migrate", "-c", cfg, "--json"]) == 0
    assert f'"version": {store.SCHEMA_VERSION}' in capsys.readouterr().out
    assert stat.S_IMODE(_journal(tmp_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(_journal(tmp_path).parent.stat().st_mode) == 0o700


def test_a_second_migrator_finds_nothing_left_to_run(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    _version_4(path)
    first, second = store.open_rw(path), store.open_rw(path)
    try:
        # Each step re-reads the version inside its write lock: the second finds nothing to do.
        assert store.migrate(first) == list(range(5, store.SCHEMA_VERSION + 1))
        assert store.migrate(second) == []
    finally:
        first.close()
        second.close()
