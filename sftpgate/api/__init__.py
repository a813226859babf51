"""The admin HTTP API (``api.listen``; docs/api.md): tokens (auth.py), the route table
(routes.py), its OpenAPI document (openapi.py), the server (server.py), and the poll that
ends sessions an admin asked to disconnect (disconnects.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from .server import Api, Reload


async def start_api(current: Callable[[], Config], reload: Reload) -> Api:
    """Listen on ``api.listen``; the running API (``stop()`` it). Raises OSError when the
    address cannot be listened on."""
    api = Api(current, reload)
    try:
        await api.start()
    except BaseException:
        await api.stop()
        raise
    return api
