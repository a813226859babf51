"""Both front doors journal the same rows for the same client script, field by field.

One gateway serves two real users: one reaches it through ``serve`` (the
gateway's own SSH port), the other through a private OpenSSH sshd whose
``Subsystem sftp`` is ``sftpgate subsystem`` (the tap). Both homes start the
same, both clients run the same script, and every journal row of the two
sessions must agree on op, path, path2, flags, mode, attrs, bytes, status,
message and upload state: what a request means is decided once
(``sftpgate.sftp.policy``) and status names come from one table.
"""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from test_openssh_subsystem import SFTPGATE, Site, site_config

from conftest import LoopThread, RunningGateway
from sftpgate.config import load_config
from sftpgate.gateway import Gateway
from sshd_kit import TestUser, UserFactory, need_root, paramiko_sftp, start_sshd
from sshd_kit import make_user as make_user
from sshd_kit import shared_dir as shared_dir

ROWS = """
SELECT o.id, o.session_id, o.login, o.op, o.path, o.path2, o.flags, o.mode, o.attrs,
       o.bytes_read, o.bytes_written, o.status, o.message, u.state AS upload, u.bytes AS size
FROM operations o LEFT JOIN uploads u ON u.operation_id = o.id
ORDER BY o.id
"""
FIELDS = (
    "op",
    "path",
    "path2",
    "flags",
    "mode",
    "attrs",
    "bytes_read",
    "bytes_written",
    "status",
    "message",
    "upload",
    "size",
)


@pytest.fixture
def both_doors(shared_dir: Path, make_user: UserFactory) -> Iterator[Site]:
    """A site whose two users may log in to ``serve`` with their keys as well."""
    need_root()
    users = [make_user(), make_user()]
    path = site_config(shared_dir, users, {})
    data = yaml.safe_load(path.read_text())
    for entry, user in zip(data["users"], users, strict=True):
        entry["authorized_keys"] = [user.public_key]
    path.write_text(yaml.safe_dump(data))
    config = load_config(path, environ={})
    loop = LoopThread()
    gateway = Gateway(config)
    loop.run(gateway.start())
    running = RunningGateway(config, gateway, loop, {u.login: u.key_path for u in users})
    sshd = start_sshd(
        shared_dir / "sshd", [SFTPGATE, "subsystem", "--config", str(path)], users=users
    )
    try:
        yield Site(running, sshd, users, shared_dir)
    finally:
        sshd.stop()
        running.stop()


def prepare_home(user: TestUser) -> None:
    """What both homes hold before the script: a stale temporary file and a folder the user
    may not write in (root's)."""
    stale = user.home / "stale.mp4.part"
    stale.write_bytes(b"s" * 3000)
    os.chown(stale, user.uid, user.gid)
    locked = user.home / "locked"
    locked.mkdir(mode=0o755)


def script(client: paramiko.SFTPClient) -> None:
    """The same requests, in the same order, through either front door (relative paths:
    both doors show them from the home)."""
    client.mkdir("videos")
    client.putfo(io.BytesIO(b"v" * 70_000), "videos/clip.mp4")  # upload
    client.getfo("videos/clip.mp4", io.BytesIO(), prefetch=False)  # download
    client.rename("videos/clip.mp4", "videos/final.mp4")
    client.chmod("videos/final.mp4", 0o640)  # setstat
    client.listdir("videos")  # listing
    client.putfo(io.BytesIO(b"p" * 5_000), "movie.mp4.part")  # temporary name ...
    client.rename("movie.mp4.part", "movie.mp4")  # ... completed by its rename
    client.rename("stale.mp4.part", "stale.mp4")  # a temporary name this session never wrote
    client.symlink("movie.mp4", "link.mp4")
    with pytest.raises(PermissionError):
        client.putfo(io.BytesIO(b"x"), "locked/x.mp4")  # a refused path
    with pytest.raises(FileNotFoundError):
        client.open("absent.mp4", "r")  # a failed open
    with pytest.raises(FileNotFoundError):
        client.remove("missing.txt")
    client.remove("link.mp4")
    client.remove("videos/final.mp4")
    client.rmdir("videos")


def cut_off(transport: paramiko.Transport, client: paramiko.SFTPClient) -> None:
    """An upload whose TCP connection drops midway."""
    f = client.open("cut.mp4", "w")
    f.write(b"c" * 65536)
    f.flush()
    sock = transport.sock
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def session_rows(gateway: RunningGateway, login: str, sessions: int) -> list[list[dict[str, Any]]]:
    """The rows of ``login``'s sessions, once all ``sessions`` have logged out."""

    def done(rows: list[dict[str, Any]]) -> bool:
        return sum(r["op"] == "logout" and r["login"] == login for r in rows) >= sessions

    rows = [r for r in gateway.wait_rows(done, sql=ROWS, timeout=30) if r["login"] == login]
    by_session: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_session.setdefault(row["session_id"], []).append(row)
    return list(by_session.values())


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        item = {name: row[name] for name in FIELDS}
        if item["attrs"] is not None:
            item["attrs"] = json.loads(item["attrs"])
        if item["op"] in ("login", "logout"):
            # How the SSH connection ended is sshd's to know, not the tap's:
            # serve says why (e.g. "Connection lost"); the SFTP rows are the point.
            item["message"] = None
        out.append(item)
    return out


def run_through(
    connect: Callable[[], tuple[paramiko.Transport, paramiko.SFTPClient]],
) -> None:
    transport, client = connect()
    script(client)
    client.close()
    transport.close()
    transport, client = connect()
    cut_off(transport, client)


def test_the_same_script_gives_the_same_rows_through_serve_and_the_tap(
    both_doors: Site,
) -> None:
    tapped_user, served_user = both_doors.users
    prepare_home(tapped_user)
    prepare_home(served_user)
    gateway = both_doors.gateway

    run_through(lambda: paramiko_sftp(both_doors.sshd, tapped_user))

    def serve_client() -> tuple[paramiko.Transport, paramiko.SFTPClient]:
        transport = gateway.transport(served_user.login, key=True)
        client = paramiko.SFTPClient.from_transport(transport)
        assert client is not None
        return transport, client

    run_through(serve_client)

    tapped = session_rows(gateway, tapped_user.login, 2)
    served = session_rows(gateway, served_user.login, 2)
    assert len(tapped) == len(served) == 2
    for tapped_session, served_session in zip(tapped, served, strict=True):
        mine, theirs = comparable(tapped_session), comparable(served_session)
        for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
            assert a == b, f"row {i}: tap {a} != serve {b}"
        assert len(mine) == len(theirs), (mine, theirs)

    main, cut = comparable(tapped[0]), comparable(tapped[1])
    uploads = [(r["op"], r["path"], r["upload"], r["size"]) for r in main + cut if r["upload"]]
    assert uploads == [
        ("close", "/videos/clip.mp4", "complete", 70_000),
        ("rename", "/movie.mp4.part", "complete", 5_000),
        ("close", "/cut.mp4", "incomplete", 65536),
    ]
    (stale,) = [r for r in main if r["path"] == "/stale.mp4.part"]
    assert stale["message"] == (
        "nothing written under the temporary name in this session: not an upload"
    )
    refused = [r for r in main if r["path"] == "/locked/x.mp4"]
    assert [(r["op"], r["status"]) for r in refused] == [("open", "permission_denied")]
    (absent,) = [r for r in main if r["path"] == "/absent.mp4"]
    assert (absent["op"], absent["status"], absent["message"]) == (
        "open",
        "no_such_file",
        "No such file",
    )
