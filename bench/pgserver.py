"""A throwaway PostgreSQL: Debian's ``initdb`` + ``pg_ctl`` on a temp dir and a free port.

Used by the benchmarks and by the test suite (tests/pg_kit.py wraps it with pytest's
fixtures). For figures the server is **durable** (``durable=True``: ``fsync``,
``synchronous_commit`` and ``full_page_writes`` on, PostgreSQL's defaults), so a commit
waits for its WAL flush as SQLite's ``synchronous=full`` waits for its fsync; the tests
turn all three off (they check what is committed, not the disk).

PostgreSQL refuses to run as root: as root (the bench needs root anyway) the server runs
as Debian's ``postgres`` account through ``runuser``. It listens on 127.0.0.1 only, its
socket in its own folder, trusting loopback logins; it is stopped and its folder removed
when the context ends.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

BIN = Path(os.environ.get("SFTPGATE_PG_BIN", "/usr/lib/postgresql/15/bin"))
INSTALL = "apt-get install postgresql (scripts/setup.sh does this)"
USER = "sftpgate"


class PostgresMissing(RuntimeError):
    """PostgreSQL's binaries (or the account to run them as) are not installed."""


def _as_server(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BenchPostgres:
    root: Path
    port: int
    durable: bool
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.encode())

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database (its URL), dropped afterwards."""
        name = f"bench{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def settings(self) -> dict[str, str]:
        """The server's settings that decide what a commit costs (for the report)."""
        names = (
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_sync_method",
            "server_version",
        )
        with psycopg.connect(self.url()) as conn:
            rows = {n: conn.execute(f"SHOW {n}").fetchone() for n in names}
        return {n: str(row[0]) if row else "?" for n, row in rows.items()}


def start(durable: bool) -> BenchPostgres:
    """initdb + pg_ctl start on a fresh temp dir and free port (see the module); raises
    :class:`PostgresMissing` naming the install step, RuntimeError if it did not start."""
    for tool in ("initdb", "pg_ctl"):
        if not (BIN / tool).is_file():
            raise PostgresMissing(f"PostgreSQL's {tool} is not in {BIN}: run `{INSTALL}`")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresMissing(
                f"no `postgres` account to run PostgreSQL as: run `{INSTALL}`"
            ) from None
    root = Path(tempfile.mkdtemp(prefix="sftpgate-bench-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = BenchPostgres(root, _free_port(), durable)
    data = root / "data"
    initdb = [str(BIN / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--encoding=UTF8"]
    initdb += ["--no-instructions"] + ([] if durable else ["--no-sync"])
    options = f"-p {server.port} -c listen_addresses=127.0.0.1 -k {root} -c max_connections=200"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    start = [str(BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options]
    try:
        subprocess.run(_as_server(initdb), capture_output=True, check=True, timeout=120)
        start += ["-w", "-t", "60", "start"]
        subprocess.run(_as_server(start), capture_output=True, check=True, timeout=90)
    except subprocess.CalledProcessError as error:
        log = root / "log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        stop(server)
        raise RuntimeError(f"PostgreSQL did not start: {error.stderr!r} {tail}") from None
    deadline = time.monotonic() + 30
    while True:  # pg_ctl -w waited for the postmaster; this waits for a login to succeed
        try:
            with psycopg.connect(server.url(), connect_timeout=5):
                return server
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                stop(server)
                raise
            time.sleep(0.1)


def stop(server: BenchPostgres) -> None:
    """Stop the server and remove its folder (a throwaway test server: at once)."""
    mode = "fast" if server.durable else "immediate"
    subprocess.run(
        _as_server([str(BIN / "pg_ctl"), "-D", str(server.root / "data"), "-m", mode, "stop"]),
        capture_output=True,
        check=False,
        timeout=60,
    )
    shutil.rmtree(server.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(*, durable: bool = True) -> Iterator[BenchPostgres]:
    """A PostgreSQL of its own for the length of the block (see the module)."""
    server = start(durable)
    try:
        yield server
    finally:
        stop(server)
