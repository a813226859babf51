"""Log lines: one line a record whatever users send, the node on each, JSON when asked."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import paramiko
import pytest

from conftest import PASSWORDS, RunningGateway
from sftpgate.events import current_node, set_node
from sftpgate.logsetup import (
    SessionTag,
    current_session,
    escape_controls,
    field_value,
    in_session,
    outside_sessions,
    session_extra,
    setup_logging,
    tagged,
)

FORGED = "eve\nINFO web1[1] sftpgate.frontdoor.ssh: login root from 10.0.0.1\r\x1b[2K"


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level, node = root.handlers[:], root.level, current_node()
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    set_node(node)  # setup_logging names this process's node: later tests expect the host's


def test_control_characters_are_escaped() -> None:
    assert escape_controls("a\nb\r\t\x00\x1b\x7f\x85\u2028é") == (
        "a\\nb\\r\\t\\x00\\x1b\\x7f\\x85\\u2028é"
    )


def test_a_user_supplied_newline_cannot_forge_a_plain_line(
    restore_logging: object, capfd: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", node="web1")
    logging.getLogger("sftpgate.test").info("failed login %s", FORGED)
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err
    assert "eve\\nINFO web1[1] sftpgate.frontdoor.ssh: login root" in err
    assert err.startswith("INFO web1[")


def test_a_traceback_keeps_its_lines_after_an_escaped_message(
    restore_logging: object, capfd: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", node="web1")
    try:
        raise ValueError("ours")
    except ValueError:
        logging.getLogger("sftpgate.test").exception("bad %s", "x\ny")
    err = capfd.readouterr().err
    assert err.splitlines()[0].endswith("bad x\\ny")
    assert "Traceback (most recent call last):" in err and "ValueError: ours" in err


def test_json_lines_are_one_object_each(
    restore_logging: object, capfd: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", as_json=True, node="web1")
    logging.getLogger("sftpgate.test").info("failed login %s", FORGED)
    (line,) = capfd.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["message"] == f"failed login {FORGED}" and record["node"] == "web1"


def test_a_client_version_with_escape_sequences_against_the_gateway(
    gateway: RunningGateway, restore_logging: object, capfd: pytest.CaptureFixture[str]
) -> None:
    # A login with a newline never gets this far (SSH refuses it as a prohibited
    # character); the client's version string, logged at every login, does.
    setup_logging("info", node="web1")
    t = paramiko.Transport(("127.0.0.1", gateway.port))
    t.local_version = "SSH-2.0-evil\x1b[2K\x1b[1A"
    try:
        t.connect(username="alice", password=PASSWORDS["alice"])
    finally:
        t.close()
    gateway.wait_rows(lambda rs: len(rs) >= 1, sql="SELECT * FROM sessions")
    err = capfd.readouterr().err
    (line,) = [line for line in err.splitlines() if "login alice from" in line]
    assert "evil\\x1b[2K\\x1b[1A" in line and "\x1b" not in line


HOSTILE_LOGIN = 'evil\n[1] sftpgate: login root\x1b[2K "x" login=root\\'


def test_a_hostile_login_in_the_session_fields_stays_one_escaped_line(
    restore_logging: object, capfd: pytest.CaptureFixture[str]
) -> None:
    # SSH refuses such a login before it is a session; the fields escape it regardless.
    setup_logging("info", node="web1")
    with in_session(SessionTag("00ff", "10.0.0.1:22", HOSTILE_LOGIN)):
        logging.getLogger("sftpgate.test").info("failed login %s", "x")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err, err
    assert err.startswith("INFO web1["), err
    fields = 'session=00ff login="evil\\n[1] sftpgate: login root\\x1b[2K \\"x\\" login=root\\\\"'
    assert err.endswith(f"sftpgate.test: {fields} peer=10.0.0.1:22 failed login x\n"), err


def test_json_session_fields_hold_the_login_exactly(
    restore_logging: object, capfd: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", as_json=True, node="web1")
    with in_session(SessionTag("00ff", "[::1]:22", HOSTILE_LOGIN)):
        logging.getLogger("sftpgate.test").info("hello")
    logging.getLogger("sftpgate.test").info("no session")
    first, second = (json.loads(line) for line in capfd.readouterr().err.splitlines())
    assert (first["session"], first["login"], first["peer"]) == ("00ff", HOSTILE_LOGIN, "[::1]:22")
    assert "session" not in second and "login" not in second


def test_field_values_are_bare_only_when_nothing_could_be_misread() -> None:
    assert field_value("alice") == "alice"
    assert field_value("") == '""'
    assert field_value("a b") == '"a b"'
    assert field_value("a=b") == '"a=b"'
    assert field_value('a"b') == '"a\\"b"'
    assert field_value("a\\nb") == '"a\\\\nb"'  # a real backslash-n, not a newline
    assert field_value("a\nb") == '"a\\nb"'


def test_a_session_set_where_work_starts_reaches_threads_only_when_carried() -> None:
    tag = SessionTag("abcd", "127.0.0.1:1", "alice")
    seen: list[SessionTag | None] = []
    with in_session(tag), ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: seen.append(current_session())).result()
        pool.submit(tagged(tag, lambda: seen.append(current_session()))).result()
        outside = outside_sessions().run(current_session)
        assert current_session() is tag
    assert seen == [None, tag] and outside is None and current_session() is None


def test_a_record_given_its_session_keeps_it(
    restore_logging: object, capfd: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", node="web1")
    with in_session(SessionTag("aaaa", "h:1", "alice")):
        logging.getLogger("sftpgate.test").warning(
            "refused", extra=session_extra("ssh-0-bbbb", "uid:0", "local", 0)
        )
    assert "session=ssh-0-bbbb login=uid:0 peer=local:0 refused" in capfd.readouterr().err
