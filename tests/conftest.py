"""Integration harness: a real gateway on a free loopback port, real paramiko clients.

Each test that asks for ``gateway`` gets its own temp homes, state, host keys
and port, and everything is stopped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest
import yaml

from sftpgate.config import Config, load_config
from sftpgate.frontdoor.ssh import GatewaySSHServer
from sftpgate.gateway import Gateway
from sftpgate.passwords import hash_password

PASSWORDS = {"alice": "alice-secret", "carol": "carol-secret"}


def asyncssh_login(port: int, login: str = "alice") -> Any:  # asyncssh.connect's context manager
    """asyncssh's client, logged in with ``login``'s password."""
    return asyncssh.connect(
        "127.0.0.1",
        port,
        username=login,
        password=PASSWORDS[login],
        known_hosts=None,
        client_keys=None,
    )


def need_tool(name: str, install: str) -> str:
    """Path of a system tool, or fail the test naming how to install it."""
    path = shutil.which(name) or (name if Path(name).is_file() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `{install}` (scripts/setup.sh does this)")
    return path


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A real, tiny filesystem (tmpfs of ``size``, e.g. "64k") mounted at ``path``.

    For full-disk tests; the suite runs as root, as CI does.
    """
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "sftpgate-test", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"mounting a {size} tmpfs failed (the suite runs as root with CAP_SYS_ADMIN, "
            f"as CI does): {done.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem holding ``directory``; return the filler file."""
    filler = directory / "filler"
    # Unbuffered: a short last write leaves nothing in a buffer for close() to
    # fail on (whether the last write is short depends on what else is there).
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


class LoopThread:
    """An asyncio loop in a background thread, so blocking clients can talk to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class RunningGateway:
    config: Config
    gateway: Gateway
    loop: LoopThread
    keys: dict[str, Path]
    transports: list[paramiko.Transport] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.gateway.port

    def home(self, login: str) -> Path:
        user = self.config.user(login)
        assert user is not None
        return user.home

    def transport(
        self, login: str, *, password: str | None = None, key: bool = False
    ) -> paramiko.Transport:
        t = paramiko.Transport(("127.0.0.1", self.port))
        self.transports.append(t)
        if key:
            pkey = paramiko.Ed25519Key.from_private_key_file(str(self.keys[login]))
            t.connect(username=login, pkey=pkey)
        else:
            t.connect(username=login, password=password or PASSWORDS[login])
        return t

    def sftp(self, login: str = "alice", **kwargs: Any) -> paramiko.SFTPClient:
        client = paramiko.SFTPClient.from_transport(self.transport(login, **kwargs))
        assert client is not None
        return client

    def rows(
        self, sql: str = "SELECT * FROM operations ORDER BY id", params: tuple[Any, ...] = ()
    ) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.config.journal_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()

    def wait_rows(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        sql: str = "SELECT * FROM operations ORDER BY id",
        timeout: float = 10,
    ) -> list[dict[str, Any]]:
        """Poll the journal until ``predicate(rows)`` holds (the writer is asynchronous)."""
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if self.config.journal_path.exists():
                rows = self.rows(sql)
                if predicate(rows):
                    return rows
            time.sleep(0.05)
        raise AssertionError(f"journal never matched; last rows: {rows[-10:]}")

    def op_rows(self, op: str, timeout: float = 10, count: int = 1) -> list[dict[str, Any]]:
        rows = self.wait_rows(lambda rs: sum(r["op"] == op for r in rs) >= count, timeout=timeout)
        return [r for r in rows if r["op"] == op]

    def close_clients(self) -> None:
        for t in self.transports:
            t.close()
        self.transports.clear()

    def stop(self) -> None:
        self.close_clients()
        self.loop.run(self.gateway.stop())
        self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    tmp: Path,
    keys: dict[str, Path],
    extra: dict[str, Any] | None = None,
    users: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A config with alice (password), bob (key only) and carol (password + key).

    ``extra`` is merged into the sections; ``users`` into the named users.
    """

    def pub(login: str) -> str:
        return keys[login].with_suffix(".pub").read_text().strip()

    data: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1",
            "port": 0,
            "state_dir": "state",
            "host_keys_dir": "hostkeys",
            "create_homes": True,
            "io_threads": 8,
        },
        "journal": {"synchronous": "normal"},
        # Off unless a test asks for it (pipeline_kit.pipeline_settings turns it on).
        "pipeline": {"enabled": False},
        "users": [
            {
                "login": "alice",
                "name": "Alice",
                "surname": "Liddell",
                "email": "alice@example.org",
                "home": "homes/alice",
                "password_hash": _hash("alice"),
            },
            {
                "login": "bob",
                "name": "Bob",
                "surname": "Builder",
                "email": "bob@example.org",
                "home": "homes/bob",
                "authorized_keys": [pub("bob")],
            },
            {
                "login": "carol",
                "name": "Carol",
                "surname": "Danvers",
                "email": "carol@example.org",
                "home": "homes/carol",
                "password_hash": _hash("carol"),
                "authorized_keys": [pub("carol")],
            },
        ],
    }
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    for user in data["users"]:
        user.update((users or {}).get(user["login"], {}))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


_HASHES: dict[str, str] = {}


def _hash(login: str) -> str:
    # Cheap scrypt parameters keep the suite fast; production uses the default.
    if login not in _HASHES:
        _HASHES[login] = hash_password(PASSWORDS[login], log_n=10)
    return _HASHES[login]


@pytest.fixture(scope="session")
def user_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("userkeys")
    keys = {}
    for login in ("bob", "carol"):
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"{login}@test")
        path = folder / login
        path.write_bytes(key.export_private_key("openssh"))
        path.chmod(0o600)
        path.with_suffix(".pub").write_bytes(key.export_public_key("openssh"))
        keys[login] = path
    return keys


FAST_PATHS_ENV = "SFTPGATE_SERVER__FAST_PATHS"


def start_gateway(
    tmp: Path,
    keys: dict[str, Path],
    *,
    extra: dict[str, Any] | None = None,
    users: dict[str, dict[str, Any]] | None = None,
    server_class: type[GatewaySSHServer] = GatewaySSHServer,
) -> RunningGateway:
    # scripts/test.sh runs the front-door tests a second time with
    # SFTPGATE_SERVER__FAST_PATHS=off: asyncssh's public API only.
    environ = {k: v for k, v in os.environ.items() if k == FAST_PATHS_ENV}
    config = load_config(write_config(tmp, keys, extra, users), environ=environ)
    loop = LoopThread()
    gateway = Gateway(config, server_class=server_class)
    loop.run(gateway.start())
    return RunningGateway(config, gateway, loop, keys)


@pytest.fixture
def gateway(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = start_gateway(tmp_path, user_keys)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def sftp(gateway: RunningGateway) -> paramiko.SFTPClient:
    return gateway.sftp("alice")
