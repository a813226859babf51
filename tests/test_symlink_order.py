"""SYMLINK's two paths read as OpenSSH's sftp-server reads them, whichever client sends them.

OpenSSH swapped the draft's order (the target first, then the link) and
OpenSSH's sftp, paramiko and libssh2 (curl) all follow it; asyncssh's client
sends the draft's order to a server whose version does not name OpenSSH.
Each client here makes `link` point to `target.txt`; none may make it the
other way round.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from test_curl_client import run_curl
from test_openssh_client import run_sftp_batch

from conftest import RunningGateway, asyncssh_login


def _curl(gateway: RunningGateway, tmp: Path) -> str:
    run_curl(gateway, "", "-Q", "symlink target.txt link", cwd=tmp)
    return "alice"


def _openssh(gateway: RunningGateway, tmp: Path) -> str:
    run_sftp_batch(gateway, "bob", "ln -s target.txt link\n", tmp)
    return "bob"


def _paramiko(gateway: RunningGateway, tmp: Path) -> str:
    gateway.sftp("alice").symlink("target.txt", "link")  # paramiko: symlink(source, dest)
    return "alice"


def _asyncssh(gateway: RunningGateway, tmp: Path) -> str:
    async def make() -> None:
        async with asyncssh_login(gateway.port) as conn, conn.start_sftp_client() as sftp:
            await sftp.symlink("target.txt", "link")  # asyncssh: symlink(oldpath, newpath)

    gateway.loop.run(make())
    return "alice"


@pytest.mark.parametrize("client", [_curl, _openssh, _paramiko, _asyncssh])
def test_every_client_makes_the_link_point_to_the_target(
    gateway: RunningGateway, tmp_path: Path, client: Callable[[RunningGateway, Path], str]
) -> None:
    for login in ("alice", "bob"):
        (gateway.home(login) / "target.txt").write_text(login)
    login = client(gateway, tmp_path)

    home = gateway.home(login)
    assert os.readlink(home / "link") == "target.txt"
    assert (home / "target.txt").is_file() and not (home / "target.txt").is_symlink()
    (row,) = gateway.op_rows("symlink")
    assert (row["login"], row["path"], row["path2"], row["status"]) == (
        login,
        "/link",
        "target.txt",
        "ok",
    )
