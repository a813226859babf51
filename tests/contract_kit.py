"""The backends the storage contract suite (tests/test_contract_*.py) runs against.

huey's model: ONE set of tests, run unchanged against every adapter of the ports in
``sftpgate/storage/ports.py``. A backend is added by ONE entry in :data:`BACKENDS`: a
function of the test's ``request`` and ``tmp_path`` returning a fresh, empty
:class:`~sftpgate.storage.ports.Backend` (its own file or database; the suite
migrates it). Each test module parametrizes its ``backend`` fixture over BACKENDS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pg_kit
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.storage.ports import Backend
from sftpgate.storage.sqlite import SQLiteBackend


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return SQLiteBackend(tmp_path / "journal.sqlite3", synchronous="normal")


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "sqlite": _sqlite,
    "postgresql": pg_kit.contract_backend,
}


def fresh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The body of each module's ``backend`` fixture: a new backend, migrated."""
    backend = BACKENDS[request.param](request, tmp_path)
    backend.migrate()
    try:
        yield backend
    finally:
        with contextlib.suppress(Exception):
            close = getattr(backend, "close", None)
            if close is not None:
                close()


@contextlib.contextmanager
def opened(port: Any) -> Iterator[Any]:
    """A port, closed afterwards."""
    try:
        yield port
    finally:
        port.close()


def session(sid: str = "s1", login: str = "alice", node: str = "gw1") -> SessionInfo:
    return SessionInfo(id=sid, remote_addr="192.0.2.7", remote_port=50000, login=login, node=node)


def upload(
    info: SessionInfo, path: str, when: float, *, state: UploadState = UploadState.COMPLETE
) -> Event:
    return Event(Op.CLOSE, info, time=when, path=path, bytes_written=100, upload=state)


def collect(reader: Any, flt: Any, **options: Any) -> tuple[list[dict[str, Any]], str]:
    """Every row a scan emits, and its cursor."""
    rows: list[dict[str, Any]] = []
    cursor = reader.scan(flt, rows.append, **options)
    return rows, cursor
