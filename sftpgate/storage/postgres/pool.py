"""Pooled connections to PostgreSQL (psycopg 3). The ports block (storage/ports.py): callers
run them on threads, so these are psycopg's thread-safe pool and plain connections."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.rows import dict_row
from psycopg.types.string import StrDumperUnknown
from psycopg_pool import ConnectionPool, PoolTimeout

from ..ports import StorageUnavailable

Conn = psycopg.Connection[dict[str, Any]]


class JournalText(StrDumperUnknown):
    """Strings as PostgreSQL text, whatever a client put in a name: a NUL (which PostgreSQL
    text cannot hold) is stored as the four characters ``\\x00``, and a lone surrogate (a
    name that is not UTF-8) as ``\\udcXX``, as the journal's table output shows them (SQLite
    keeps a NUL and sets a lone surrogate's record aside). Nothing a client sends makes a
    record unwritable here."""

    def dump(self, obj: str) -> Buffer | None:
        if "\x00" in obj:
            obj = obj.replace("\x00", "\\x00")
        try:
            return obj.encode("utf-8")
        except UnicodeEncodeError:
            return obj.encode("utf-8", "backslashreplace")


def _configure(conn: Conn) -> None:
    conn.adapters.register_dumper(str, JournalText)


def open_pool(url: str, size: int = 10) -> ConnectionPool[Conn]:
    """An open pool of up to ``size`` autocommit connections to ``url`` (rows as dicts).

    Callers open transactions explicitly (``with conn.transaction()``). Raises
    :class:`StorageUnavailable` when the server cannot be reached within 30 s.
    """
    pool: ConnectionPool[Conn] = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        kwargs={"autocommit": True, "row_factory": dict_row, "client_encoding": "utf-8"},
        configure=_configure,
        open=False,
        name="sftpgate",
    )
    try:
        pool.open(wait=True, timeout=30)
    except PoolTimeout as error:
        pool.close()
        raise StorageUnavailable(f"PostgreSQL cannot be reached: {error}") from error
    return pool


@contextmanager
def unavailable_as_storage() -> Iterator[None]:
    """Translate psycopg's errors of the connection (not of the statement) into
    :class:`StorageUnavailable`, which the ports promise for "retry later"."""
    try:
        yield
    except (psycopg.OperationalError, PoolTimeout) as error:
        raise StorageUnavailable(f"PostgreSQL: {error}") from error


class PoolPort:
    """A port on the backend's shared pool. ``close`` lets go of it once; the backend closes
    the pool when its last port is closed."""

    def __init__(self, pool: ConnectionPool[Conn], release: Callable[[], None] | None = None):
        self._pool = pool
        self._release = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
