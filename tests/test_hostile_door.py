"""Attacks on the door, each with a bystander working through it (tests/hostile_kit.py).

Attackers connect from their own loopback addresses (127.0.0.2 …) so that bans
and per-address limits hit them and not the bystander (127.0.0.1). The
password spray and the flood run the gateway as a real `sftpgate serve`
process: its descriptor limit, its own interpreter lock and its stderr are
part of what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest
from test_serve_process import ServeProcess

from conftest import PASSWORDS, free_port, start_gateway, write_config
from hostile_kit import Bystander, connect_from, login_from, open_fds
from rawsftp import frame
from sftpgate.cli.main import main


def rows(journal: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(journal, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def greeted(source: str, port: int) -> bool:
    """Whether the gateway sends its version line to a connection from ``source``."""
    sock = connect_from(source, port, timeout=5)
    try:
        return sock.recv(64).startswith(b"SSH-2.0-")
    except ConnectionResetError:
        return False
    finally:
        sock.close()


class Spray:
    """Wrong passwords from one address, on ``threads`` connections at a time, up to ``attempts``
    (each refused connection counts as one attempt)."""

    def __init__(self, port: int, source: str, attempts: int, logins: tuple[str, ...]) -> None:
        self.port, self.source, self.logins = port, source, logins
        self.left = attempts
        self.refused_at_door = 0
        self.failed = 0
        self.disconnected = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _take(self) -> int | None:
        with self.lock:
            if self.left <= 0 or self.stop.is_set():
                return None
            self.left -= 1
            return self.left

    def _worker(self) -> None:
        while (n := self._take()) is not None:
            try:
                t = paramiko.Transport(connect_from(self.source, self.port, timeout=10))
            except OSError:
                with self.lock:
                    self.refused_at_door += 1
                continue
            try:
                t.banner_timeout = 10
                try:
                    t.start_client(timeout=10)
                except (paramiko.SSHException, EOFError, OSError):
                    with self.lock:
                        self.refused_at_door += 1
                    continue
                for _ in range(6):
                    login = self.logins[n % len(self.logins)]
                    try:
                        t.auth_password(login, f"wrong-{n}")
                    except paramiko.AuthenticationException:
                        with self.lock:
                            self.failed += 1
                    except (paramiko.SSHException, EOFError, OSError):
                        with self.lock:
                            self.disconnected += 1
                        break
                    if (n := self._take()) is None:
                        break
            finally:
                t.close()

    def run(self, threads: int) -> threading.Thread:
        workers = [threading.Thread(target=self._worker, daemon=True) for _ in range(threads)]
        for w in workers:
            w.start()

        def join() -> None:
            for w in workers:
                w.join(120)

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        return joiner


def test_password_spray_is_banned_bystander_unharmed_safelist_honoured_ban_ends(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    ban_time = 4.0
    config = write_config(
        tmp_path,
        user_keys,
        {
            "defender": {
                "threshold": 10,
                "ban_time": ban_time,
                "auth_failure_delay": 0.05,
                "reload_interval": 0.2,
                "safelist": ["127.0.0.1", "127.0.0.3"],
            }
        },
    )
    journal = tmp_path / "state" / "journal.sqlite3"
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    try:
        with Bystander(port, "carol", PASSWORDS["carol"]) as bystander:
            # A safelisted address sprays unknown logins (each a full scrypt of the dummy
            # hash) the whole time: never banned, and the hash pool stays fair.
            safe = Spray(port, "127.0.0.3", 10_000, ("nobody", "ghost"))
            safe_done = safe.run(threads=2)
            spray = Spray(port, "127.0.0.2", 500, ("alice", "root", "admin"))
            spray.run(threads=4).join(120)
            assert spray.left == 0
            banned = rows(journal, "SELECT * FROM bans WHERE address = '127.0.0.2'")
            assert banned, "the sprayer was never banned"
            # The ban ends by itself after its time (the gateway's clock; we wait for it).

            def lifted() -> bool:
                if not greeted("127.0.0.2", port):
                    return False
                login_from("127.0.0.2", port, "alice", PASSWORDS["alice"]).close()
                return True

            wait_for("the ban to end", lifted, timeout=ban_time + 20)
            lifted_at = time.time()
            safe.stop.set()
            safe_done.join(60)
        # Idle, a round takes ~0.15 s; before the hasher was fair, logins alone took 2.8 s.
        bystander.check(most=1.5, at_least=6)
        ban = banned[0]
        assert lifted_at >= ban["until"] - 0.5, "the ban ended early"
        assert ban["until"] - ban["created_at"] == pytest.approx(ban_time)
        # Nearly all of the 500 were refused at the door, before any handshake.
        assert spray.refused_at_door >= 400, vars(spray)
        assert spray.failed + spray.disconnected <= 60, vars(spray)
        # The safelisted sprayer kept trying and was never refused nor banned.
        assert safe.failed >= 30 and safe.refused_at_door == 0, vars(safe)
        assert not rows(journal, "SELECT * FROM bans WHERE address = '127.0.0.3'")
        sql = (
            "SELECT * FROM operations WHERE remote_addr = '127.0.0.2' "
            "AND op IN ('ban', 'unban', 'refused') ORDER BY id"
        )
        wait_for(
            "the ban and its end in the journal",
            lambda: {"ban", "unban"} <= {r["op"] for r in rows(journal, sql)},
        )
        ops = rows(journal, sql)
        assert any("connection refused: banned until" in (r["message"] or "") for r in ops)
    finally:
        assert serve.stop() == 0
    log = "".join(serve.lines)
    assert "Traceback" not in log and "Internal error" not in log
    assert "banned 127.0.0.2" in log


def test_bans_cli_round_trip_with_a_running_gateway_and_a_restart(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"defender": {"reload_interval": 0.2}}
    running = start_gateway(tmp_path, user_keys, extra=extra)
    config = str(running.config.path)
    try:
        assert greeted("127.0.0.5", running.port)
        assert main(["bans", "add", "127.0.0.5", "--time", "600", "-c", config]) == 0
        wait_for("the gateway to take the ban", lambda: not greeted("127.0.0.5", running.port))
        assert greeted("127.0.0.6", running.port)  # only that address
        capsys.readouterr()
        assert main(["bans", "list", "--json", "-c", config]) == 0
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(b["address"], b["active"]) for b in listed] == [("127.0.0.5", True)]
        assert listed[0]["until"] - time.time() > 590
    finally:
        running.stop()
    # A restart keeps the ban: refused from the very first connection.
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        assert not greeted("127.0.0.5", running.port)
        assert main(["bans", "remove", "127.0.0.5", "-c", config]) == 0
        wait_for("the gateway to lift the ban", lambda: greeted("127.0.0.5", running.port))
        assert main(["bans", "remove", "127.0.0.5", "-c", config]) == 1  # nothing there now
        assert main(["bans", "add", "not-an-address", "-c", config]) == 2
        journaled = running.wait_rows(
            lambda rs: [r["op"] for r in rs] == ["ban", "unban"],
            sql="SELECT * FROM operations WHERE op IN ('ban', 'unban') ORDER BY id",
        )
        assert "by sftpgate bans add" in journaled[0]["message"]
        assert all(r["remote_addr"] == "127.0.0.5" for r in journaled)
    finally:
        running.stop()


def test_preauth_flood_under_1024_descriptors_leaves_real_logins_working(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # this test process holds the attacker's side of every socket
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    config = write_config(tmp_path, user_keys, {"door": {"banner_timeout": 3}})
    port = free_port()
    serve = ServeProcess(
        config,
        {"SFTPGATE_SERVER__PORT": str(port)},
        command=[
            "prlimit",
            "--nofile=1024:1024",
            sys.executable,
            "-m",
            "sftpgate",
            "serve",
            "--config",
            str(config),
        ],
    )
    pid = serve.proc.pid  # prlimit execs the gateway: same process
    held: list[socket.socket] = []
    most_fds = 0
    try:
        assert "descriptor limit 1024" in "".join(serve.lines)
        with Bystander(port, "carol", PASSWORDS["carol"]) as bystander:
            # What the gateway holds before the flood (journal, pools, the bystander's session).
            baseline = open_fds(pid)
            # Three addresses hold a few connections each that send a version line and stop.
            for n in (3, 4, 5):
                for _ in range(8):
                    sock = connect_from(f"127.0.0.{n}", port)
                    sock.sendall(b"SSH-2.0-stall\r\n")
                    held.append(sock)
            # One address opens 1,100 silent connections and keeps them.
            for n in range(1100):
                with contextlib.suppress(OSError):  # counted by what the gateway saw
                    held.append(connect_from("127.0.0.2", port, timeout=5))
                if n % 100 == 0:
                    most_fds = max(most_fds, open_fds(pid))
            wait_for(
                "the banner timeout to close the silent ones",
                lambda: open_fds(pid) < 100,
                timeout=15,
            )
            most_fds = max(most_fds, open_fds(pid))
        bystander.check(most=2.0, at_least=4)
        # Unauthenticated connections are capped at a quarter of the 1,024 descriptors
        # (256); a refused one holds its descriptor only until it is closed.
        assert most_fds < baseline + 256 + 16, (most_fds, baseline)
        # The flooder ends up banned (limit hits and silent connections both count).
        t = paramiko.Transport(("127.0.0.1", port))
        t.connect(username="alice", password=PASSWORDS["alice"])
        t.close()
    finally:
        for sock in held:
            sock.close()
        assert serve.stop() == 0
    log = "".join(serve.lines)
    assert "Traceback" not in log, log[-3000:]
    assert "Too many open files" not in log
    assert "banned 127.0.0.2" in log
    assert len(serve.lines) < 200, f"{len(serve.lines)} log lines"
    journal = tmp_path / "state" / "journal.sqlite3"
    refused = rows(journal, "SELECT * FROM operations WHERE op = 'refused'")
    assert any(
        "too many unauthenticated connections from 127.0.0.2" in r["message"] for r in refused
    )
    assert any("no SSH version line" in r["message"] for r in refused)


def test_500_sessions_of_one_user_are_capped_refused_clearly_and_journaled(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    running = start_gateway(
        tmp_path,
        user_keys,
        extra={"door": {"max_sessions_per_user": 8, "max_channels": 3}},
    )
    kept: list[paramiko.Transport] = []
    try:
        with Bystander(running.port, "carol", PASSWORDS["carol"]) as bystander:
            working = refused = 0
            for _ in range(500):
                try:
                    t = login_from("127.0.0.2", running.port, "alice", PASSWORDS["alice"])
                except (paramiko.SSHException, EOFError, OSError):
                    refused += 1
                    continue
                try:
                    sftp = paramiko.SFTPClient.from_transport(t)
                    assert sftp is not None
                    sftp.listdir(".")
                    working += 1
                    kept.append(t)
                except (paramiko.SSHException, EOFError, OSError):
                    refused += 1
                    t.close()
            assert working == 8 and refused == 492
            assert running.gateway.guard is not None
            assert running.gateway.guard.door.sessions <= 9  # 8, and the bystander's
            # Another address sees why: an SSH disconnect that names the limit.
            reason = asyncio.run(_disconnect_reason(running.port, "127.0.0.4"))
            assert reason.startswith("too many sessions for alice (at most 8)"), reason
            # More SFTP sessions on one connection than max_channels: refused.
            extra = [kept[1].open_session() for _ in range(2)]  # and its SFTP session: 3
            with pytest.raises(paramiko.ChannelException) as opened:
                kept[1].open_session()
            assert opened.value.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
            for chan in extra:
                chan.close()

            def reopened() -> bool:
                try:
                    kept[1].open_session().close()
                except paramiko.ChannelException:
                    return False
                return True

            wait_for("closed channels to be counted out", reopened)
        bystander.check(most=2.0, at_least=2)
        journaled = running.wait_rows(
            lambda rs: any(r["op"] == "ban" for r in rs),
            sql="SELECT * FROM operations WHERE remote_addr = '127.0.0.2' ORDER BY id",
        )
        messages = [r["message"] for r in journaled if r["op"] == "refused"]
        assert "session refused: too many sessions for alice (at most 8)" in messages
        assert any("connection refused: banned" in m for m in messages)
        assert any(
            "too many SFTP sessions on one connection" in (r["message"] or "")
            for r in running.rows("SELECT * FROM operations WHERE op = 'refused'")
        )
    finally:
        for t in kept:
            t.close()
    # Once they log out alice may log in again, from anywhere not banned.
    wait_for(
        "the sessions to be counted out",
        lambda: running.gateway.guard is not None and running.gateway.guard.door.sessions == 0,
    )
    running.sftp("alice").listdir(".")
    running.stop()


async def _disconnect_reason(port: int, source: str) -> str:
    lost: list[Exception | None] = []

    class Client(asyncssh.SSHClient):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    try:
        conn, _ = await asyncssh.create_connection(
            Client,
            "127.0.0.1",
            port,
            local_addr=(source, 0),
            username="alice",
            password=PASSWORDS["alice"],
            known_hosts=None,
            client_keys=None,
        )
    except asyncssh.DisconnectError as exc:
        assert exc.code == asyncssh.DISC_TOO_MANY_CONNECTIONS
        return exc.reason
    await asyncio.wait_for(conn.wait_closed(), 10)
    exc = lost[0]
    assert isinstance(exc, asyncssh.DisconnectError), exc
    assert exc.code == asyncssh.DISC_TOO_MANY_CONNECTIONS
    return exc.reason


def test_sftp_garbage_in_serve_is_journaled_as_a_protocol_error_and_scored(
    tmp_path: Path, user_keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    running = start_gateway(
        tmp_path, user_keys, extra={"defender": {"threshold": 6, "score_protocol_error": 3}}
    )
    try:
        t = login_from("127.0.0.7", running.port, "alice", PASSWORDS["alice"])
        try:
            for payload in (
                struct.pack(">BI", 3, 1),  # an OPEN where the INIT must be
                struct.pack(">I", 0xFFFFFFF0),  # a packet "4 GiB" long
            ):
                chan = t.open_session()
                chan.invoke_subsystem("sftp")
                chan.sendall(payload if len(payload) == 4 else frame(payload))
                wait_for("the gateway to end the channel", lambda c=chan: c.recv(1) == b"")
                chan.close()
        finally:
            t.close()
        errors = running.wait_rows(
            lambda rs: len(rs) == 2,
            sql="SELECT * FROM operations WHERE op = 'protocol_error' ORDER BY id",
        )
        assert [(r["status"], r["login"], r["remote_addr"]) for r in errors] == [
            ("bad_message", "alice", "127.0.0.7")
        ] * 2
        assert "Expected init message" in errors[0]["message"]
        assert "Max packet size exceeded" in errors[1]["message"]
        # Two of them reach the threshold of 6: the address is banned.
        assert not greeted("127.0.0.7", running.port)
        assert running.op_rows("ban")[0]["remote_addr"] == "127.0.0.7"
    finally:
        running.stop()
    assert "Traceback" not in caplog.text and "Internal error" not in caplog.text


def test_running_out_of_descriptors_logs_one_line_not_a_traceback_per_accept(
    tmp_path: Path, user_keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # What asyncio reports when accept() fails with EMFILE, a hundred times: the door's caps
    # keep a real process from getting there (the flood test), so the report is made here.
    running = start_gateway(tmp_path, user_keys)
    try:

        async def out_of_descriptors() -> None:
            loop = asyncio.get_running_loop()
            for _ in range(100):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    }
                )

        running.loop.run(out_of_descriptors())
    finally:
        running.stop()
    lines = [r for r in caplog.records if "out of descriptors" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING" and lines[0].exc_info is None
    assert not [r for r in caplog.records if "out of system resource" in r.getMessage()]
