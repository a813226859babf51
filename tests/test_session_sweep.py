"""Sessions left open by a gateway process that died are ended in the journal (journal/sweep.py).

The registry contract runs on both backends (contract_kit.BACKENDS); then real `sftpgate serve`
processes with real paramiko sessions: a child of `server.processes: 2` killed with SIGKILL, a
single process killed and started again, and on PostgreSQL a node killed and swept by another.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from test_api import READER, TOKENS, Client, sftp_session, wait_for
from test_serve_process import ServeProcess, kill_serve

import pg_kit
from conftest import free_port, write_config
from contract_kit import BACKENDS, collect, fresh_backend, opened, session
from sftpgate.cli.main import main
from sftpgate.events import Event, Op, UploadState, current_process, set_process
from sftpgate.jobs.registry import boot_id, stamp
from sftpgate.journal.query import JournalFilter
from sftpgate.journal.sweep import open_uploads, swept
from sftpgate.storage.ports import Backend, GatewayRow

T0 = 1_700_000_000.0
WRITE, READ = 0x1A, 0x01  # SFTP pflags: write|creat|trunc, read
DONE = UploadState.COMPLETE


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    before = current_process()
    try:
        yield from fresh_backend(request, tmp_path)
    finally:
        set_process(before)


def row(gid: str, node: str = "gw1", heartbeat: float = T0, pid: int = 4242) -> GatewayRow:
    return GatewayRow(gid, node, pid, "boot/ns", 1234, T0, heartbeat)


def _journal(backend: Backend, process: str, events: list[Event]) -> None:
    set_process(process)
    with opened(backend.journal()) as journal:
        journal.record_batch(events)


# -- the registry contract (both backends) ----------------------------------------------


def test_a_dead_process_has_its_open_sessions_ended_once_with_why_and_its_open_upload_incomplete(
    backend: Backend,
) -> None:
    dead, live = session("s1", "alice"), session("s2", "bob")
    _journal(
        backend,
        "gw1:4242:aa",
        [
            Event(Op.LOGIN, dead, time=T0),
            Event(Op.OPEN, dead, time=T0 + 1, path="/in/open.mp4", flags=WRITE),
            Event(Op.OPEN, dead, time=T0 + 2, path="/in/done.mp4", flags=WRITE),
            Event(Op.CLOSE, dead, time=T0 + 3, path="/in/done.mp4", bytes_written=9, upload=DONE),
            Event(Op.OPEN, dead, time=T0 + 4, path="/in/read.txt", flags=READ),
        ],
    )
    _journal(backend, "gw2:4343:bb", [Event(Op.LOGIN, live, time=T0)])
    with opened(backend.gateways()) as registry:
        registry.register(row("gw1:4242:aa"))
        registry.register(row("gw2:4343:bb", "gw2"))
        assert {r.id for r in registry.gateways()} == {"gw1:4242:aa", "gw2:4343:bb"}
        ended = registry.end_process(row("gw1:4242:aa"), T0 + 10, "gone", "upload gone")
        assert ended == ["s1"]
        # Claimed once: a second sweeper (or the same one again) finds nothing to do.
        assert registry.end_process(row("gw1:4242:aa"), T0 + 11, "gone", "upload gone") == []
        assert [r.id for r in registry.gateways()] == ["gw2:4343:bb"]
    with opened(backend.admin()) as admin:
        assert [s["id"] for s in admin.sessions()] == ["s2"]
    with opened(backend.reader()) as reader:
        rows, _ = collect(reader, JournalFilter(session="s1"))
    close, logout = rows[-2:]
    assert (close["op"], close["path"], close["status"]) == ("close", "/in/open.mp4", "failure")
    assert close["message"] == "upload gone"
    assert (logout["op"], logout["message"], logout["ts"]) == ("logout", "gone", T0 + 10)
    assert [r["op"] for r in rows].count("logout") == 1
    with opened(backend.admin()) as admin:
        done, incomplete = admin.upload(1), admin.upload(2)  # numbered in order, from 1
    assert done is not None and incomplete is not None
    assert (done["path"], done["state"]) == ("/in/done.mp4", "complete")
    assert (incomplete["path"], incomplete["state"]) == ("/in/open.mp4", "incomplete")
    assert incomplete["session_id"] == "s1"


def test_a_heartbeat_after_the_read_keeps_the_process_and_its_sessions(backend: Backend) -> None:
    _journal(backend, "gw1:1:aa", [Event(Op.LOGIN, session("s1"), time=T0)])
    with opened(backend.gateways()) as registry:
        registry.register(row("gw1:1:aa"))
        seen = registry.gateways()[0]
        assert registry.heartbeat("gw1:1:aa", T0 + 5)
        assert registry.end_process(seen, T0 + 10, "gone", "upload gone") == []
        assert not registry.heartbeat("gw1:no-such", T0 + 5)
    with opened(backend.admin()) as admin:
        assert [s["id"] for s in admin.sessions()] == ["s1"]


def test_a_clean_exit_retires_its_row_only_when_its_sessions_are_closed(backend: Backend) -> None:
    s1 = session("s1")
    _journal(backend, "gw1:1:aa", [Event(Op.LOGIN, s1, time=T0)])
    with opened(backend.gateways()) as registry:
        registry.register(row("gw1:1:aa"))
        assert not registry.retire("gw1:1:aa")  # s1 is open: the row stays for a sweeper
        _journal(backend, "gw1:1:aa", [Event(Op.LOGOUT, s1, time=T0 + 1)])
        assert registry.retire("gw1:1:aa")
        assert registry.gateways() == []


# -- who is taken for dead (pure, with real processes) ----------------------------------


def test_a_process_is_swept_when_proven_gone_here_or_silent_elsewhere() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        me = stamp(child.pid, "here")
        assert me is not None
        alive = GatewayRow("here:x", "here", child.pid, me.boot, me.start, T0, 0.0)
        now = time.time()
        # Alive on this node: never swept, however old its heartbeat.
        assert not swept(alive, "here:me", "here", now, 60)
        assert not swept(alive, alive.id, "here", now, 60)  # nor by itself
    finally:
        child.kill()
        child.wait()
    assert swept(alive, "here:me", "here", now, 60)  # its pid gone
    reused = GatewayRow("here:y", "here", os.getpid(), boot_id(), 1, T0, now)
    assert swept(reused, "here:me", "here", now, 60)  # that pid is another process now
    earlier = GatewayRow("here:z", "here", os.getpid(), "old-boot/ns", 1, T0, now)
    assert swept(earlier, "here:me", "here", now, 60)
    other = GatewayRow("there:1", "there", 1, boot_id(), 1, T0, now - 30)
    assert not swept(other, "here:me", "here", now, 60)
    assert swept(other, "here:me", "here", now + 31, 60)


def test_open_uploads_are_write_opens_without_a_later_close() -> None:
    ops = [
        {"op": "open", "path": "/a"},
        {"op": "close", "path": "/a"},
        {"op": "open", "path": "/b"},
        {"op": "open", "path": "/c"},
        {"op": "open", "path": "/c"},
        {"op": "close", "path": "/c"},
        {"op": "close", "path": "/nowhere"},
    ]
    assert open_uploads(ops) == ["/b", "/c"]


# -- real serve processes ---------------------------------------------------------------

WHY = re.compile(r"^gateway process (\d+) on (\S+) ended without closing this session$")


def _journal_rows(db: Path, sql: str, *args: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _session_of(db: Path, transport: paramiko.Transport) -> sqlite3.Row:
    """The journal's session row of ``transport`` (by its client port), once written."""
    port = transport.sock.getsockname()[1]  # type: ignore[union-attr]
    return wait_for(
        lambda: next(
            iter(_journal_rows(db, "SELECT * FROM sessions WHERE remote_port = ?", port)), None
        ),
        what=f"the session from port {port} in the journal",
    )


def _pid_of(process: str) -> int:
    return int(process.split(":")[1])  # node:pid:random


def test_a_killed_child_has_its_sessions_ended_and_the_other_childs_session_is_untouched(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    api = free_port()
    config = write_config(
        tmp_path,
        user_keys,
        {
            "server": {"processes": 2, "session_sweep": 0.3},
            "api": {"listen": f"127.0.0.1:{api}", "tokens": TOKENS},
        },
    )
    db = tmp_path / "state" / "journal.sqlite3"
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    held: dict[int, tuple[paramiko.Transport, paramiko.SFTPClient, sqlite3.Row]] = {}
    try:
        # The kernel picks the child: connect until each child holds one session.
        for _ in range(60):
            transport, sftp = sftp_session(port, "alice")
            row = _session_of(db, transport)
            pid = _pid_of(row["process"])
            if pid in held:
                transport.close()
            else:
                held[pid] = (transport, sftp, row)
            if len(held) == 2:
                break
        assert len(held) == 2, "one child took every session"
        (victim, (_, vsftp, vrow)), (other, (otransport, osftp, orow)) = held.items()
        upload = vsftp.open("open.bin", "wb")
        upload.write(b"x" * 1000)
        wait_for(
            lambda: _journal_rows(
                db, "SELECT 1 FROM operations WHERE session_id = ? AND op = 'open'", vrow["id"]
            ),
            what="the open in the journal",
        )
        http = Client(api)
        live = {s["id"] for s in http("GET", "/v1/sessions", token=READER)[2]["sessions"]}
        assert live == {vrow["id"], orow["id"]}

        os.kill(victim, signal.SIGKILL)

        ended = wait_for(
            lambda: _journal_rows(
                db, "SELECT * FROM sessions WHERE id = ? AND ended_at IS NOT NULL", vrow["id"]
            ),
            timeout=30,
            what="the killed child's session ended",
        )
        assert ended
        (logout,) = _journal_rows(
            db, "SELECT * FROM operations WHERE session_id = ? AND op = 'logout'", vrow["id"]
        )
        match = WHY.match(logout["message"])
        assert match is not None, logout["message"]
        assert int(match.group(1)) == victim
        (incomplete,) = _journal_rows(db, "SELECT * FROM uploads WHERE session_id = ?", vrow["id"])
        assert (incomplete["path"], incomplete["state"]) == ("/open.bin", "incomplete")
        live = {s["id"] for s in http("GET", "/v1/sessions", token=READER)[2]["sessions"]}
        assert live == {orow["id"]}
        # The other child's session was never touched, and still works.
        assert osftp.listdir(".") is not None
        (still,) = _journal_rows(db, "SELECT ended_at FROM sessions WHERE id = ?", orow["id"])
        assert still["ended_at"] is None
        assert (
            _journal_rows(
                db, "SELECT 1 FROM operations WHERE session_id = ? AND op = 'logout'", orow["id"]
            )
            == []
        )
        assert other != victim
        otransport.close()
    finally:
        for transport, _, _ in held.values():
            transport.close()
        serve.stop()


def test_a_single_serve_killed_and_started_again_ends_its_previous_sessions_at_start(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    # A long sweep interval: only the sweep at start can end the session in time.
    config = write_config(
        tmp_path, user_keys, {"server": {"session_sweep": 3600, "gateway_timeout": 7200}}
    )
    db = tmp_path / "state" / "journal.sqlite3"
    port = free_port()
    env = {"SFTPGATE_SERVER__PORT": str(port)}
    serve = ServeProcess(config, env)
    transport, _ = sftp_session(port, "alice")
    try:
        row = _session_of(db, transport)
        assert _pid_of(row["process"]) == serve.proc.pid
        kill_serve(serve.proc)
        assert not _journal_rows(
            db, "SELECT 1 FROM sessions WHERE id = ? AND ended_at IS NOT NULL", row["id"]
        )
        again = ServeProcess(config, env)
        try:
            wait_for(
                lambda: _journal_rows(
                    db, "SELECT 1 FROM sessions WHERE id = ? AND ended_at IS NOT NULL", row["id"]
                ),
                what="the old session ended by the new process",
            )
            (logout,) = _journal_rows(
                db, "SELECT * FROM operations WHERE session_id = ? AND op = 'logout'", row["id"]
            )
            match = WHY.match(logout["message"])
            assert match is not None and int(match.group(1)) == serve.proc.pid
        finally:
            again.stop()
    finally:
        transport.close()
        if serve.proc.poll() is None:
            serve.stop()


@pytest.fixture(scope="module")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


def test_on_postgresql_a_killed_nodes_sessions_are_ended_by_another_after_the_heartbeat_bound(
    tmp_path: Path, user_keys: dict[str, Path], pg: pg_kit.PgServer
) -> None:
    with pg.database() as url:
        nodes: dict[str, tuple[ServeProcess, int]] = {}
        transports: list[paramiko.Transport] = []
        api = free_port()
        try:
            for node in ("east", "west"):
                root = tmp_path / node
                root.mkdir()
                port = free_port()
                sections: dict[str, Any] = {
                    "server": {
                        "port": port,
                        "node": node,
                        "session_sweep": 0.3,
                        "gateway_timeout": 3,
                    },
                    "database": {"url": url},
                    "api": {"tokens": TOKENS},
                }
                if node == "east":
                    sections["api"]["listen"] = f"127.0.0.1:{api}"
                config = write_config(root, user_keys, sections)
                if node == "east":
                    assert main(["db", "migrate", "-c", str(config)]) == 0
                nodes[node] = (ServeProcess(config), port)
            http = Client(api)
            west, _ = sftp_session(nodes["west"][1], "alice")
            transports.append(west)
            east, east_sftp = sftp_session(nodes["east"][1], "carol")
            transports.append(east)

            def listed() -> dict[str, str]:
                rows = http("GET", "/v1/sessions", token=READER)[2]["sessions"]
                return {r["node"]: r["id"] for r in rows} if len(rows) == 2 else {}

            ids = wait_for(listed, what="both sessions listed")
            killed_at = time.monotonic()
            kill_serve(nodes["west"][0].proc)

            def ended() -> list[dict[str, Any]]:
                query = f"/v1/journal?session={ids['west']}&op=logout"
                return list(http("GET", query)[2]["rows"])

            (logout,) = wait_for(ended, timeout=30, what="west's session ended by east")
            assert time.monotonic() - killed_at >= 2.5  # not before the heartbeat bound
            match = WHY.match(logout["message"])
            assert match is not None
            assert (int(match.group(1)), match.group(2)) == (nodes["west"][0].proc.pid, "west")
            rows = http("GET", "/v1/sessions", token=READER)[2]["sessions"]
            assert [r["id"] for r in rows] == [ids["east"]]
            assert east_sftp.listdir(".") is not None
        finally:
            for transport in transports:
                transport.close()
            for proc, _ in nodes.values():
                if proc.proc.poll() is None:
                    proc.stop()


def test_a_gateway_timeout_under_two_sweeps_is_refused_naming_the_key(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    from sftpgate.config import ConfigError, load_config

    config = write_config(
        tmp_path, user_keys, {"server": {"session_sweep": 10, "gateway_timeout": 15}}
    )
    with pytest.raises(ConfigError, match=r"server\.gateway_timeout: must be at least twice"):
        load_config(config)
