"""A real PostgreSQL for tests: Debian's ``initdb`` + ``pg_ctl`` on a temp dir and a free port.

PostgreSQL refuses to run as root: when the suite runs as root (as CI does) the
server runs as Debian's ``postgres`` account (made by the ``postgresql`` package
that ``scripts/setup.sh`` installs), through ``runuser``; otherwise as the
caller. It listens on 127.0.0.1 only, with its socket in its own folder, and
trusts loopback logins (a throwaway cluster nobody else can reach). fsync is
off: the tests check what the gateway commits, not the disk.

One server serves a whole test session (:func:`shared_server`, reference
counted, so every module's session fixture gets the same one); each test takes
its own database (:meth:`PgServer.database`), dropped afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BIN = Path(os.environ.get("SFTPGATE_PG_BIN", "/usr/lib/postgresql/15/bin"))
INSTALL = "apt-get install postgresql (scripts/setup.sh does this)"
USER = "sftpgate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server(argv: list[str]) -> list[str]:
    """``argv`` run as the account the server runs as (``postgres`` when we are root)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


@dataclass
class PgServer:
    root: Path
    port: int
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser, outside any transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.encode())

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database; yields its URL and drops it afterwards."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        subprocess.run(
            _as_server([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
            capture_output=True,
            check=False,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PgServer:
    """initdb + pg_ctl start on a fresh temp dir and free port; fails the test naming the
    install step when PostgreSQL's binaries are missing."""
    for tool in ("initdb", "pg_ctl"):
        if not (BIN / tool).is_file():
            pytest.fail(f"PostgreSQL's {tool} is not in {BIN}: run `{INSTALL}`")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(f"no `postgres` account to run PostgreSQL as: run `{INSTALL}`")
    root = Path(tempfile.mkdtemp(prefix="sftpgate-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = PgServer(root, _free_port())
    try:
        subprocess.run(
            _as_server(
                [
                    str(BIN / "initdb"),
                    "-D",
                    str(server.data),
                    "-U",
                    USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            capture_output=True,
            check=True,
            timeout=120,
        )
        options = (
            f"-p {server.port} -c listen_addresses=127.0.0.1 -k {root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        subprocess.run(
            _as_server(
                [
                    str(BIN / "pg_ctl"),
                    "-D",
                    str(server.data),
                    "-l",
                    str(root / "log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            capture_output=True,
            check=True,
            timeout=90,
        )
    except subprocess.CalledProcessError as error:
        log = root / "log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        server.stop()
        pytest.fail(f"PostgreSQL did not start: {error.stderr!r} {tail}")
    _wait_ready(server)
    return server


def _wait_ready(server: PgServer) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(server.url(), connect_timeout=5):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # waiting for a condition (the server accepting logins), bounded


_shared: PgServer | None = None
_users = 0


@contextlib.contextmanager
def shared_server() -> Iterator[PgServer]:
    """The session's one server, started by its first user and stopped by its last."""
    global _shared, _users
    if _shared is None:
        _shared = start_server()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.stop()
            _shared = None


_SESSION_KEY = pytest.StashKey[PgServer]()


def session_server(config: pytest.Config) -> PgServer:
    """The test session's one server, stopped when the session ends (for helpers that have a
    ``request`` but no fixture of their own, like the contract suite's backends)."""
    if _SESSION_KEY not in config.stash:
        holder = shared_server()
        config.stash[_SESSION_KEY] = holder.__enter__()
        config.add_cleanup(lambda: holder.__exit__(None, None, None))
    return config.stash[_SESSION_KEY]


def contract_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A PostgreSQL backend on a new, empty database, dropped after the test (for
    tests/contract_kit.py's BACKENDS)."""
    from sftpgate.storage.postgres.backend import PostgresBackend

    database = session_server(request.config).database()
    url = database.__enter__()
    request.addfinalizer(lambda: database.__exit__(None, None, None))
    return PostgresBackend(url, size=4)
