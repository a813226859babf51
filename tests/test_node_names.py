"""``server.node``: each session and each log line names the host that served it."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from test_serve_process import ServeProcess

from conftest import PASSWORDS, free_port, write_config
from sftpgate.config import load_config
from sftpgate.errors import ConfigError
from sftpgate.events import SessionInfo, current_node, set_node
from sftpgate.logsetup import setup_logging


@pytest.fixture
def node_restored() -> Iterator[str]:
    before = current_node()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield before
    set_node(before)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_node_defaults_to_the_host_name(tmp_path: Path, user_keys: dict[str, Path]) -> None:
    assert load_config(write_config(tmp_path, user_keys)).server.node == socket.gethostname()
    with pytest.raises(ConfigError, match=r"server\.node"):
        load_config(write_config(tmp_path, user_keys, {"server": {"node": "a b/c"}}))


def test_session_info_and_json_log_lines_carry_the_node(
    node_restored: str, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", as_json=True, node="gw-json")
    assert SessionInfo(id="s", remote_addr="192.0.2.1", remote_port=1).node == "gw-json"
    logging.getLogger("sftpgate.test").info("hello")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["node"] == "gw-json" and line["message"] == "hello"


def test_serve_names_its_node_on_log_lines_and_journaled_sessions(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config = write_config(tmp_path, user_keys)
    port = free_port()
    serve = ServeProcess(
        config, {"SFTPGATE_SERVER__PORT": str(port), "SFTPGATE_SERVER__NODE": "gw-node-7"}
    )
    try:
        t = paramiko.Transport(("127.0.0.1", port))
        t.connect(username="alice", password=PASSWORDS["alice"])
        t.close()
    finally:
        assert serve.stop() == 0
    logged = [line for line in serve.lines if line.startswith(("INFO", "WARNING", "ERROR"))]
    assert logged and all(" gw-node-7[" in line for line in logged), logged
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    try:
        nodes = db.execute("SELECT DISTINCT node FROM sessions WHERE login = 'alice'").fetchall()
    finally:
        db.close()
    assert nodes == [("gw-node-7",)]
