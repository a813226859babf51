"""NFS with root_squash, emulated: a root gateway that may not override file permissions.

On a squashed export root is "nobody": it cannot read a 0700 home, write in
it or chown anything there. The same holds for a root process whose
capabilities to bypass permissions are gone, so the gateway is started as
root under ``capsh --drop=cap_dac_override,cap_dac_read_search,cap_fowner,
cap_chown,cap_fsetid``, with two real system users whose homes are 0700 and
whose config entries name no uid. Everything must still work — because every
file call runs as the user — and every file must belong to its user.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from test_serve_process import ServeProcess, start_serve, stop_serve

from conftest import free_port
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.passwords import hash_password
from sshd_kit import Sshd, TestUser, UserFactory, need_root, paramiko_sftp, start_sshd
from sshd_kit import make_user as make_user
from sshd_kit import shared_dir as shared_dir

DROPPED = ("cap_dac_override", "cap_dac_read_search", "cap_fowner", "cap_chown", "cap_fsetid")
# Bit numbers from <linux/capability.h>.
CAP_BITS = {"cap_chown": 0, "cap_dac_override": 1, "cap_dac_read_search": 2, "cap_fowner": 3}
CAP_BITS["cap_fsetid"] = 4
SFTPGATE = str(Path(sys.executable).parent / "sftpgate")


def squashed_command(config: Path) -> list[str]:
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.fail("capsh is missing: scripts/setup.sh installs libcap2-bin")
    return [
        capsh,
        f"--drop={','.join(DROPPED)}",
        f"--shell={SFTPGATE}",
        "--",
        "serve",
        "--config",
        str(config),
    ]


def effective_caps(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff line")


def squashed_config(
    shared: Path, users: list[TestUser], smtp: SmtpServer, port: int, **extra: Any
) -> Path:
    settings = pipeline_settings(smtp.port)
    data: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1",
            "port": port,
            "state_dir": str(shared / "state"),
            "host_keys_dir": str(shared / "hostkeys"),
        },
        "journal": {"synchronous": "normal"},
        **settings,
        # No uid: each user acts as the system account of the same login.
        "users": [
            {
                "login": u.login,
                "name": "Squashed",
                "surname": u.login.upper(),
                "email": f"{u.login}@example.org",
                "home": str(u.home),
                "authorized_keys": [u.public_key],
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
def users(make_user: UserFactory) -> list[TestUser]:
    need_root()
    made = [make_user(), make_user()]
    for user in made:
        user.home.chmod(0o700)
    return made


def connect(port: int, user: TestUser) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    transport = paramiko.Transport(("127.0.0.1", port))
    transport.connect(
        username=user.login, pkey=paramiko.Ed25519Key.from_private_key_file(str(user.key_path))
    )
    client = paramiko.SFTPClient.from_transport(transport)
    assert client is not None
    return transport, client


def foundation(sftp: paramiko.SFTPClient, user: TestUser) -> None:
    """Every kind of request a client makes, each checked on the host as well."""
    home = user.home
    sftp.mkdir("docs", 0o750)
    sftp.putfo(io.BytesIO(b"hello " * 1000), "docs/a.txt")
    assert sftp.open("docs/a.txt").read() == b"hello " * 1000
    assert sftp.stat("docs/a.txt").st_size == 6000
    assert sftp.listdir("docs") == ["a.txt"]
    sftp.putfo(io.BytesIO(b"x"), "docs/b.txt.part")
    sftp.rename("docs/b.txt.part", "docs/b.txt")
    sftp.posix_rename("docs/b.txt", "docs/c.txt")
    sftp.chmod("docs/c.txt", 0o600)
    sftp.utime("docs/c.txt", (1_000_000, 2_000_000))
    sftp.truncate("docs/a.txt", 5)
    sftp.symlink("a.txt", "docs/link")
    assert sftp.readlink("docs/link") == "a.txt"
    assert sftp.open("docs/link").read() == b"hello"
    assert sftp.normalize("docs/../docs/link").endswith("/docs/a.txt")  # links resolved
    with sftp.open("docs/append.txt", "a") as f:
        f.write(b"1")
    sftp.mkdir("empty")
    sftp.rmdir("empty")
    sftp.remove("docs/append.txt")
    for name in ("docs", "docs/a.txt", "docs/c.txt", "docs/link"):
        st = os.lstat(home / name)
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid), name
    st = os.stat(home / "docs" / "c.txt")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime == 2_000_000


def upload_video_and_wait(
    sftp: paramiko.SFTPClient, user: TestUser, clip: Path, journal: Path, smtp: SmtpServer
) -> None:
    sftp.put(str(clip), "clip.mp4")
    rows = wait_jobs(journal, lambda rs: settled([r for r in rs if r["login"] == user.login]))
    mine = [r for r in rows if r["login"] == user.login]
    assert [r["state"] for r in mine] == ["succeeded"], mine
    converted = user.home / "converted"
    names = sorted(p.name for p in converted.iterdir())
    assert "clip.flv" in names and "clip.json" in names, names
    for path in [converted, *converted.iterdir()]:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid), path
        wanted = 0o755 if path == converted else 0o644
        assert stat.S_IMODE(st.st_mode) == wanted, path
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not smtp.inbox.to(f"{user.login}@example.org"):
        time.sleep(0.05)
    assert len(smtp.inbox.to(f"{user.login}@example.org")) == 1


def each_user(
    login: Callable[[TestUser], tuple[paramiko.Transport, paramiko.SFTPClient]],
    users: list[TestUser],
    clip: Path,
    shared: Path,
    smtp: SmtpServer,
) -> None:
    for user in users:
        transport, sftp = login(user)
        try:
            foundation(sftp, user)
            upload_video_and_wait(sftp, user, clip, shared / "state" / "journal.sqlite3", smtp)
        finally:
            sftp.close()
            transport.close()


def test_serve_as_a_root_that_cannot_override_permissions_works_as_each_user(
    shared_dir: Path, users: list[TestUser], smtp: SmtpServer
) -> None:
    port = free_port()
    config = squashed_config(shared_dir, users, smtp, port)
    clip = make_clip(shared_dir / "clip.mp4", "mp4", seconds=1)
    # UMask=0077 as in the systemd unit: users' files still follow server.umask (022).
    proc = start_serve(config, {}, command=squashed_command(config), umask=0o077)
    try:
        caps = effective_caps(proc.pid)
        assert all(not caps & (1 << bit) for bit in CAP_BITS.values()), hex(caps)
        each_user(lambda user: connect(port, user), users, clip, shared_dir, smtp)
    finally:
        assert stop_serve(proc) == 0


def test_subsystem_behind_sshd_with_a_squashed_daemon_works_as_each_user(
    shared_dir: Path, users: list[TestUser], smtp: SmtpServer
) -> None:
    subsystem = {
        "enabled": True,
        "socket": str(shared_dir / "run" / "events.sock"),
        "spool_dir": str(shared_dir / "spool"),
        "replay_interval": 0.3,
        "ack_timeout": 2,
    }
    config = squashed_config(shared_dir, users, smtp, free_port(), subsystem=subsystem)
    clip = make_clip(shared_dir / "clip.mp4", "mp4", seconds=1)
    # UMask=0077 as in the systemd unit: users' files still follow server.umask (022).
    proc = start_serve(config, {}, command=squashed_command(config), umask=0o077)
    sshd: Sshd | None = None
    try:
        caps = effective_caps(proc.pid)
        assert all(not caps & (1 << bit) for bit in CAP_BITS.values()), hex(caps)
        sshd = start_sshd(
            shared_dir / "sshd", [SFTPGATE, "subsystem", "--config", str(config)], users=users
        )
        each_user(lambda user: paramiko_sftp(sshd, user), users, clip, shared_dir, smtp)
    finally:
        if sshd is not None:
            sshd.stop()
        assert stop_serve(proc) == 0


def test_a_gateway_that_is_not_root_serves_as_itself(
    shared_dir: Path, make_user: UserFactory
) -> None:
    # No switching at all: every file is the gateway account's, as before.
    account = make_user()
    port = free_port()
    base = account.home
    homes = base / "homes"
    data = {
        "server": {
            "listen": "127.0.0.1",
            "port": port,
            "state_dir": str(base / "state"),
            "host_keys_dir": str(base / "hostkeys"),
            "create_homes": True,
        },
        "pipeline": {"enabled": False},
        "users": [
            {
                "login": "alice",
                "name": "Alice",
                "surname": "Liddell",
                "email": "alice@example.org",
                "home": str(homes / "alice"),
                "password_hash": hash_password("alice-secret", log_n=10),
            }
        ],
    }
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is missing"
    as_account = [setpriv, f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups"]
    serve = ServeProcess(
        config,
        command=[*as_account, sys.executable, "-m", "sftpgate", "serve", "--config", str(config)],
    )
    try:
        transport = paramiko.Transport(("127.0.0.1", port))
        transport.connect(username="alice", password="alice-secret")
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        sftp.mkdir("d")
        sftp.putfo(io.BytesIO(b"x"), "d/f")
        sftp.rename("d/f", "d/g")
        assert sftp.listdir("d") == ["g"]
        transport.close()
        st = (homes / "alice" / "d" / "g").stat()
        assert (st.st_uid, st.st_gid) == (account.uid, account.gid)
    finally:
        assert serve.stop() == 0
    assert not any("acts as root" in line for line in serve.lines)
