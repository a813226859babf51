"""The admin API is cluster-wide on PostgreSQL: two `sftpgate serve` nodes on one database, the
API on one of them sees and ends a session on the other (real PostgreSQL, tests/pg_kit.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_api import READER, TOKENS, Client, sftp_session, wait_for
from test_serve_process import ServeProcess

import pg_kit
from conftest import free_port, write_config
from sftpgate.cli.main import main


@pytest.fixture(scope="module")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


def test_the_api_on_one_node_lists_and_ends_a_session_on_another(
    tmp_path: Path, user_keys: dict[str, Path], pg: pg_kit.PgServer
) -> None:
    with pg.database() as url:
        nodes: dict[str, tuple[ServeProcess, int]] = {}
        api = free_port()
        try:
            for node in ("east", "west"):
                root = tmp_path / node
                root.mkdir()
                port = free_port()
                sections: dict[str, Any] = {
                    "server": {"port": port, "node": node},
                    "database": {"url": url},
                    "api": {"tokens": TOKENS, "disconnect_poll": 0.2},
                }
                if node == "east":
                    sections["api"]["listen"] = f"127.0.0.1:{api}"
                config = write_config(root, user_keys, sections)
                if node == "east":
                    assert main(["db", "migrate", "-c", str(config)]) == 0
                nodes[node] = (ServeProcess(config), port)
            http = Client(api)
            transport, _ = sftp_session(nodes["west"][1], "alice")

            def on_west() -> list[dict[str, Any]]:
                rows = http("GET", "/v1/sessions?node=west", token=READER)[2]["sessions"]
                return rows if rows and rows[0]["login"] == "alice" else []

            (row,) = wait_for(on_west, what="alice's session on west")
            assert http("GET", "/v1/sessions?node=east")[2]["sessions"] == []
            assert http("POST", f"/v1/sessions/{row['id']}/disconnect")[0] == 202
            wait_for(lambda: not transport.is_active(), what="west to end the session")

            def disconnect_rows() -> list[dict[str, Any]]:
                query = f"/v1/journal?session={row['id']}&op=disconnect,logout"
                rows = http("GET", query)[2]["rows"]
                return rows if len(rows) == 2 else []

            ended = wait_for(disconnect_rows, what="the session's disconnect and logout rows")
            assert [r["op"] for r in ended] == ["disconnect", "logout"]
            assert all(r["node"] == "west" for r in ended)
        finally:
            for proc, _ in nodes.values():
                proc.stop()
