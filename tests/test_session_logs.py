"""Every log line about a session names it: the journal's session id, the login, the peer.

A real gateway (in this process, logging as ``sftpgate serve`` does, and a
real ``sftpgate serve`` process with ``log.json``), real paramiko clients:
two users uploading at once, failing requests, a wrong password, hostile
logins. Each line the gateway logs while working for a connection must carry
that connection's session id (the one ``sftpgate journal --session`` finds),
and never another's. The ``sftpgate subsystem`` relay's lines carry its own.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from test_serve_process import ServeProcess

from conftest import PASSWORDS, RunningGateway, free_port, start_gateway, write_config
from sftpgate.events import current_node, set_node
from sftpgate.logsetup import setup_logging

HOSTILE = "evil\n[1] sftpgate: login root"  # SSH itself refuses it (prohibited character)
# Gets as far as a failed login: spaces, "=" and quotes, to pass for other fields.
TRICKY = 'eve login=root session=0000000000000000 "x'
# The gateway's own loggers: everything they log after start-up is about a connection.
SESSION_LOGGERS = ("sftpgate.frontdoor", "sftpgate.identity", "asyncssh")
_PLAIN = re.compile(
    r"^(?P<level>[A-Z]+) (?P<node>\S+)\[(?P<pid>\d+)\] (?P<logger>\S+): (?P<rest>.*)$"
)
_FIELD = re.compile(r'(session|login|peer)=("(?:[^"\\]|\\.)*"|\S+) ')


@pytest.fixture
def restore_logging() -> Iterator[None]:
    import logging

    root = logging.getLogger()
    handlers, level, node = root.handlers[:], root.level, current_node()
    asyncssh_level = logging.getLogger("asyncssh").level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("asyncssh").setLevel(asyncssh_level)
    set_node(node)


def unquote(value: str) -> str:
    """A field's value as PlainFormatter wrote it, back to text (escapes stay escaped)."""
    if not value.startswith('"'):
        return value
    return re.sub(r"\\([\\\"])", r"\1", value[1:-1])


def parse_plain(line: str) -> dict[str, Any]:
    """One plain line: level, logger, the session's fields (first, before the message)."""
    m = _PLAIN.match(line)
    assert m is not None, line
    record: dict[str, Any] = {"logger": m["logger"], "level": m["level"], "line": line}
    rest = m["rest"]
    while (field := _FIELD.match(rest)) is not None:
        record.setdefault(field[1], unquote(field[2]))
        rest = rest[field.end() :]
    record["message"] = rest
    return record


def parse_json(line: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(line)
    record["line"] = line
    return record


def sessions_of(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_session: dict[str, list[dict[str, Any]]] = {}
    for record in lines:
        if record.get("session") is not None:
            by_session.setdefault(record["session"], []).append(record)
    return by_session


def conn_numbers(records: list[dict[str, Any]]) -> set[str]:
    """asyncssh's own numbers for the connections these lines are about."""
    return {m[1] for r in records if (m := re.search(r"\[conn=(\d+)", r["message"]))}


def user_work(gateway: RunningGateway, login: str, failures: list[BaseException]) -> None:
    """Uploads, requests that fail, and one upload left open when the connection ends."""
    try:
        sftp = gateway.sftp(login)
        for i in range(4):
            with sftp.open(f"{login}-{i}.bin", "wb") as f:
                f.write(os.urandom(64 * 1024))
        for bad in (lambda: sftp.open("missing/file", "rb"), lambda: sftp.remove("nothing")):
            with pytest.raises(OSError):
                bad()
        sftp.open(f"{login}-cut.bin", "wb").write(b"cut off")
        sftp.get_channel().get_transport().close()  # type: ignore[union-attr]
    except BaseException as exc:  # reported by the test thread
        failures.append(exc)


def bad_logins(port: int) -> None:
    for login, password in (("alice", "wrong"), (TRICKY, "x"), (HOSTILE, "x")):
        t = paramiko.Transport(("127.0.0.1", port))
        try:
            with pytest.raises(paramiko.SSHException):
                t.connect(username=login, password=password)
        finally:
            t.close()


def run_sessions(gateway: RunningGateway) -> None:
    failures: list[BaseException] = []
    workers = [
        threading.Thread(target=user_work, args=(gateway, login, failures))
        for login in ("alice", "carol")
    ]
    for w in workers:
        w.start()
    bad_logins(gateway.port)
    for w in workers:
        w.join(60)
    assert not failures, failures
    # Every session has ended and been journaled (its last line is logged before that).
    gateway.wait_rows(
        lambda rs: len(rs) >= 4 and all(r["ended_at"] for r in rs if r["result"] == "ok"),
        sql="SELECT * FROM sessions",
    )
    gateway.wait_rows(lambda rs: sum(r["op"] == "logout" for r in rs) >= 2)


@pytest.mark.parametrize("as_json", [False, True], ids=["plain", "json"])
def test_each_line_names_its_own_session_and_login(
    tmp_path: Path,
    user_keys: dict[str, Path],
    restore_logging: None,
    capfd: pytest.CaptureFixture[str],
    as_json: bool,
) -> None:
    gateway = start_gateway(tmp_path, user_keys)
    try:
        # debug: asyncssh's own lines about each connection too (auth, channels, close).
        setup_logging("debug", as_json=as_json, node="gw1")
        capfd.readouterr()  # start-up's lines are the gateway's, not a session's
        run_sessions(gateway)
        err = capfd.readouterr().err
    finally:
        gateway.stop()
    parse = parse_json if as_json else parse_plain
    lines = [parse(line) for line in err.splitlines()]
    ours = [r for r in lines if r["logger"].startswith(SESSION_LOGGERS)]
    untagged = [r["line"] for r in ours if r.get("session") is None]
    assert not untagged, untagged
    assert len(ours) > 40, err  # the check saw real traffic

    rows = {r["id"]: r for r in gateway.rows("SELECT * FROM sessions")}
    by_session = sessions_of(ours)
    # The hostile login never reached authentication (SSH refuses the newline):
    # no journal row, but its lines name its connection all the same.
    (refused,) = [s for s in by_session if s not in rows]
    assert any("Prohibited character" in r["message"] for r in by_session[refused])
    assert all(r.get("login") is None for r in by_session[refused])
    assert set(rows) == set(by_session) - {refused}

    for session, records in by_session.items():
        row = rows.get(session)
        peers = {r.get("peer") for r in records} - {None}
        logins = {r.get("login") for r in records} - {None}
        if row is not None:
            assert peers == {f"127.0.0.1:{row['remote_port']}"}, (session, peers)
            assert logins == {row["login"]}, (session, logins)
        # One connection, one session: asyncssh's own connection number agrees.
        conns = conn_numbers(records)
        assert len(conns) == 1, (session, conns)
    conns_seen = [conn for records in by_session.values() for conn in conn_numbers(records)]
    assert len(conns_seen) == len(set(conns_seen))  # no connection's lines under two sessions

    by_login = {row["login"]: [] for row in rows.values()}
    for session, row in rows.items():
        by_login[row["login"]].append(session)
    for login in ("alice", "carol"):
        (ok,) = [s for s in by_login[login] if rows[s]["result"] == "ok"]
        records = by_session[ok]
        messages = [r["message"] for r in records]
        assert any(f"login {login} from" in m for m in messages), messages
        assert any(f"logout {login} from" in m for m in messages), messages
        # The pool thread's line (identity.py, first file call: no uid configured, so
        # the home's owner, root) and the teardown task's (it closed the upload left open).
        assert any(r["logger"] == "sftpgate.identity" for r in records), messages
        assert any("SFTP session ended" in m for m in messages), messages
    (failed,) = [s for s in by_login["alice"] if rows[s]["result"] == "failed"]
    assert any("failed password login for alice" in r["message"] for r in by_session[failed])

    # The tricky login is one field, exactly as sent, and the real session comes first.
    (tricky,) = by_login[TRICKY]
    for record in by_session[tricky]:
        assert record["session"] == tricky
        assert record.get("login") in (None, TRICKY)
    if not as_json:
        (line,) = [r["line"] for r in by_session[tricky] if "failed password" in r["message"]]
        assert f'session={tricky} login="eve login=root session=0000000000000000 \\"x"' in line
    assert "\x1b" not in err and all(line.isprintable() for line in err.splitlines())

    # From a log line to the journal: `sftpgate journal --session ID`.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftpgate",
            "journal",
            "--config",
            str(tmp_path / "config.yaml"),
            "--session",
            failed,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    journaled = [json.loads(line) for line in done.stdout.splitlines()]
    assert journaled and {r["session_id"] for r in journaled} == {failed}
    assert {r["op"] for r in journaled} == {"login_failed"}


def test_sftpgate_serve_json_lines_lead_to_the_journal(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        user_keys,
        {"server": {"port": port}, "log": {"json": True, "level": "info"}},
    )
    serve = ServeProcess(config)
    try:
        t = paramiko.Transport(("127.0.0.1", port))
        t.connect(username="alice", password=PASSWORDS["alice"])
        sftp = paramiko.SFTPClient.from_transport(t)
        assert sftp is not None
        with sftp.open("up.bin", "wb") as f:
            f.write(b"x" * 1000)
        t.close()
        with pytest.raises(paramiko.SSHException):
            bad = paramiko.Transport(("127.0.0.1", port))
            try:
                bad.connect(username="carol", password="wrong")
            finally:
                bad.close()
    finally:
        assert serve.stop() == 0
    # Every line on stderr is one JSON object, the "listening" line too (logsetup.announce).
    not_json = [line for line in serve.lines if not line.startswith("{")]
    assert not not_json, not_json
    records = [json.loads(line) for line in serve.lines]
    assert any(r["message"].startswith("sftpgate: listening on ") for r in records)
    (login,) = [r for r in records if r["message"].startswith("login alice from")]
    (logout,) = [r for r in records if r["message"].startswith("logout alice from")]
    (failed,) = [r for r in records if r["message"].startswith("failed password login")]
    assert login["session"] == logout["session"] != failed["session"]
    assert (login["login"], failed["login"]) == ("alice", "carol")
    for record in (login, logout, failed):
        assert record["peer"].startswith("127.0.0.1:")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sftpgate",
                "journal",
                "--config",
                str(config),
                "--session",
                record["session"],
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        assert rows and {(r["session_id"], r["login"]) for r in rows} == {
            (record["session"], record["login"])
        }


def test_the_subsystem_relays_lines_name_its_session(tmp_path: Path) -> None:
    """`sftpgate subsystem`'s relay with no daemon to reach: it spools, and says so in
    the system log, naming the session its spooled (later journaled) events carry."""
    syslog = tmp_path / "log.sock"
    spool = tmp_path / "spool"
    spool.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(syslog))
        server.settimeout(30)
        # The CLI's `run` with the system log's address given (no /dev/log here):
        # the same two calls, the real relay, cat as sftp-server.
        program = (
            "import sys\n"
            "from pathlib import Path\n"
            "from sftpgate.subsystem.tap import quiet_logging, run_tap\n"
            "quiet_logging(sys.argv[1])\n"
            "sys.exit(run_tap('/bin/cat', [], socket_path=Path(sys.argv[2]),\n"
            "    spool_dir=Path(sys.argv[3]), temp_patterns=('*.part',), ack_timeout=0.2))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", program, str(syslog), str(tmp_path / "none.sock"), str(spool)],
            input=b"",
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "SSH_CONNECTION": "10.1.2.3 50000 10.0.0.1 22"},
        )
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        server.settimeout(0.5)
        messages = []
        try:
            while True:
                messages.append(server.recv(65536).decode())
        except TimeoutError:
            pass
    assert messages, "the relay logged nothing"
    spooled = [json.loads(line) for f in spool.iterdir() for line in f.read_text().splitlines()]
    ids = {line["event"]["session"]["id"] for line in spooled}
    assert len(ids) == 1, spooled
    (session,) = ids
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    for message in messages:
        assert f"sftpgate-subsystem: session={session} login={me} peer=10.1.2.3:50000 " in message
    assert any("spooling events" in m for m in messages), messages


def test_the_tap_daemons_refusal_names_the_session_of_its_journal_row(
    tmp_path: Path,
    user_keys: dict[str, Path],
    restore_logging: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """serve's end of the relay: a line it refuses is logged under the session id the
    refusal is journaled with (the uid's, from the socket's credentials)."""
    sock = tmp_path / "run" / "events.sock"
    gateway = start_gateway(
        tmp_path,
        user_keys,
        extra={
            "subsystem": {
                "enabled": True,
                "socket": str(sock),
                "spool_dir": str(tmp_path / "spool"),
                "replay_interval": 600,
            }
        },
    )
    try:
        setup_logging("info", node="gw1")
        capfd.readouterr()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as tap:
            tap.connect(str(sock))
            tap.sendall(b'{"not": "an event"}\n')
            rows = gateway.wait_rows(lambda rs: any(r["status"] == "refused" for r in rs))
        (row,) = [r for r in rows if r["status"] == "refused"]
        err = capfd.readouterr().err
    finally:
        gateway.stop()
    (line,) = [parse_plain(line) for line in err.splitlines() if "tap uid" in line]
    assert (line["session"], line["login"]) == (row["session_id"], row["login"])
    assert line["session"] == f"ssh-{os.getuid()}-unknown" and line["peer"] == "local:0"
