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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import pgserver
from bench.pgserver import BIN, INSTALL, USER, _as_server

__all__ = ["BIN", "INSTALL", "USER", "PgServer", "_as_server", "shared_server", "start_server"]

# The server's handle: ``url(dbname)``, ``admin(sql)``, ``database()`` (a fresh one).
PgServer = pgserver.BenchPostgres


def start_server() -> PgServer:
    """A test server (fsync off); fails the test naming the install step when PostgreSQL's
    binaries are missing, or with PostgreSQL's log when it does not start."""
    try:
        return pgserver.start(durable=False)
    except (pgserver.PostgresMissing, RuntimeError) as exc:
        pytest.fail(str(exc))


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
            pgserver.stop(_shared)
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
