"""Integration harness: a real, private OpenSSH ``sshd`` with throwaway system users.

``sftpgate subsystem`` is meant to run as sshd's ``Subsystem sftp`` command, as
the logged-in user.  This module starts Debian's own sshd on a free loopback
port with its own config, host key and authorized keys (never the machine's
``/etc/ssh`` or port 22), creates real Unix users for it, and gives clients
(paramiko and OpenSSH's ``sftp``) to talk to it.

Everything needs root (``useradd``, and sshd can only switch users as root).

Typical use::

    from sshd_kit import UserFactory, need_sshd, paramiko_sftp, start_sshd
    from sshd_kit import make_user as make_user  # fixtures: the redundant alias keeps
    from sshd_kit import shared_dir as shared_dir  # ruff from calling them unused (F401/F811)

    def test_x(shared_dir: Path, make_user: UserFactory) -> None:
        alice = make_user()
        _, sftp_server = need_sshd()
        with start_sshd(shared_dir / "sshd", [sftp_server], users=[alice]) as sshd:
            transport, sftp = paramiko_sftp(sshd, alice)
            ...

Files the test users must reach (config, sockets, homes, the subsystem program)
must live in a world-traversable folder: pytest's ``tmp_path`` is under
``/tmp/pytest-of-root`` (mode 0700), so use :func:`shared_tmp` /
the ``shared_dir`` fixture instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Protocol

import asyncssh
import paramiko
import pytest

SSHD_CANDIDATES = ("/usr/sbin/sshd",)
SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/libexec/sftp-server",
)
PRIVSEP_DIR = Path("/run/sshd")
"""sshd's privilege separation directory; Debian's sshd refuses to start without it."""

SAFE_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
"""Arguments that pass unchanged through both sshd_config parsing and ``sh -c``."""

START_TIMEOUT = 10.0


# --------------------------------------------------------------------------- tools


def need_sshd() -> tuple[str, str]:
    """Paths of ``sshd`` and ``sftp-server``, or fail the test saying how to install them."""
    sshd = next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("sshd")
    sftp_server = next((p for p in SFTP_SERVER_CANDIDATES if os.access(p, os.X_OK)), None)
    if sshd is None or sftp_server is None:
        pytest.fail(
            "OpenSSH's sshd and sftp-server are not installed: "
            "run `apt-get install openssh-server` (scripts/setup.sh does this)"
        )
    return sshd, sftp_server


def need_client_tool(name: str) -> str:
    """Path of an OpenSSH client tool (``sftp``, ``ssh-keygen``), or fail the test."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run `apt-get install openssh-client` "
            "(scripts/setup.sh does this)"
        )
    return path


def need_root() -> None:
    """Fail the test unless running as root (creating users and running sshd need it)."""
    if os.geteuid() != 0:
        pytest.fail("the sshd integration tests create system users and must run as root")


# --------------------------------------------------------------------- shared tmp


@contextlib.contextmanager
def shared_tmp(prefix: str = "sftpgate-sshd-") -> Iterator[Path]:
    """A fresh folder directly under /tmp, mode 0755, removed afterwards.

    Unlike pytest's ``tmp_path`` every user can traverse it, so test users (and
    sshd reading their authorized keys as them) can reach what is inside.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def world_reachable(path: Path) -> bool:
    """Whether every folder from / down to ``path`` can be traversed by any user."""
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        try:
            mode = folder.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class TestUser:
    """A real Unix account made for one test, with its own ed25519 key pair."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    login: str
    uid: int
    gid: int
    home: Path
    key_path: Path
    """Private key, OpenSSH format, root-owned mode 0600."""
    public_key: str
    """One ``authorized_keys`` line."""


def unique_login(prefix: str = "sg") -> str:
    """A login nobody else uses: ``prefix`` plus 6 random hex digits (8 chars by default)."""
    return prefix + secrets.token_hex(3)


def _run_passwd_tool(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run useradd/usermod/userdel, retrying while another process holds /etc/passwd's lock."""
    for _ in range(100):
        result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode == 0 or "lock" not in result.stderr.lower():
            return result
        time.sleep(0.1)
    return result


def write_key_pair(key_path: Path, comment: str) -> str:
    """Write a new ed25519 private key (OpenSSH format, mode 0600); return its public line."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key("openssh"))
    public: bytes = key.export_public_key("openssh")
    return public.decode().strip()


def create_user(login: str, home: Path, *, key_dir: Path | None = None) -> TestUser:
    """Create a Unix user with a home, a usable (unlocked) account and a fresh key pair.

    The password field is set to ``*``: no password can match it, but unlike
    useradd's default ``!`` OpenSSH does not treat it as a locked account, so
    public key login works.  The private key goes to ``key_dir/LOGIN_ed25519``
    (default: beside the home); :func:`start_sshd` authorizes the public key.
    """
    need_root()
    key_dir = key_dir or home.parent
    key_dir.mkdir(parents=True, exist_ok=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    result = _run_passwd_tool(
        [
            "useradd",
            "--create-home",
            "--home-dir",
            str(home),
            "--shell",
            "/bin/sh",
            "--user-group",
            "--comment",
            "sftpgate test user",
            login,
        ]
    )
    if result.returncode != 0:
        pytest.fail(f"useradd {login} failed ({result.returncode}): {result.stderr.strip()}")
    user: TestUser | None = None
    try:
        unlock = _run_passwd_tool(["usermod", "--password", "*", login])
        if unlock.returncode != 0:
            pytest.fail(f"usermod -p '*' {login} failed: {unlock.stderr.strip()}")
        st = home.stat()
        key_path = key_dir / f"{login}_ed25519"
        public_key = write_key_pair(key_path, f"{login}@sftpgate-test")
        user = TestUser(login, st.st_uid, st.st_gid, home, key_path, public_key)
        return user
    finally:
        if user is None:
            _userdel(login)


def _uid_processes(uid: int) -> list[int]:
    """PIDs of live (not zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            pids.append(int(entry.name))
    return pids


def _userdel(login: str, uid: int | None = None) -> None:
    """``userdel --remove`` that tolerates missing mail spools and lingering processes."""
    deadline = time.monotonic() + 5
    while True:
        result = _run_passwd_tool(["userdel", "--remove", login])
        # 0: done (maybe with "mail spool not found" on stderr); 6: no such user
        if result.returncode in (0, 6):
            return
        if result.returncode == 8 and uid is not None:  # user is running processes
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            # These processes belong to this test's fresh, unique uid: end them by pid.
            for pid in _uid_processes(uid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            final = _run_passwd_tool(["userdel", "--force", "--remove", login])
            if final.returncode in (0, 6):
                return
            result = final
        raise RuntimeError(f"userdel {login} failed ({result.returncode}): {result.stderr}")


def delete_user(user: TestUser) -> None:
    """Remove the user, their group and home (``userdel --remove``); its key file too."""
    with contextlib.suppress(FileNotFoundError):
        user.key_path.unlink()
    _userdel(user.login, user.uid)


def user_exists(login: str) -> bool:
    """Whether ``getent passwd LOGIN`` finds the user."""
    result = subprocess.run(
        ["getent", "passwd", login], capture_output=True, timeout=10, check=False
    )
    return result.returncode == 0


class UserFactory(Protocol):
    """Makes a test user; ``login`` defaults to a fresh :func:`unique_login`."""

    def __call__(self, login: str | None = None) -> TestUser: ...


@contextlib.contextmanager
def temp_users(base: Path) -> Iterator[UserFactory]:
    """Yield a factory of test users with homes under ``base/homes``; delete all of them on exit.

    Deletion happens even when the body raises.  ``base`` must be world-traversable
    (see :func:`shared_tmp`).
    """
    made: list[TestUser] = []
    key_dir = base / "client-keys"
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def make(login: str | None = None) -> TestUser:
        login = login or unique_login()
        user = create_user(login, base / "homes" / login, key_dir=key_dir)
        made.append(user)
        return user

    try:
        yield make
    finally:
        errors = []
        for user in reversed(made):
            try:
                delete_user(user)
            except RuntimeError as exc:
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))


# --------------------------------------------------------------------------- sshd


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _descendants(pid: int) -> list[int]:
    """PIDs of all processes below ``pid`` (sshd's per-connection and session children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Sshd:
    """A running private sshd; stop it with :meth:`stop` or by using it as a context manager."""

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        port: int,
        workdir: Path,
        config_path: Path,
        log_path: Path,
        users: list[TestUser],
    ) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.config_path = config_path
        self.log_path = log_path
        self.users = users

    @property
    def running(self) -> bool:
        """Whether the listening sshd is still alive."""
        return self.process.poll() is None

    def log(self) -> str:
        """Everything sshd logged so far (LogLevel VERBOSE): use it in failure messages."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of :meth:`log`."""
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM sshd and its session processes, wait, then SIGKILL what is left. Idempotent."""
        kids = _descendants(self.process.pid) if self.running else []
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in kids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Sshd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def subsystem_command(workdir: Path, subsystem: list[str] | str) -> str:
    """The text to put after ``Subsystem sftp`` in sshd_config.

    sshd runs it as the logged-in user through their shell (``/bin/sh -c TEXT``).
    A string is used verbatim.  A list is joined with spaces when every item is
    plain (letters, digits, ``_@%+=:,./-``); otherwise it is written into an
    ``exec`` wrapper script ``workdir/subsystem.sh`` (mode 0755), because sshd's
    own config parser drops quotes before the shell ever sees them.
    """
    if isinstance(subsystem, str):
        if not subsystem.strip() or "\n" in subsystem:
            raise ValueError(f"bad subsystem command {subsystem!r}")
        return subsystem
    if not subsystem:
        raise ValueError("empty subsystem command")
    if all(SAFE_ARG.fullmatch(arg) for arg in subsystem):
        return " ".join(subsystem)
    wrapper = workdir / "subsystem.sh"
    if not SAFE_ARG.fullmatch(str(wrapper)):
        raise ValueError(f"workdir {workdir} needs a plain path for the subsystem wrapper")
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.join(subsystem)}\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def sshd_config_text(
    *,
    port: int,
    workdir: Path,
    subsystem: str,
    users: list[TestUser],
    extra_config: dict[str, str] | None = None,
) -> str:
    """sshd_config for a private, key-only sshd on 127.0.0.1.

    ``extra_config`` entries replace the defaults with the same keyword (sshd
    keeps the first value it reads, so appending would not override them).
    """
    options: dict[str, str] = {
        "Port": str(port),
        "ListenAddress": "127.0.0.1",
        "HostKey": str(workdir / "ssh_host_ed25519_key"),
        "PidFile": str(workdir / "sshd.pid"),
        "UsePAM": "no",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PubkeyAuthentication": "yes",
        "AuthorizedKeysFile": str(workdir / "authorized_keys" / "%u"),
        "StrictModes": "no",
        "PermitRootLogin": "no",
        "LogLevel": "VERBOSE",
        "MaxStartups": "100:30:200",
        "X11Forwarding": "no",
        "AllowTcpForwarding": "no",
        "PrintMotd": "no",
        "UseDNS": "no",
        "Subsystem": f"sftp {subsystem}",
    }
    if users:
        options["AllowUsers"] = " ".join(u.login for u in users)
    else:
        options["DenyUsers"] = "*"
    for key, value in (extra_config or {}).items():
        same = [k for k in options if k.lower() == key.lower()]
        for k in same:
            del options[k]
        options[key] = value
    lines = ["# written by tests/sshd_kit.py"]
    lines += [f"{key} {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def start_sshd(
    workdir: Path,
    subsystem: list[str] | str,
    *,
    users: list[TestUser],
    extra_config: dict[str, str] | None = None,
) -> Sshd:
    """Start Debian's sshd on a free loopback port with ``subsystem`` as ``Subsystem sftp``.

    ``workdir`` (created if missing, and which must be world-traversable) gets the
    host key, ``sshd_config``, ``authorized_keys/LOGIN`` for each of ``users`` (the
    only logins allowed), the pid file and ``sshd.log``.  The config is checked with
    ``sshd -t`` first; the test fails with sshd's own words if it is invalid or
    if sshd dies before it listens.
    """
    need_root()
    sshd_path, _ = need_sshd()
    keygen = need_client_tool("ssh-keygen")
    workdir.mkdir(parents=True, exist_ok=True, mode=0o755)
    if not world_reachable(workdir):
        raise ValueError(
            f"{workdir} is not traversable by other users; sshd reads authorized keys "
            "as the user: put it under shared_tmp()"
        )
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    host_key = workdir / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "sftpgate-test-host", "-f", host_key],
            check=True,
            capture_output=True,
            timeout=30,
        )
    keys_dir = workdir / "authorized_keys"
    keys_dir.mkdir(exist_ok=True, mode=0o755)
    keys_dir.chmod(0o755)
    for user in users:
        path = keys_dir / user.login
        path.write_text(user.public_key + "\n")
        path.chmod(0o644)

    command = subsystem_command(workdir, subsystem)
    config_path = workdir / "sshd_config"
    log_path = workdir / "sshd.log"
    for _attempt in range(5):
        port = free_port()
        config_path.write_text(
            sshd_config_text(
                port=port,
                workdir=workdir,
                subsystem=command,
                users=users,
                extra_config=extra_config,
            )
        )
        check = subprocess.run(
            [sshd_path, "-t", "-f", str(config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            pytest.fail(
                f"sshd -t rejected {config_path}:\n{check.stderr}\n"
                f"--- config ---\n{config_path.read_text()}"
            )
        with log_path.open("ab") as log:
            # sshd must be started by absolute path: it re-executes itself per connection.
            process = subprocess.Popen(
                [sshd_path, "-D", "-e", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        sshd = Sshd(
            process=process,
            port=port,
            workdir=workdir,
            config_path=config_path,
            log_path=log_path,
            users=list(users),
        )
        try:
            if _wait_listening(sshd):
                return sshd
        except BaseException:
            sshd.stop()
            raise
        sshd.stop()
        if "Address already in use" not in sshd.log():
            break
    pytest.fail(f"sshd did not start on 127.0.0.1; its log:\n{sshd.log_tail()}")


def _wait_listening(sshd: Sshd) -> bool:
    """Wait until sshd says it listens and the port accepts a connection; False if it exited."""
    banner = f"Server listening on 127.0.0.1 port {sshd.port}."
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not sshd.running:
            return False
        if banner in sshd.log():
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", sshd.port), timeout=1),
            ):
                return True
        time.sleep(0.02)
    sshd.stop()
    pytest.fail(f"sshd did not listen within {START_TIMEOUT} s; its log:\n{sshd.log_tail()}")


# ------------------------------------------------------------------------- clients


def paramiko_sftp(
    sshd: Sshd, user: TestUser, *, key_path: Path | None = None, timeout: float = 15.0
) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    """Log in as ``user`` with their key (or ``key_path``) and open SFTP; close both after.

    Raises ``paramiko.AuthenticationException`` when sshd refuses the login.
    """
    key = paramiko.Ed25519Key.from_private_key_file(str(key_path or user.key_path))
    sock = socket.create_connection(("127.0.0.1", sshd.port), timeout=timeout)
    try:
        transport = paramiko.Transport(sock)
    except BaseException:
        sock.close()
        raise
    try:
        transport.banner_timeout = timeout
        transport.auth_timeout = timeout
        transport.connect(username=user.login, pkey=key)
        sftp = paramiko.SFTPClient.from_transport(transport)
        if sftp is None:
            raise RuntimeError(f"no SFTP channel; sshd log:\n{sshd.log_tail()}")
    except BaseException:
        transport.close()
        raise
    return transport, sftp


def openssh_sftp_batch(
    sshd: Sshd,
    user: TestUser,
    batch: str,
    cwd: Path,
    *,
    key_path: Path | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run OpenSSH's ``sftp -b -`` as ``user`` with ``batch`` on stdin, in ``cwd``.

    Ignores every ssh_config (``-F /dev/null``) and known_hosts; does not check
    the exit status: look at ``returncode``, ``stdout`` and ``stderr``.
    """
    sftp = need_client_tool("sftp")
    return subprocess.run(
        [
            sftp,
            "-b",
            "-",
            "-F",
            "/dev/null",
            "-P",
            str(sshd.port),
            "-i",
            str(key_path or user.key_path),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=15",
            f"{user.login}@127.0.0.1",
        ],
        input=batch,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


# ------------------------------------------------------------------------ fixtures


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-traversable (0755) folder under /tmp for this test, removed afterwards."""
    with shared_tmp() as path:
        yield path


@pytest.fixture
def make_user(shared_dir: Path) -> Iterator[UserFactory]:
    """Factory of real test users (homes under ``shared_dir/homes``), all deleted afterwards."""
    with temp_users(shared_dir) as make:
        yield make
