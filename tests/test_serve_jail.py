"""Every way out of the home, tried with a real client against a real server."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import time
from pathlib import Path

import paramiko
import pytest

from conftest import RunningGateway

SECRET = b"outside the home"


@pytest.fixture
def outside(gateway: RunningGateway) -> Path:
    """A folder beside the homes with a secret file, and outward links planted in alice's home
    (as someone with shell access on the NFS server could)."""
    folder = gateway.config.path.parent / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(SECRET)
    home = gateway.home("alice")
    os.symlink(folder, home / "escape")
    os.symlink(folder / "secret.txt", home / "secret-link")
    os.symlink("../../outside", home / "relative-escape")
    return folder


def _journal_refusals(gateway: RunningGateway, count: int) -> list[dict[str, object]]:
    rows = gateway.wait_rows(
        lambda rs: sum(r["status"] == "permission_denied" for r in rs) >= count
    )
    return [r for r in rows if r["status"] == "permission_denied"]


def test_dotdot_and_absolute_paths_stay_inside_the_home(
    gateway: RunningGateway, sftp: paramiko.SFTPClient, outside: Path
) -> None:
    for path in (
        "../outside/secret.txt",
        "../../outside/secret.txt",
        "/../../../outside/secret.txt",
        str(outside / "secret.txt"),
        "a/../../../../etc/passwd",
    ):
        with pytest.raises(FileNotFoundError):
            sftp.open(path).read()
    assert sftp.normalize("../../..") == "/"
    assert sftp.normalize(".") == "/"
    # Writing to such a path lands inside the home, never outside.
    sftp.putfo(io.BytesIO(b"mine"), "../../../x.txt")
    assert (gateway.home("alice") / "x.txt").read_bytes() == b"mine"
    assert not (gateway.home("alice").parent.parent / "x.txt").exists()
    assert (outside / "secret.txt").read_bytes() == SECRET


def test_existing_symlinks_pointing_out_cannot_be_followed(
    gateway: RunningGateway, sftp: paramiko.SFTPClient, outside: Path
) -> None:
    attempts = [
        lambda: sftp.open("secret-link").read(),
        lambda: sftp.open("escape/secret.txt").read(),
        lambda: sftp.open("relative-escape/secret.txt").read(),
        lambda: sftp.listdir("escape"),
        lambda: sftp.stat("secret-link"),
        lambda: sftp.open("escape/new.txt", "w").write(b"x"),
        lambda: sftp.mkdir("escape/newdir"),
        lambda: sftp.remove("escape/secret.txt"),
        lambda: sftp.rename("escape/secret.txt", "stolen.txt"),
        lambda: sftp.normalize("escape"),
        lambda: sftp.readlink("secret-link"),
        lambda: sftp.chmod("secret-link", 0o777),
    ]
    for attempt in attempts:
        with pytest.raises(PermissionError):
            attempt()
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    refusals = _journal_refusals(gateway, len(attempts) - 2)  # stat/realpath too
    assert {r["path"] for r in refusals} >= {"/secret-link", "/escape/secret.txt", "/escape"}


def test_hard_link_to_a_file_outside_is_refused(
    gateway: RunningGateway, sftp: paramiko.SFTPClient, outside: Path
) -> None:
    assert sftp.sock is not None
    # paramiko has no hardlink call; asyncssh's client speaks hardlink@openssh.com.
    import asyncio

    import asyncssh

    async def hardlink() -> None:
        async with (
            asyncssh.connect(
                "127.0.0.1",
                gateway.port,
                username="alice",
                password="alice-secret",
                known_hosts=None,
                client_keys=None,
            ) as conn,
            conn.start_sftp_client() as client,
        ):
            await client.link("escape/secret.txt", "hard")

    with pytest.raises(asyncssh.SFTPPermissionDenied):
        asyncio.run(hardlink())
    assert not (gateway.home("alice") / "hard").exists()


def test_the_link_itself_can_be_listed_and_removed(
    gateway: RunningGateway, sftp: paramiko.SFTPClient, outside: Path
) -> None:
    assert "escape" in sftp.listdir(".")
    sftp.remove("escape")
    assert not (gateway.home("alice") / "escape").exists()
    assert outside.is_dir()


def test_symlinks_a_user_creates_never_reach_outside(
    gateway: RunningGateway, sftp: paramiko.SFTPClient, outside: Path
) -> None:
    home = gateway.home("alice")
    # A link may name anything in the user's view; what it leads to is
    # checked each time it is used: through an outward link, nothing.
    sftp.symlink("escape/secret.txt", "mine")
    with pytest.raises(PermissionError):
        sftp.open("mine").read()
    with pytest.raises(PermissionError):
        sftp.stat("mine")
    # Targets with .. or absolute paths are read in the user's view: they stay inside.
    sftp.symlink("../../outside/secret.txt", "dots")
    sftp.symlink("/etc/passwd", "abs")
    for name in ("dots", "abs"):
        real = Path(os.path.realpath(home / name))
        assert real.is_relative_to(home.resolve()), real
        with pytest.raises(FileNotFoundError):
            sftp.open(name).read()
    # An inside target works and reads back in the user's view.
    sftp.putfo(io.BytesIO(b"data"), "target.txt")
    sftp.symlink("target.txt", "good")
    assert sftp.open("good").read() == b"data"
    assert sftp.readlink("good") == "target.txt"
    rows = gateway.wait_rows(lambda rs: sum(r["op"] == "symlink" for r in rs) >= 4)
    symlinks = [(r["path"], r["path2"], r["status"]) for r in rows if r["op"] == "symlink"]
    assert ("/mine", "escape/secret.txt", "ok") in symlinks
    assert ("/good", "target.txt", "ok") in symlinks


def test_users_cannot_see_each_others_homes(gateway: RunningGateway, outside: Path) -> None:
    alice = gateway.sftp("alice")
    alice.putfo(io.BytesIO(b"alice's"), "private.txt")
    carol = gateway.sftp("carol")
    for path in ("../alice/private.txt", "/../alice/private.txt"):
        with pytest.raises(FileNotFoundError):
            carol.open(path).read()
    assert carol.listdir("/") == []


def test_a_fifo_or_socket_in_a_home_is_refused_without_waiting(
    gateway: RunningGateway, sftp: paramiko.SFTPClient
) -> None:
    # A FIFO opened for reading waits for a writer: inline on the event loop
    # that froze every session of the gateway (found by hand, fixed in fsops.open).
    home = gateway.home("alice")
    os.mkfifo(home / "pipe")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(home / "sock"))
        sftp.get_channel().settimeout(10)
        for name, mode in [("pipe", "r"), ("pipe", "w"), ("pipe", "a"), ("sock", "r")]:
            with pytest.raises(PermissionError, match="Not a regular file"):
                sftp.open(name, mode)
    assert stat.S_ISFIFO(sftp.stat("pipe").st_mode or 0)  # still listed and stat'able
    refused = _journal_refusals(gateway, 4)
    assert [r["path"] for r in refused] == ["/pipe", "/pipe", "/pipe", "/sock"]
    assert {r["message"] for r in refused} == {"Not a regular file"}


def test_sessions_leave_no_descriptor_behind(gateway: RunningGateway) -> None:
    # Each session holds its home's descriptor: it must go when the session does.
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def described() -> list[str]:
        out = []
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/self/fd/{name}"))
        return sorted(out)

    warm = gateway.sftp("alice")
    warm.listdir(".")
    gateway.close_clients()
    before = open_fds()
    was = described()
    for n in range(20):
        client = gateway.sftp("alice")
        client.putfo(io.BytesIO(b"x"), f"f{n}")
        client.listdir(".")
        client.stat(f"f{n}")
        gateway.close_clients()
    gateway.wait_rows(
        lambda rs: sum(r["op"] == "logout" for r in rs) >= 21,
        sql="SELECT 'logout' AS op FROM sessions WHERE ended_at IS NOT NULL",
    )
    deadline = time.monotonic() + 10
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= before, sorted(set(described()) - set(was))
