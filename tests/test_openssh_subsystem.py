"""`sftpgate subsystem` under a real OpenSSH sshd: the same journal and pipeline as `serve`."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml

from conftest import LoopThread, RunningGateway, start_gateway
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from sftpgate.config import load_config
from sftpgate.gateway import Gateway
from sshd_kit import (
    Sshd,
    TestUser,
    UserFactory,
    need_root,
    openssh_sftp_batch,
    paramiko_sftp,
    start_sshd,
)
from sshd_kit import make_user as make_user
from sshd_kit import shared_dir as shared_dir

SFTPGATE = str(Path(sys.executable).parent / "sftpgate")


@dataclass
class Site:
    """A gateway daemon (in-process) + a private sshd whose Subsystem is `sftpgate subsystem`."""

    gateway: RunningGateway
    sshd: Sshd
    users: list[TestUser]
    shared: Path

    def sftp(self, user: TestUser) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
        return paramiko_sftp(self.sshd, user)


def site_config(shared: Path, users: list[TestUser], extra: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1",
            "port": 0,
            "state_dir": str(shared / "state"),
            "host_keys_dir": str(shared / "hostkeys"),
        },
        "journal": {"synchronous": "normal"},
        "pipeline": {"enabled": False},
        "subsystem": {
            "enabled": True,
            "socket": str(shared / "run" / "events.sock"),
            "spool_dir": str(shared / "spool"),
            "replay_interval": 0.3,
            "ack_timeout": 2,
        },
        "users": [
            {
                "login": u.login,
                "name": "Test",
                "surname": u.login.upper(),
                "email": f"{u.login}@example.org",
                "home": str(u.home),
            }
            for u in users
        ],
    }
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    path = shared / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o644)
    return path


@pytest.fixture
def site_factory(shared_dir: Path, make_user: UserFactory) -> Iterator[Callable[..., Site]]:
    need_root()
    started: list[Site] = []

    def make(extra: dict[str, Any] | None = None, count: int = 2) -> Site:
        users = [make_user() for _ in range(count)]
        config_path = site_config(shared_dir, users, extra or {})
        config = load_config(config_path, environ={})
        loop = LoopThread()
        gateway = Gateway(config)
        loop.run(gateway.start())
        running = RunningGateway(config, gateway, loop, {})
        sshd = start_sshd(
            shared_dir / "sshd", [SFTPGATE, "subsystem", "--config", str(config_path)], users=users
        )
        site = Site(running, sshd, users, shared_dir)
        started.append(site)
        return site

    yield make
    for site in started:
        site.sshd.stop()
        site.gateway.stop()


def do_the_same_things(client: paramiko.SFTPClient) -> None:
    """One script of SFTP actions, run against both front doors."""
    client.mkdir("videos")
    client.putfo(io.BytesIO(b"v" * 70_000), "videos/clip one.mp4")
    client.getfo("videos/clip one.mp4", io.BytesIO(), prefetch=False)
    client.rename("videos/clip one.mp4", "videos/final.mp4")
    client.chmod("videos/final.mp4", 0o640)
    client.listdir("videos")
    client.putfo(io.BytesIO(b"p" * 5_000), "movie.mp4.filepart")
    client.rename("movie.mp4.filepart", "movie.mp4")
    with pytest.raises(FileNotFoundError):
        client.remove("missing.txt")
    client.remove("videos/final.mp4")
    client.rmdir("videos")


def comparable(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keep = {
        "login",
        "logout",
        "mkdir",
        "open",
        "close",
        "rename",
        "setstat",
        "list",
        "remove",
        "rmdir",
    }
    return [
        (r["op"], r["path"], r["path2"], r["status"], r["bytes_read"] or 0, r["bytes_written"] or 0)
        for r in rows
        if r["op"] in keep
    ]


def wait_for(
    gateway: RunningGateway,
    predicate: Callable[[list[dict[str, Any]]], bool],
    sql: str = "SELECT * FROM operations ORDER BY id",
) -> list[dict[str, Any]]:
    return gateway.wait_rows(predicate, sql=sql, timeout=20)


def test_paramiko_actions_give_the_same_journal_rows_as_serve(
    site_factory: Callable[..., Site], tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    site = site_factory()
    user = site.users[0]
    transport, client = site.sftp(user)
    do_the_same_things(client)
    transport.close()
    tapped = wait_for(site.gateway, lambda rs: any(r["op"] == "logout" for r in rs))

    serve = start_gateway(tmp_path, user_keys)
    try:
        client = serve.sftp("alice")
        do_the_same_things(client)
        serve.close_clients()
        served = serve.wait_rows(lambda rs: any(r["op"] == "logout" for r in rs))
    finally:
        serve.stop()

    assert comparable(tapped) == comparable(served)
    assert {r["login"] for r in tapped} == {user.login}
    uploads = site.gateway.rows("SELECT path, state, bytes FROM uploads ORDER BY id")
    assert uploads == [
        {"path": "/videos/clip one.mp4", "state": "complete", "bytes": 70_000},
        {"path": "/movie.mp4", "state": "complete", "bytes": 5_000},
    ]
    (session,) = site.gateway.rows("SELECT * FROM sessions")
    assert session["auth_method"] == "openssh"
    assert session["remote_addr"] == "127.0.0.1" and session["ended_at"]


def test_openssh_sftp_client_through_the_tap(site_factory: Callable[..., Site]) -> None:
    site = site_factory()
    user = site.users[0]
    local = site.shared / "local"
    local.mkdir()
    os.chown(local, user.uid, user.gid)
    (local / "a b.mp4").write_bytes(b"x" * 12_345)
    result = openssh_sftp_batch(
        site.sshd,
        user,
        """\
put "a b.mp4"
rename "a b.mp4" c.mp4
ls -l
rm c.mp4
""",
        local,
    )
    assert result.returncode == 0, result.stderr
    rows = wait_for(site.gateway, lambda rs: any(r["op"] == "logout" for r in rs))
    ops = [
        (r["op"], r["path"], r["path2"]) for r in rows if r["op"] in ("close", "rename", "remove")
    ]
    assert ops == [
        ("close", "/a b.mp4", None),
        ("rename", "/a b.mp4", "/c.mp4"),
        ("remove", "/c.mp4", None),
    ]


def test_an_upload_reaches_the_journal_while_its_session_stays_open_and_quiet(
    site_factory: Callable[..., Site],
) -> None:
    # The tap gathers events for a few ms before sending them; with no more
    # traffic to wake it, its poll timeout must still hand them to the daemon.
    site = site_factory()
    transport, client = site.sftp(site.users[0])
    try:
        client.putfo(io.BytesIO(b"q" * 4096), "quiet.mp4")
        uploads = wait_for(
            site.gateway,
            lambda rs: len(rs) == 1,
            sql="SELECT path, state, bytes FROM uploads",
        )
        assert uploads == [{"path": "/quiet.mp4", "state": "complete", "bytes": 4096}]
        assert transport.is_active()  # the session never ended: nothing flushed it at close
    finally:
        client.close()
        transport.close()


def test_upload_cut_off_midway_is_incomplete(site_factory: Callable[..., Site]) -> None:
    site = site_factory()
    transport, client = site.sftp(site.users[0])
    f = client.open("cut.mp4", "w")
    f.write(b"c" * 65536)
    f.flush()
    sock = transport.sock
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    uploads = wait_for(
        site.gateway, lambda rs: len(rs) == 1, sql="SELECT path, state, bytes FROM uploads"
    )
    assert uploads == [{"path": "/cut.mp4", "state": "incomplete", "bytes": 65536}]
    del f


def test_uploaded_video_goes_through_the_pipeline_to_one_email(
    site_factory: Callable[..., Site], tmp_path: Path
) -> None:
    smtp = SmtpServer().start()
    try:
        site = site_factory(pipeline_settings(smtp.port))
        user = site.users[0]
        transport, client = site.sftp(user)
        client.put(str(make_clip(tmp_path / "c.mp4", "mp4")), "holiday.mp4")
        transport.close()
        (job,) = wait_jobs(site.gateway, settled)
        assert (job["state"], job["outcome"]) == ("succeeded", "converted"), job
        (message,) = smtp.inbox.messages
        assert message["To"] == f"{user.login}@example.org"
        flv = user.home / "converted" / "holiday.flv"
        assert flv.stat().st_uid == user.uid  # the daemon is root; outputs are the user's
    finally:
        smtp.stop()


FORGER = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
event = {"op": "close", "session": {"id": "forged", "remote_addr": "1.2.3.4",
         "remote_port": 1, "login": sys.argv[2], "client_version": None,
         "auth_method": "openssh", "started_at": 0}, "time": 1, "path": sys.argv[3],
         "path2": None, "flags": 2, "mode": None, "attrs": None, "bytes_read": 0,
         "bytes_written": 99, "duration": 0.1, "status": "ok", "message": None,
         "upload": "complete", "key": "k1"}
sock.sendall(json.dumps({"seq": 1, "event": event}).encode() + b"\\n")
sock.shutdown(socket.SHUT_WR)
print(sock.makefile().read())
"""


def test_forged_events_on_the_socket_are_refused_and_journaled(
    site_factory: Callable[..., Site],
) -> None:
    site = site_factory(count=2)
    mallory, victim = site.users
    sock = str(site.gateway.config.subsystem.socket)
    script = site.shared / "forge.py"
    script.write_text(FORGER)
    script.chmod(0o644)
    attempts = [
        (victim.login, str(victim.home / "evil.mp4")),  # another user's name
        (mallory.login, str(victim.home / "evil.mp4")),  # own name, other's path
        (mallory.login, "/etc/passwd"),
    ]  # outside any home
    for login, path in attempts:
        out = subprocess.run(
            [sys.executable, str(script), sock, login, path],
            user=mallory.uid,
            group=mallory.gid,
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        assert '"ack": 1' in out.stdout  # answered, so the tap would not spool it
    rows = wait_for(site.gateway, lambda rs: sum(r["status"] == "refused" for r in rs) == 3)
    assert {r["login"] for r in rows} == {mallory.login}
    assert all("refused event" in r["message"] for r in rows)
    assert site.gateway.rows("SELECT * FROM uploads") == []


def test_daemon_down_during_an_upload_spools_and_replays_once(
    site_factory: Callable[..., Site], tmp_path: Path
) -> None:
    smtp = SmtpServer().start()
    try:
        site = site_factory(pipeline_settings(smtp.port))
        user = site.users[0]
        gateway = site.gateway.gateway
        transport, client = site.sftp(user)  # the tap connects and journals the login
        wait_for(site.gateway, lambda rs: any(r["op"] == "login" for r in rs))
        assert gateway.tap_daemon is not None
        clip = make_clip(tmp_path / "c.mp4", "mp4").read_bytes()
        half = len(clip) // 2
        with client.open("late.mp4", "w") as upload:
            upload.write(clip[:half])
            upload.flush()
            site.gateway.loop.run(gateway.tap_daemon.stop())  # the daemon dies mid-upload
            upload.write(clip[half:])  # ...and the transfer goes on
        assert (user.home / "late.mp4").read_bytes() == clip
        transport.close()
        spool = site.shared / "spool"
        deadline = time.monotonic() + 20
        while not list(spool.glob("*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.1)
        (spooled,) = list(spool.glob("*.jsonl"))
        assert spooled.stat().st_uid == user.uid
        assert site.gateway.rows("SELECT * FROM uploads") == []

        site.gateway.loop.run(gateway.tap_daemon.start())  # back: the spool is replayed
        (job,) = wait_jobs(site.gateway, settled)
        assert job["state"] == "succeeded" and job["path"] == "/late.mp4"
        assert len(smtp.inbox.messages) == 1
        assert not list(spool.glob("*.jsonl"))
        rows = site.gateway.rows("SELECT op FROM operations WHERE op IN ('login', 'logout')")
        assert [r["op"] for r in rows] == ["login", "logout"]  # nothing journaled twice
    finally:
        smtp.stop()


def test_garbage_from_the_client_is_relayed_and_journaled_as_a_protocol_error(
    site_factory: Callable[..., Site],
) -> None:
    site = site_factory()
    transport, client = site.sftp(site.users[0])
    client.listdir(".")
    chan = client.get_channel()
    assert chan is not None
    chan.sendall(b"\x00\x00\x00\x02\xff")  # a packet too short to be SFTP: sftp-server quits
    rows = wait_for(site.gateway, lambda rs: any(r["op"] == "protocol_error" for r in rs))
    (error,) = [r for r in rows if r["op"] == "protocol_error"]
    assert error["status"] == "bad_message"
    transport.close()
    json.dumps(error)
