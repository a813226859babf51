"""`sftpgate journal prune`: journal.retention or --before; what it removes and keeps is
the contract suite's (test_contract_journal.py); here, the command around it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import write_config
from sftpgate.cli.main import main
from sftpgate.config import load_config
from sftpgate.errors import ConfigError
from sftpgate.events import Event, Op, SessionInfo
from sftpgate.journal.store import SQLiteJournal

DAY = 86400.0


def _seed(journal: Path) -> None:
    who = SessionInfo(id="s", remote_addr="192.0.2.1", remote_port=22, login="alice", node="gw1")
    now = time.time()
    store = SQLiteJournal(journal, synchronous="normal")
    try:
        store.record_batch(
            [Event(Op.LOGIN, who, time=now)]
            + [Event(Op.MKDIR, who, time=now - 500 * DAY, path=f"/old{n}") for n in range(3)]
            + [Event(Op.MKDIR, who, time=now - 10 * DAY, path="/recent")]
            + [Event(Op.MKDIR, who, time=now, path="/today")]
        )
    finally:
        store.close()


def test_prune_uses_journal_retention_or_before(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(write_config(tmp_path, user_keys, {"journal": {"retention": "400d"}}))
    _seed(tmp_path / "state" / "journal.sqlite3")
    assert main(["journal", "prune", "-c", cfg]) == 0
    assert "pruned 3 rows" in capsys.readouterr().out
    assert main(["journal", "prune", "-c", cfg, "--before", "1d", "--batch", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["removed"]["operations"] == 1
    assert main(["journal", "-c", cfg, "--json"]) == 0
    paths = [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()]
    assert paths == [None, "/today"]  # the login, and today's


def test_prune_without_a_retention_needs_before(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(write_config(tmp_path, user_keys))
    assert main(["journal", "prune", "-c", cfg]) == 2
    assert "--before, or set journal.retention" in capsys.readouterr().err
    assert main(["journal", "prune", "-c", cfg, "--before", "soon"]) == 2
    assert main(["journal", "prune", "-c", cfg, "--before", "1d", "--batch", "0"]) == 2


@pytest.mark.parametrize(
    ("text", "seconds"), [("400d", 400 * DAY), ("12w", 12 * 7 * DAY), (3600, 3600.0)]
)
def test_retention_takes_a_duration(
    tmp_path: Path, user_keys: dict[str, Path], text: object, seconds: float
) -> None:
    config = load_config(write_config(tmp_path, user_keys, {"journal": {"retention": text}}))
    assert config.journal.retention == seconds


@pytest.mark.parametrize("bad", ["forever", "-3d", 0])
def test_a_bad_retention_names_the_key(
    tmp_path: Path, user_keys: dict[str, Path], bad: object
) -> None:
    with pytest.raises(ConfigError, match=r"journal\.retention"):
        load_config(write_config(tmp_path, user_keys, {"journal": {"retention": bad}}))


def test_the_table_and_a_node_filter_show_the_sessions_host(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(write_config(tmp_path, user_keys))
    _seed(tmp_path / "state" / "journal.sqlite3")
    assert main(["journal", "-c", cfg, "--path", "/today"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["TIME", "USER", "REMOTE", "NODE", "OP"]
    assert row.split()[3] == "gw1"
    assert main(["journal", "-c", cfg, "--node", "gw1", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    assert main(["journal", "-c", cfg, "--node", "gw2"]) == 0
    assert "no matching operations" in capsys.readouterr().err
