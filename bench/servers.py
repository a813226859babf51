"""The two servers every transfer benchmark compares, started side by side on loopback.

- OpenSSH: a private Debian sshd (own config, host key, port), ``Subsystem sftp``
  = Debian's sftp-server, a dedicated bench user whose shell is /bin/sh, and
  MaxStartups raised for the concurrency runs.
- sftpgate: ``sftpgate serve`` as its own process, the same user and key.

:func:`subsystem_site` adds the OpenSSH front door: a second private sshd whose
``Subsystem sftp`` is ``sftpgate subsystem``, and the daemon that journals it.

sftpgate and OpenSSH write into one home, the bench user's (see
:func:`running_servers`); extra gateways get their own unless asked to share
it. The OpenSSH parts reuse the test suite's sshd kit (tests/sshd_kit.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .common import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import sshd_kit

SFTPGATE = str(Path(sys.executable).parent / "sftpgate")
SSHD_EXTRA = {"MaxStartups": "4000:30:8000", "MaxSessions": "100"}


@dataclass
class Endpoint:
    name: str
    port: int
    home: Path
    pid: int  # the server process whose memory counts


@dataclass
class Servers:
    openssh: Endpoint
    sftpgate: Endpoint
    login: str
    key: Path
    workdir: Path
    config: Path
    user: sshd_kit.TestUser

    @property
    def pair(self) -> tuple[Endpoint, Endpoint]:
        return self.sftpgate, self.openssh


def _start_serve(config: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [SFTPGATE, "serve", "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    ready = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening on" in line:
                ready.set()
            elif line.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback")):
                # A gateway that complains during a run says something about the figure.
                print(f"sftpgate serve: {line.rstrip()}", file=sys.stderr, flush=True)

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        raise RuntimeError("sftpgate serve did not start")
    return proc


def _stop_serve(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def gateway_config(
    workdir: Path, login: str, public_key: str, home: Path, port: int, **sections: Any
) -> Path:
    data: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1",
            "port": port,
            "state_dir": str(workdir / "state"),
            "host_keys_dir": str(workdir / "gw-hostkeys"),
            "io_threads": 64,
        },
        "journal": {"synchronous": "full"},
        "pipeline": {"enabled": False},
        "log": {"level": "warning"},
        # Hundreds of sessions of one bench user at once (figures 4, 16): over serve's
        # default caps (64 a user, a quarter of the descriptor limit in all).
        "door": {"max_sessions_per_user": 4096, "max_sessions": 4096},
        "users": [
            {
                "login": login,
                "name": "Bench",
                "surname": "User",
                "email": f"{login}@localhost",
                "home": str(home),
                "authorized_keys": [public_key],
            }
        ],
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def running_servers(**gateway_sections: Any) -> Iterator[Servers]:
    """Both servers with one bench user; everything is removed afterwards."""
    sshd_kit.need_root()
    with (
        sshd_kit.shared_tmp("sftpgate-bench-") as workdir,
        sshd_kit.temp_users(workdir) as make_user,
    ):
        user = make_user()
        # One home for both servers (rounds run one at a time, emptied in
        # between): on this machine's ext4 the cost of a create depends on
        # where a folder's inodes sit and what was deleted near them, and two
        # homes of the same age measured up to 1.3x apart.
        sshd_home = gw_home = user.home
        _, sftp_server = sshd_kit.need_sshd()
        sshd = sshd_kit.start_sshd(
            workdir / "sshd", [sftp_server], users=[user], extra_config=SSHD_EXTRA
        )
        port = sshd_kit.free_port()
        config = gateway_config(
            workdir, user.login, user.public_key, gw_home, port, **gateway_sections
        )
        proc = _start_serve(config)
        try:
            yield Servers(
                openssh=Endpoint("openssh", sshd.port, sshd_home, sshd.process.pid),
                sftpgate=Endpoint("sftpgate", port, gw_home, proc.pid),
                login=user.login,
                key=user.key_path,
                workdir=workdir,
                config=config,
                user=user,
            )
        finally:
            _stop_serve(proc)
            sshd.stop()


@contextlib.contextmanager
def extra_gateway(
    servers: Servers, name: str, *, shared_home: bool = False, **sections: Any
) -> Iterator[Endpoint]:
    """One more `sftpgate serve` for the same user (e.g. with the journal off).

    Its home is a new folder, or with ``shared_home`` the main servers' home
    (for figures that compare small-file rates: see :func:`running_servers`).
    """
    if shared_home:
        home = servers.sftpgate.home
    else:
        home = servers.workdir / f"{name}-home"
        home.mkdir()
        shutil.copystat(servers.sftpgate.home, home)
        st = servers.sftpgate.home.stat()
        os.chown(home, st.st_uid, st.st_gid)
    workdir = servers.workdir / name
    workdir.mkdir()
    public_key = yaml.safe_load(servers.config.read_text())["users"][0]["authorized_keys"][0]
    port = sshd_kit.free_port()
    config = gateway_config(workdir, servers.login, public_key, home, port, **sections)
    proc = _start_serve(config)
    try:
        yield Endpoint(name, port, home, proc.pid)
    finally:
        _stop_serve(proc)


@dataclass
class SubsystemSite:
    """The OpenSSH front door: sshd + ``sftpgate subsystem``, and the daemon journaling it."""

    endpoint: Endpoint  # the second sshd; its home is the bench user's, as for ``openssh``
    journal: Path  # the daemon's SQLite journal
    spool_dir: Path  # where taps put events the daemon did not acknowledge
    daemon_pid: int


@contextlib.contextmanager
def subsystem_site(servers: Servers) -> Iterator[SubsystemSite]:
    """A second private sshd whose ``Subsystem sftp`` is ``sftpgate subsystem``.

    Set up as packaging/openssh describes: the taps read a config holding only
    the ``subsystem`` section; the daemon is ``sftpgate serve`` with
    ``subsystem.enabled``, the bench user listed with home = that user's
    system home (the ``openssh`` endpoint's home too; rounds run one at a time
    and empty it). The sshd has the same options as the plain one.
    """
    workdir = servers.workdir / "subsystem"
    workdir.mkdir()
    user = servers.user
    # The taps run as the bench user, who cannot write __pycache__ in this checkout;
    # an installed sftpgate has its bytecode (scripts/setup.sh compiles it), so here too.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "sftpgate")], check=True)
    _, sftp_server = sshd_kit.need_sshd()
    tap = {
        "sftp_server": sftp_server,
        "socket": str(workdir / "run" / "events.sock"),
        "spool_dir": str(workdir / "spool"),
    }
    daemon_config = gateway_config(
        workdir,
        user.login,
        user.public_key,
        user.home,
        sshd_kit.free_port(),
        subsystem={"enabled": True, **tap},
    )
    tap_config = workdir / "subsystem.yaml"
    tap_config.write_text(yaml.safe_dump({"subsystem": tap}))
    tap_config.chmod(0o644)  # read by the taps, which run as the bench user
    proc = _start_serve(daemon_config)  # "listening on" comes after the tap socket is up
    try:
        with sshd_kit.start_sshd(
            workdir / "sshd",
            [SFTPGATE, "subsystem", "--config", str(tap_config)],
            users=[user],
            extra_config=SSHD_EXTRA,
        ) as sshd:
            yield SubsystemSite(
                Endpoint("subsystem", sshd.port, user.home, sshd.process.pid),
                journal=workdir / "state" / "journal.sqlite3",
                spool_dir=workdir / "spool",
                daemon_pid=proc.pid,
            )
    finally:
        _stop_serve(proc)


# Files smaller than this are moved out of the way between rounds, not deleted.
KEEP_BELOW = 1024 * 1024


def clean_home(endpoint: Endpoint) -> None:
    """Empty a home between rounds (keeps the folder and its owner).

    Small files are moved to a trash folder next to the home, removed with the
    bench's work folder at the end, not deleted. On an ext4 without a journal
    (this machine's root filesystem) every create skips the inodes deleted in
    the last minutes, one by one: after deleting a round's 2,000 files a create
    took 0.5-0.9 ms instead of ~16 us, rounds got slower as deleted inodes
    piled up, and two identical gateways measured up to 1.28x apart in a round.
    Big files are deleted: they are few inodes and a lot of space.
    """
    trash = endpoint.home.parent / f".trash-{endpoint.home.name}"
    trash.mkdir(exist_ok=True)
    for entry in endpoint.home.iterdir():
        if entry.is_file() and not entry.is_symlink() and entry.stat().st_size >= KEEP_BELOW:
            entry.unlink()
        else:
            entry.rename(trash / f"{time.monotonic_ns()}-{entry.name}")
