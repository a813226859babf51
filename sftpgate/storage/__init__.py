"""Storage: the ports (:mod:`.ports`), and the backend a config names (:func:`open_backend`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Config
    from .ports import Backend

# ``database.url`` scheme -> the backend for it (built lazily: importing a driver costs).
# Without ``database.url``: SQLite at ``journal.path``.
URL_BACKENDS: dict[str, Callable[[Config], Backend]] = {}


def _postgresql(config: Config) -> Backend:
    from .postgres.backend import from_config

    backend: Backend = from_config(config)
    return backend


URL_BACKENDS["postgresql"] = URL_BACKENDS["postgres"] = _postgresql


def open_backend(config: Config) -> Backend:
    """The backend ``config`` names; nothing is opened until a port is asked for.

    Raises :class:`~sftpgate.errors.ConfigError` for a URL no backend of this
    build speaks.
    """
    url = config.database.url
    if url is None:
        from .sqlite import SQLiteBackend

        return SQLiteBackend(config.journal_path, synchronous=config.journal.synchronous)
    scheme = url.partition(":")[0].lower()
    factory = URL_BACKENDS.get(scheme)
    if factory is None:
        raise ConfigError(f"database.url: no backend for {scheme}:// in this build")
    return factory(config)
