"""The metrics listener: ``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP (aiohttp).

An operations port, but its input is hostile all the same: GET and HEAD on three
paths only (anything else 404 or 405, never a listing), no request body read,
at most :data:`MAX_CONNECTIONS` connections, and a connection that has not sent
a whole request within ``metrics.request_timeout`` seconds of opening (or of its
last answer) is closed — a slowloris holds nothing for long. A scrape's blocking
work (multiprocess files, the database) runs on one thread of its own, never on
the event loop, one scrape at a time.

``/healthz``: 200 ``ok`` while the event loop answers. ``/readyz``: 200 when every
check passes, else 503; one line per check either way (``journal: ok ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import metrics
from .config import Config, split_host_port
from .errors import SftpgateError
from .metrics import Exposition

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
SCRAPE_TIMEOUT = 20.0  # seconds a scrape (or the readiness checks) may take
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A readiness check: (ok, one line saying why), blocking (run on the scrape thread).
Check = Callable[[], tuple[bool, str]]


async def _plain_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "sftpgate"  # not which aiohttp and Python answer


class _Refuse(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: closed as soon as it is made, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class MetricsServer:
    """Serves one :class:`~sftpgate.metrics.Exposition` and readiness ``checks`` on
    ``address``. ``start()`` listens (raising ``OSError`` if it cannot); ``stop()`` closes."""

    def __init__(
        self,
        address: str,
        exposition: Exposition,
        checks: dict[str, Check],
        *,
        idle_limit: float = 10.0,
    ) -> None:
        self.address = address
        self.idle_limit = idle_limit
        self.exposition = exposition
        self.checks = checks
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="metrics")
        self._scrape = asyncio.Lock()
        # Each open connection: [requests in progress, when it last answered or opened].
        self._connections: dict[RequestHandler, list[float]] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(middlewares=[self._track], client_max_size=1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.on_response_prepare.append(_plain_server_header)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.idle_limit,
            max_line_size=2048,
            max_field_size=4096,
            max_headers=32,
        )
        await self._runner.setup()
        host, port = split_host_port(self.address)  # checked by the config
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, host or None, port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._reaper = asyncio.create_task(self._reap())
        log.info("metrics: serving http://%s:%d/metrics (and /healthz, /readyz)", host, self.port)

    def _new_connection(self) -> asyncio.BaseProtocol:
        if len(self._connections) >= MAX_CONNECTIONS:
            return _Refuse()
        assert self._runner is not None and self._runner.server is not None
        handler = self._runner.server()
        # Forgotten by the reaper once closed (within a second): aiohttp's handler has no
        # hook for its end.
        self._connections[handler] = [0, time.monotonic()]
        return handler

    @web.middleware
    async def _track(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        state = self._connections.get(request.protocol)
        if state is not None:
            state[0] += 1
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:  # never a traceback to a client
            log.exception("metrics: %s failed", request.path)
            return web.Response(status=500, text=f"{request.path} failed: {type(exc).__name__}\n")
        finally:
            if state is not None:
                state[0] -= 1
                state[1] = time.monotonic()

    async def _reap(self) -> None:
        """Close connections idle (or too slow to send a request) for ``idle_limit`` s."""
        while True:
            await asyncio.sleep(min(1.0, self.idle_limit / 4))
            now = time.monotonic()
            for handler, (busy, since) in list(self._connections.items()):
                if handler.transport is None:
                    self._connections.pop(handler, None)
                elif not busy and now - since > self.idle_limit:
                    self._connections.pop(handler, None)
                    handler.force_close()

    async def _blocking(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scrape thread, one at a time; TimeoutError after SCRAPE_TIMEOUT."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(SCRAPE_TIMEOUT):
            async with self._scrape:
                return await loop.run_in_executor(self._executor, fn)

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            body = await self._blocking(self.exposition.render)
        except TimeoutError:
            return web.Response(status=503, text="metrics: the scrape timed out\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            results = await self._blocking(self._run_checks)
        except TimeoutError:
            return web.Response(status=503, text="not ready: the checks timed out\n")
        ready = all(ok for ok, _ in results.values())
        lines = [f"{name}: {'ok' if ok else 'FAIL'}: {why}" for name, (ok, why) in results.items()]
        head = "ready" if ready else "not ready"
        return web.Response(status=200 if ready else 503, text="\n".join([head, *lines]) + "\n")

    def _run_checks(self) -> dict[str, tuple[bool, str]]:
        results: dict[str, tuple[bool, str]] = {}
        for name, check in self.checks.items():
            try:
                results[name] = check()
            except Exception as exc:  # a check that breaks fails; it never breaks the answer
                results[name] = (False, f"check failed: {type(exc).__name__}")
        return results

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self._server is not None:
            self._server.close()
            for handler in list(self._connections):
                handler.force_close()
            self._connections.clear()
            await self._server.wait_closed()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.exposition.close)
        self._executor.shutdown(wait=False)


# -- one listener per role -------------------------------------------------------------------


def _journal_check(config: Config, exposition: Exposition) -> Check:
    def check() -> tuple[bool, str]:
        if not config.journal.enabled:
            return True, "journal.enabled is false"
        writable = exposition.gauge_min("sftpgate_journal_writable")
        if writable is None:
            return False, "no journal writer has started"
        if writable < 1:
            return False, "a journal writer's last commit failed (disk, lock or database)"
        return True, "the last commit succeeded"

    return check


def _workers_check(expected: bool, workers: Callable[[], Any]) -> Check:
    def check() -> tuple[bool, str]:
        if not expected:
            return True, "none run in this process"
        pool = workers()
        if pool is None:
            return False, "not running (not started yet, or stopped by a drain)"
        if not pool.alive():
            return False, "stopped or a worker loop ended"
        return True, "running"

    return check


def _smtp_check(config: Config) -> Check:
    def check() -> tuple[bool, str]:
        if not config.email.enabled:
            return True, "email.enabled is false"
        last = metrics.smtp_last()
        if last is None:
            return True, "nothing sent yet"
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.at))
        if last.ok:
            return True, f"last email sent {when}"
        # Not the error's text: it may name a recipient. The log has it.
        return False, f"last email failed {when} ({last.result}); the log says why"

    return check


def _accepting_check(accepting: Callable[[], bool]) -> Check:
    def check() -> tuple[bool, str]:
        if accepting():
            return True, "new connections are accepted"
        return False, "draining: no new connections"

    return check


def _gateways_check(expected: int, children: Callable[[], dict[str, int]]) -> Check:
    def check() -> tuple[bool, str]:
        live = len(children())
        return live >= expected, f"{live} of {expected} gateway processes running"

    return check


async def start_listener(
    config: Config,
    address: str,
    role: str,
    *,
    workers: Callable[[], Any],
    children: Callable[[], dict[str, int]] | None = None,
    accepting: Callable[[], bool] | None = None,
) -> MetricsServer:
    """Start the metrics listener of ``role`` (``serve``, ``supervisor`` or ``worker``).

    ``workers`` gives the worker pool this process runs (or None); ``children`` (the
    supervisor) the gateway processes' pids by name; ``accepting`` whether new SSH
    connections are taken (False once a drain began: ``/readyz`` then says 503, so a
    balancer that asks it sends no one new). Raises :class:`SftpgateError` when the
    address cannot be listened on.
    """
    from .storage import open_backend

    key = "metrics.worker_listen" if role == "worker" else "metrics.listen"
    extra: list[Any] = []
    if config.journal.enabled:
        backend = open_backend(config)
        bans = backend.bans if role != "worker" else None
        extra.append(metrics.StorageCollector(backend.jobs, bans))
    if children is not None:
        supervisor = os.getpid()
        extra.append(metrics.ChildProcesses(lambda: {"supervisor": supervisor, **children()}))
    else:
        own = os.getpid()
        extra.append(metrics.ChildProcesses(lambda: {role: own}))
    exposition = Exposition(extra)
    runs_workers = config.journal.enabled and config.pipeline.enabled and config.jobs.workers > 0
    checks: dict[str, Check] = {}
    if accepting is not None:
        checks["accepting"] = _accepting_check(accepting)
    if role != "worker":
        checks["journal"] = _journal_check(config, exposition)
    checks["workers"] = _workers_check(runs_workers or role == "worker", workers)
    checks["smtp"] = _smtp_check(config)
    if children is not None:
        checks["gateways"] = _gateways_check(config.server.processes, children)
    server = MetricsServer(address, exposition, checks, idle_limit=config.metrics.request_timeout)
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        raise SftpgateError(f"{key}: cannot listen on {address}: {exc.strerror or exc}") from None
    return server
