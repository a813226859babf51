"""``sftpgate journal``: the query layer, the formatters and the command, on a real journal."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sftpgate.cli.main import main
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.journal import formats
from sftpgate.journal.query import (
    OPERATION_COLUMNS,
    SESSION_COLUMNS,
    JournalFilter,
    build_query,
    build_transfers_query,
    fetch,
    fetch_transfers,
    parse_time,
)
from sftpgate.journal.store import connect
from sftpgate.journal.writer import JournalWriter

NOW = time.time()
DAY = 86400.0
EVIL_PATH = "/in/evil\nname with spaces\x1b[31m.txt"

ALICE = SessionInfo(
    id="sess-alice",
    remote_addr="192.0.2.10",
    remote_port=50001,
    login="alice",
    client_version="SSH-2.0-paramiko_3.4",
    auth_method="password",
    started_at=NOW - 2 * DAY,
)
BOB = SessionInfo(
    id="sess-bob",
    remote_addr="2001:db8::5",
    remote_port=40000,
    login="bob",
    client_version="SSH-2.0-OpenSSH_9.6",
    auth_method="publickey",
    started_at=NOW - 1800,
)
ROOT = SessionInfo(id="sess-root", remote_addr="198.51.100.7", remote_port=61000, login="root")


def journal_events() -> list[Event]:
    """Two users' sessions and a failed login, oldest first."""
    a, b = NOW - 2 * DAY, NOW - 1800
    return [
        Event(Op.LOGIN, ALICE, time=a),
        Event(Op.OPEN, ALICE, time=a + 1, path="/in/report.csv", flags=0x1A),
        Event(
            Op.CLOSE,
            ALICE,
            time=a + 3,
            path="/in/report.csv",
            bytes_written=1000,
            duration=2.4,
            upload=UploadState.COMPLETE,
        ),
        Event(Op.RENAME, ALICE, time=a + 4, path="/in/report.csv", path2="/done/report.csv"),
        Event(
            Op.LOGIN_FAILED, ROOT, time=NOW - 3 * 3600, status="permission_denied", message="bad"
        ),
        Event(Op.LOGIN, BOB, time=b),
        Event(Op.CLOSE, BOB, time=b + 60, path="/out/data.bin", bytes_read=5000, duration=0.6),
        Event(
            Op.CLOSE,
            BOB,
            time=b + 600,
            path="/in/partial.zip",
            bytes_written=300,
            duration=10.0,
            upload=UploadState.INCOMPLETE,
        ),
        Event(
            Op.REMOVE,
            BOB,
            time=b + 1200,
            path="/etc/passwd",
            status="permission_denied",
            message="outside the home folder",
        ),
        Event(Op.OPEN, BOB, time=b + 1500, path=EVIL_PATH),
        Event(
            Op.CLOSE,
            BOB,
            time=b + 1501,
            path=EVIL_PATH,
            bytes_written=10,
            duration=0.1,
            upload=UploadState.COMPLETE,
        ),
    ]


def write(path: Path, events: list[Event]) -> None:
    writer = JournalWriter(path, synchronous="normal")
    writer.start()
    for event in events:
        writer.emit(event)
    writer.close()


@dataclass
class Journal:
    path: Path
    config: Path
    conn: sqlite3.Connection

    def rows(self, **criteria: Any) -> list[dict[str, Any]]:
        return fetch(self.conn, JournalFilter(**criteria))

    def ops(self, **criteria: Any) -> list[tuple[str | None, str, str | None]]:
        return [(r["login"], r["op"], r["path"]) for r in self.rows(**criteria)]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    state = tmp_path / "state"
    path = state / "journal.sqlite3"
    write(path, journal_events())
    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  state_dir: {json.dumps(str(state))}\nusers: []\n")
    conn = connect(path, readonly=True)
    try:
        yield Journal(path, config, conn)
    finally:
        conn.close()


def cli(journal: Journal, *args: str) -> int:
    return main(["journal", "--config", str(journal.config), *args])


# -- the query layer ----------------------------------------------------------------------------


def test_no_filter_returns_every_operation_in_id_order(journal: Journal) -> None:
    rows = journal.rows()
    assert len(rows) == len(journal_events())
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert list(rows[0]) == [*OPERATION_COLUMNS, *SESSION_COLUMNS]


def test_rows_carry_port_client_and_auth_method_from_the_session(journal: Journal) -> None:
    row = journal.rows(user="bob", ops=("login",))[0]
    assert (row["remote_addr"], row["remote_port"]) == ("2001:db8::5", 40000)
    assert row["client_version"] == "SSH-2.0-OpenSSH_9.6"
    assert row["auth_method"] == "publickey"


def test_user_filter_matches_the_login_only(journal: Journal) -> None:
    assert {login for login, _, _ in journal.ops(user="alice")} == {"alice"}
    assert len(journal.rows(user="alice")) == 4
    assert journal.rows(user="nobody") == []


def test_relative_since_keeps_only_recent_operations(journal: Journal) -> None:
    recent = journal.ops(since=parse_time("1h", NOW))
    assert {login for login, _, _ in recent} == {"bob"}
    assert len(recent) == 6
    assert len(journal.rows(since=parse_time("4h", NOW))) == 7  # plus the failed root login


def test_iso_until_keeps_only_older_operations(journal: Journal) -> None:
    until = datetime.fromtimestamp(NOW - DAY).strftime("%Y-%m-%dT%H:%M:%S")
    assert [op for _, op, _ in journal.ops(until=parse_time(until, NOW))] == [
        "login",
        "open",
        "close",
        "rename",
    ]


def test_since_and_until_together_select_a_window(journal: Journal) -> None:
    window = journal.ops(since=parse_time("4h", NOW), until=parse_time("1h", NOW))
    assert window == [("root", "login_failed", None)]


def test_op_filter_accepts_several_operations(journal: Journal) -> None:
    ops = [op for _, op, _ in journal.ops(ops=("rename", "remove"))]
    assert ops == ["rename", "remove"]


def test_path_glob_matches_the_path_or_the_rename_target(journal: Journal) -> None:
    assert journal.ops(path_glob="/done/*") == [("alice", "rename", "/in/report.csv")]
    assert {p for _, _, p in journal.ops(path_glob="/in/*.zip")} == {"/in/partial.zip"}
    assert len(journal.rows(path_glob="*spaces*")) == 2  # '*' also crosses newlines


def test_session_filter_selects_one_session(journal: Journal) -> None:
    rows = journal.rows(session="sess-alice")
    assert {r["session_id"] for r in rows} == {"sess-alice"}
    assert len(rows) == 4


def test_failed_only_keeps_operations_whose_status_is_not_ok(journal: Journal) -> None:
    failed = journal.rows(failed_only=True)
    assert [(r["op"], r["status"]) for r in failed] == [
        ("login_failed", "permission_denied"),
        ("remove", "permission_denied"),
    ]


def test_filters_combine_with_and(journal: Journal) -> None:
    rows = journal.ops(user="bob", ops=("close",), path_glob="/in/*")
    assert rows == [("bob", "close", "/in/partial.zip"), ("bob", "close", EVIL_PATH)]
    assert journal.rows(user="alice", failed_only=True) == []


def test_limit_keeps_the_last_rows_oldest_first(journal: Journal) -> None:
    everything = journal.rows()
    last_three = journal.rows(limit=3)
    assert last_three == everything[-3:]
    assert journal.rows(user="alice", limit=2) == journal.rows(user="alice")[-2:]


def test_after_id_returns_only_newer_rows(journal: Journal) -> None:
    everything = journal.rows()
    assert journal.rows(after_id=everything[-2]["id"]) == everything[-1:]


def test_build_query_rejects_a_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        build_query(JournalFilter(limit=-1))


@pytest.mark.parametrize(
    ("flt", "index"),
    [
        (JournalFilter(user="bob"), "operations_login_ts"),
        (JournalFilter(user="bob", since=NOW - 60), "operations_login_ts"),
        (JournalFilter(since=NOW - 60), "operations_ts"),
        (JournalFilter(since=NOW - 60, failed_only=True), "operations_ts"),
        (JournalFilter(ops=("remove",)), "operations_op_ts"),
        (JournalFilter(session="sess-bob"), "operations_session"),
        (JournalFilter(user="bob", after_id=5), "INTEGER PRIMARY KEY"),
    ],
)
def test_queries_are_answered_from_an_index(
    journal: Journal, flt: JournalFilter, index: str
) -> None:
    sql, params = build_query(flt)
    plan = " | ".join(row[3] for row in journal.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert index in plan
    assert "SCAN o" not in plan


def test_transfers_are_closes_with_bytes_and_their_upload_state(journal: Journal) -> None:
    rows = fetch_transfers(journal.conn, JournalFilter())
    assert [(r["path"], r["upload_state"]) for r in rows] == [
        ("/in/report.csv", "complete"),
        ("/out/data.bin", None),
        ("/in/partial.zip", "incomplete"),
        (EVIL_PATH, "complete"),
    ]
    sql, params = build_transfers_query(JournalFilter(user="bob"))
    plan = " | ".join(row[3] for row in journal.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "uploads_operation" in plan  # the upload found by its index, not a scan


def test_transfers_honour_the_other_filters(journal: Journal) -> None:
    rows = fetch_transfers(journal.conn, JournalFilter(user="bob", since=parse_time("25m", NOW)))
    assert [r["path"] for r in rows] == ["/in/partial.zip", EVIL_PATH]


# -- parse_time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 2 * DAY), ("1w", 7 * DAY), (" 2H ", 7200)],
)
def test_relative_times_count_back_from_now(text: str, seconds: float) -> None:
    assert parse_time(text, 1_000_000.0) == 1_000_000.0 - seconds


def test_naive_iso_time_is_local_time() -> None:
    assert parse_time("2026-11-23T10:00", 0) == datetime(2026, 11, 23, 10, 0).timestamp()
    assert parse_time("2026-11-23", 0) == datetime(2026, 11, 23).timestamp()


def test_iso_time_with_a_zone_is_exact() -> None:
    expected = datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp()
    assert parse_time("2026-11-23T10:00Z", 0) == expected
    assert parse_time("2026-11-23T11:00:00+01:00", 0) == expected


@pytest.mark.parametrize("text", ["yesterday", "15x", "-5m", "2026-13-01", "10:00 tomorrow"])
def test_bad_times_raise_a_clear_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a time.*15m.*2026-11-23T10:00"):
        parse_time(text, NOW)


def test_empty_time_raises_value_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        parse_time("  ", NOW)


# -- formats ------------------------------------------------------------------------------------


def test_table_escapes_control_characters_so_names_cannot_forge_lines(journal: Journal) -> None:
    rows = journal.rows()
    lines = formats.table(rows)
    assert len(lines) == len(rows) + 1
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    evil = [line for line in lines if "evil" in line]
    assert len(evil) == 2
    assert "/in/evil\\nname with spaces\\x1b[31m.txt" in evil[0]


def test_table_shows_time_user_remote_bytes_rename_target_and_message(journal: Journal) -> None:
    lines = formats.table(journal.rows(), header=False)
    first = lines[0]
    assert first.startswith(datetime.fromtimestamp(NOW - 2 * DAY).strftime("%Y-%m-%dT%H:%M:%S"))
    assert "192.0.2.10:50001" in first
    assert any("[2001:db8::5]:40000" in line and "r=5000" in line for line in lines)
    assert any("/in/report.csv -> /done/report.csv" in line for line in lines)
    assert any("permission_denied" in line and "outside the home folder" in line for line in lines)


def test_escape_is_unambiguous_and_covers_unicode_controls() -> None:
    assert formats.escape("a\\nb") == "a\\\\nb"
    assert formats.escape("a\nb") == "a\\nb"
    assert formats.escape("x\x7f\u202e\U000e0001") == "x\\x7f\\u202e\\U000e0001"
    assert formats.escape("plain name.txt") == "plain name.txt"


def test_json_lines_parse_with_column_names_and_utc_time(journal: Journal) -> None:
    rows = journal.rows()
    decoded = [json.loads(formats.json_line(row)) for row in rows]
    assert [d["id"] for d in decoded] == [r["id"] for r in rows]
    assert set(decoded[0]) == {*OPERATION_COLUMNS, *SESSION_COLUMNS, "time"}
    evil = next(d for d in decoded if d["op"] == "open" and d["login"] == "bob")
    assert evil["path"] == EVIL_PATH
    parsed = datetime.fromisoformat(evil["time"].replace("Z", "+00:00"))
    assert evil["time"].endswith("Z")
    assert parsed.timestamp() == pytest.approx(evil["ts"], abs=0.001)


def test_xferlog_lines_have_the_14_classic_fields(journal: Journal) -> None:
    rows = fetch_transfers(journal.conn, JournalFilter())
    lines = [formats.xferlog_line(row) for row in rows]
    by_path = {}
    for row, line in zip(rows, lines, strict=True):
        # current-time is ctime's 24 characters (it holds spaces, as in wu-ftpd).
        fields = [line[:24], *line[25:].split(" ")]
        assert len(fields) == 14, line
        assert time.strptime(fields[0], "%a %b %d %H:%M:%S %Y")
        assert fields[0] == time.ctime(row["ts"])
        assert fields[5:7] == ["b", "_"]
        assert fields[8:13] == ["r", row["login"], "sftp", "0", "*"]
        by_path[row["path"]] = fields
    upload, download = by_path["/in/report.csv"], by_path["/out/data.bin"]
    assert upload[1:5] == ["2", "192.0.2.10", "1000", "/in/report.csv"]
    assert (upload[7], upload[13]) == ("i", "c")
    assert download[1:5] == ["1", "2001:db8::5", "5000", "/out/data.bin"]
    assert (download[7], download[13]) == ("o", "c")
    assert (by_path["/in/partial.zip"][7], by_path["/in/partial.zip"][13]) == ("i", "i")
    assert by_path[EVIL_PATH][4] == "/in/evil_name_with_spaces_[31m.txt"


# -- the command --------------------------------------------------------------------------------


def test_cli_prints_a_table_with_escaped_names(
    journal: Journal, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(journal) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("TIME")
    assert len(lines) == 1 + len(journal_events())
    assert any("evil\\nname with spaces\\x1b[31m.txt" in line for line in lines)


def test_cli_json_with_filters(journal: Journal, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(journal, "--json", "--user", "bob", "--since", "1h", "--failed") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["op"], r["path"], r["status"]) for r in rows] == [
        ("remove", "/etc/passwd", "permission_denied")
    ]


def test_cli_op_is_repeatable_and_comma_separated(
    journal: Journal, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(journal, "--json", "--op", "rename,remove", "--op", "LOGIN_failed") == 0
    ops = [json.loads(line)["op"] for line in capsys.readouterr().out.splitlines()]
    assert ops == ["rename", "login_failed", "remove"]


def test_cli_path_session_and_limit(journal: Journal, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(journal, "--json", "--session", "sess-bob", "--path", "/in/*", "--limit", "1") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["op"], r["path"]) for r in rows] == [("close", EVIL_PATH)]


def test_cli_xferlog_marks_the_incomplete_upload(
    journal: Journal, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(journal, "--xferlog") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["c", "c", "i", "c"]


def test_cli_unknown_op_exits_2_naming_it(
    journal: Journal, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(journal, "--op", "close,upload") == 2
    err = capsys.readouterr().err
    assert "--op" in err
    assert "'upload'" in err


def test_cli_bad_since_exits_2_naming_the_option(
    journal: Journal, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(journal, "--since", "last tuesday") == 2
    captured = capsys.readouterr()
    assert "--since" in captured.err
    assert "last tuesday" in captured.err
    assert captured.out == ""


def test_cli_json_and_xferlog_are_mutually_exclusive(journal: Journal) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(journal, "--json", "--xferlog")
    assert exc.value.code == 2


def test_cli_says_when_the_journal_does_not_exist(
    journal: Journal, capsys: pytest.CaptureFixture[str]
) -> None:
    journal.conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal.path}{suffix}").unlink(missing_ok=True)
    assert cli(journal) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert str(journal.path) in err


def _follow_in_thread(journal: Journal, *args: str) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(
            cli(journal, "--follow", "--follow-for", "3", "--interval", "0.1", *args)
        )
    )
    thread.start()
    return thread, codes


def _captured_until(
    capsys: pytest.CaptureFixture[str], done: Callable[[str, str], bool], timeout: float = 10
) -> tuple[str, str]:
    """What the follower (another thread) printed, read until ``done(out, err)``."""
    out = err = ""
    deadline = time.monotonic() + timeout
    while not done(out, err) and time.monotonic() < deadline:
        time.sleep(0.02)
        captured = capsys.readouterr()
        out, err = out + captured.out, err + captured.err
    return out, err


def test_follow_prints_operations_written_after_it_started(
    journal: Journal, capsys: pytest.CaptureFixture[str]
) -> None:
    thread, codes = _follow_in_thread(journal, "--json", "--user", "bob")
    # bob's six earlier operations first; only then is the new one written, so
    # it can only reach the output through the follow loop
    first, _ = _captured_until(capsys, lambda out, _: len(out.splitlines()) >= 6)
    assert len(first.splitlines()) == 6
    write(
        journal.path,
        [
            Event(Op.MKDIR, ALICE, time=time.time(), path="/alice-not-shown"),
            Event(Op.MKDIR, BOB, time=time.time(), path="/in/new-folder"),
        ],
    )
    thread.join(10)
    assert not thread.is_alive()
    assert codes == [0]
    followed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["login"], r["path"]) for r in followed] == [("bob", "/in/new-folder")]
    assert all(json.loads(line)["login"] == "bob" for line in first.splitlines())


def test_follow_waits_for_the_journal_to_appear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  state_dir: {json.dumps(str(state))}\n")
    journal = Journal(state / "journal.sqlite3", config, sqlite3.connect(":memory:"))
    thread, codes = _follow_in_thread(journal, "--xferlog")
    out, err = _captured_until(capsys, lambda _, err: "waiting" in err)
    assert "waiting" in err and out == ""  # the journal does not exist yet
    write(journal.path, journal_events())
    thread.join(10)
    journal.conn.close()
    assert codes == [0]
    assert len(capsys.readouterr().out.splitlines()) == 4
