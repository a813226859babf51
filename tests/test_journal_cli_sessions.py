"""`sftpgate journal` on a journal made by real SFTP sessions: every filter and format."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import paramiko
import pytest

from conftest import RunningGateway, start_gateway
from sftpgate.cli.main import main


@pytest.fixture(scope="module")
def journaled(
    tmp_path_factory: pytest.TempPathFactory, user_keys: dict[str, object]
) -> Iterator[RunningGateway]:
    """One gateway, a realistic morning of sessions, then the clients gone."""
    running = start_gateway(tmp_path_factory.mktemp("journaled"), user_keys)  # type: ignore[arg-type]
    try:
        alice = running.sftp("alice")
        alice.mkdir("videos")
        alice.putfo(io.BytesIO(b"a" * 5000), "videos/holiday.mp4")
        alice.rename("videos/holiday.mp4", "videos/holiday 2026.mp4")
        alice.getfo("videos/holiday 2026.mp4", io.BytesIO(), prefetch=False)
        with pytest.raises(FileNotFoundError):
            alice.remove("videos/missing.mp4")
        bob = running.sftp("bob", key=True)
        bob.putfo(io.BytesIO(b"b" * 300), "notes.txt")
        bob.remove("notes.txt")
        with pytest.raises(paramiko.AuthenticationException):
            running.transport("alice", password="guess")
        t = running.transport("carol")
        carol = paramiko.SFTPClient.from_transport(t)
        assert carol is not None
        cut = carol.open("cut.mp4", "w")
        cut.write(b"c" * 4096)
        cut.flush()
        sock = t.sock
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        running.close_clients()
        running.wait_rows(lambda rs: sum(r["op"] == "logout" for r in rs) >= 3)
        del cut
        yield running
    finally:
        running.stop()


def journal(running: RunningGateway, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    code = main(["journal", "--config", str(running.config.path), *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return out.splitlines()


def as_json(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines]


def test_table_lists_every_operation_readably(journaled: RunningGateway, capsys) -> None:
    lines = journal(journaled, capsys)
    text = "\n".join(lines)
    for expected in (
        "login",
        "login_failed",
        "mkdir",
        "rename",
        "remove",
        "logout",
        "/videos/holiday.mp4 -> /videos/holiday 2026.mp4",
        "alice",
        "bob",
    ):
        assert expected in text


def test_user_filter(journaled: RunningGateway, capsys) -> None:
    rows = as_json(journal(journaled, capsys, "--user", "bob", "--json"))
    assert rows and {r["login"] for r in rows} == {"bob"}
    assert {"login", "open", "close", "remove", "logout"} <= {r["op"] for r in rows}


def test_op_filter_repeatable_and_comma_separated(journaled: RunningGateway, capsys) -> None:
    rows = as_json(journal(journaled, capsys, "--op", "rename,mkdir", "--op", "remove", "--json"))
    assert sorted(r["op"] for r in rows) == ["mkdir", "remove", "remove", "rename"]


def test_path_glob_matches_path_or_rename_target(journaled: RunningGateway, capsys) -> None:
    rows = as_json(journal(journaled, capsys, "--path", "*2026.mp4", "--json"))
    assert {r["op"] for r in rows} >= {"rename", "open", "close"}
    assert all("2026.mp4" in f"{r['path']} {r['path2']}" for r in rows)


def test_failed_filter_shows_refusals_and_errors(journaled: RunningGateway, capsys) -> None:
    rows = as_json(journal(journaled, capsys, "--failed", "--json"))
    found = {(r["op"], r["status"]) for r in rows}
    assert ("login_failed", "permission_denied") in found
    assert ("remove", "no_such_file") in found
    assert all(r["status"] != "ok" for r in rows)


def test_session_filter(journaled: RunningGateway, capsys) -> None:
    bob_session = journaled.rows("SELECT id FROM sessions WHERE login = 'bob'")[0]["id"]
    rows = as_json(journal(journaled, capsys, "--session", bob_session, "--json"))
    assert rows and {r["session_id"] for r in rows} == {bob_session}


def test_since_and_until(journaled: RunningGateway, capsys) -> None:
    assert len(journal(journaled, capsys, "--since", "1h", "--json")) == len(journaled.rows())
    assert journal(journaled, capsys, "--until", "1h", "--json") == []
    first = journaled.rows()[0]["ts"]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(first - 60))
    assert len(journal(journaled, capsys, "--since", iso, "--json")) == len(journaled.rows())


def test_xferlog_has_one_line_per_transfer_with_completion(
    journaled: RunningGateway, capsys
) -> None:
    lines = journal(journaled, capsys, "--xferlog")
    fields = [line[25:].split(" ") for line in lines]  # first 24 chars: ctime date
    assert all(len(f) == 13 for f in fields), lines
    by_name = {f[3]: f for f in fields}
    upload = by_name["/videos/holiday.mp4"]
    assert (upload[2], upload[6], upload[8], upload[12]) == ("5000", "i", "alice", "c")
    download = by_name["/videos/holiday_2026.mp4"]
    assert (download[6], download[12]) == ("o", "c")
    cut = by_name["/cut.mp4"]
    assert (cut[2], cut[6], cut[8], cut[12]) == ("4096", "i", "carol", "i")


def test_follow_prints_a_record_written_after_it_started(journaled: RunningGateway) -> None:
    # A real process on a pipe: the rows already there must come out first, so the
    # record written next can only be printed by the follow loop, not the first dump.
    before = len(journaled.rows())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sftpgate",
            "journal",
            "--config",
            str(journaled.config.path),
            "--json",
            "--follow",
            "--follow-for",
            "20",
            "--interval",
            "0.1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        first = [json.loads(proc.stdout.readline()) for _ in range(before)]
        assert len(first) == before
        assert not any(r["path"] == "/made-while-following" for r in first)
        journaled.sftp("alice").mkdir("made-while-following")
        while True:
            line = proc.stdout.readline()
            assert line, "follow ended without printing the new record"
            row = json.loads(line)
            if row["op"] == "mkdir":
                break
        assert row["path"] == "/made-while-following"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
