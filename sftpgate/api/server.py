"""The admin HTTP API (aiohttp): dispatch from the route table, tokens, errors, journaling.

Every request, refused ones too, is journaled as an ``admin`` operation (the token's name,
never the token; method, path, status, peer) through the storage port ``AdminStore``, in
batches from a queue, so a flood of refused requests costs few commits. Every database call
runs on one thread of this server's own (``Api.db``), never on the event loop.

Errors become JSON ``{"error": "..."}`` with a 4xx status in exactly one place
(:meth:`Api._dispatch`); nothing unexpected reaches a client as a traceback: it is logged and
answered 500 with a fixed message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from aiohttp import web

from ..config import Config, split_host_port
from ..defender import STRIKE_MEMORY, Ban, defender_session, source_of
from ..errors import ConfigError, NotFoundError, NothingThere, SftpgateError
from ..events import Event, Op, SessionInfo
from ..journal import formats
from ..journal.query import JournalFilter, parse_time
from ..storage import open_backend
from ..storage.ports import Conflict, ReplayFile, SchemaAhead, SchemaBehind, StorageUnavailable
from .auth import authenticate
from .openapi import document
from .routes import MAX_ID, ROUTES, Param, Route

log = logging.getLogger(__name__)
T = TypeVar("T")

UNAUTHORIZED = {"error": "unauthorized"}
FOLLOW_INTERVAL = 0.5
# Admin rows waiting to be journaled; past this, rows are dropped (and the drop logged).
JOURNAL_QUEUE = 10000
PATH_KEPT = 1024  # of a request's path, in its journal row


class ApiError(SftpgateError):
    """A request the API refuses: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Reload = Callable[[Config], Awaitable[None]]


class Api:
    """One admin API listener. ``start()`` listens on ``api.listen``; ``stop()`` ends follows,
    closes the listener and journals what is queued.

    ``current`` returns the running config (users, tokens: a reload changes them);
    ``reload`` applies a freshly read config as SIGHUP does, raising ConfigError.
    """

    def __init__(self, current: Callable[[], Config], reload: Reload) -> None:
        self.current = current
        self._reload = reload
        cfg = current()
        assert cfg.api.listen is not None
        self.host, self.wanted_port = split_host_port(cfg.api.listen)  # checked by the config
        self.port = 0
        self.draining = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="api-db")
        self._stores: dict[str, Any] = {}
        self._queue: asyncio.Queue[Event] = asyncio.Queue(JOURNAL_QUEUE)
        self._journal_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._document = document()
        self.dropped = 0

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(
            client_max_size=self.current().api.max_body, middlewares=[self._middleware]
        )
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._endpoint(route))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.wanted_port, shutdown_timeout=5)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.wanted_port
        self._journal_task = asyncio.create_task(self._journal_loop())
        log.info(
            "admin API on %s:%d (%d tokens)", self.host, self.port, len(self.current().api.tokens)
        )

    async def stop(self) -> None:
        """End every follow (cleanly), stop listening, journal the last rows, close stores."""
        self.draining.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._journal_task is not None:
            await self._queue.join()
            self._journal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._journal_task
            self._journal_task = None
        await self.db(self._close_stores)
        self._executor.shutdown(wait=True)

    def _close_stores(self) -> None:
        for store in self._stores.values():
            with contextlib.suppress(Exception):
                store.close()
        self._stores.clear()

    # -- the database, on our one thread -------------------------------------------------

    async def db(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def store(self, kind: str) -> Any:
        """The port ``kind`` (reader, jobs, bans, admin), opened once. On the db thread."""
        store = self._stores.get(kind)
        if store is None:
            store = self._stores[kind] = getattr(open_backend(self.current()), kind)()
        return store

    def _drop(self, kind: str) -> None:
        """A port that failed is reopened at its next use (the database may be back)."""
        store = self._stores.pop(kind, None)
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    async def call(self, kind: str, fn: Callable[[Any], T]) -> T:
        """``fn(port)`` on the db thread; the database's failures as 503."""

        def run() -> T:
            try:
                return fn(self.store(kind))
            except (StorageUnavailable, SchemaBehind, SchemaAhead, OSError) as exc:
                self._drop(kind)
                log.warning("admin API: %s: %s", kind, exc)
                raise ApiError(503, "the database cannot be reached now; try again") from None
            except Exception as exc:
                if type(exc).__module__.startswith(("sqlite3", "psycopg")):
                    self._drop(kind)
                    log.warning("admin API: %s: %s", kind, exc)
                    raise ApiError(503, "the database failed; try again") from None
                raise

        return await self.db(run)

    # -- journal of admin actions --------------------------------------------------------

    def journal(self, event: Event) -> None:
        if not self.current().journal.enabled:
            return  # journal.enabled: false journals nothing, the API's rows neither
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("admin API: journal queue full, %d rows dropped", self.dropped)

    async def _journal_loop(self) -> None:
        while True:
            events = [await self._queue.get()]
            while not self._queue.empty() and len(events) < 500:
                events.append(self._queue.get_nowait())
            try:
                await self.call("admin", functools.partial(_journal_batch, events))
            except Exception:
                log.exception("admin API: journaling %d requests failed", len(events))
            finally:
                for _ in events:
                    self._queue.task_done()

    # -- requests -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.monotonic()
        request["token"] = None
        try:
            response = await handler(request)
        except SftpgateError as exc:
            error = _translate(exc)
            if error is None:
                raise
            response = _error(error.status, str(error))
        except web.HTTPException as exc:
            # aiohttp's own: no such path (404), method (405), a body too large (413).
            if exc.status == 413:
                response = _error(
                    413, f"the body is larger than {self.current().api.max_body} bytes"
                )
            elif exc.status in (404, 405) and not self._known(request):
                response = _unauthorized()  # no route is revealed to a caller without a token
            else:
                response = _error(exc.status, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin API: %s %s failed", request.method, request.path[:PATH_KEPT])
            response = _error(500, "the request failed; the server's log says why")
        self._journal_request(request, response.status, time.monotonic() - started)
        return response

    def _known(self, request: web.Request) -> bool:
        """Whether the request carries a configured token (noted for its journal row)."""
        token = authenticate(request.headers.get("Authorization"), self.current().api.tokens)
        request["token"] = token
        return token is not None

    def _journal_request(self, request: web.Request, status: int, duration: float) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address, port = (str(peer[0]), int(peer[1])) if peer else (request.remote or "", 0)
        token = request.get("token")
        name = token.name if token is not None else None
        session = SessionInfo(id="api", remote_addr=address, remote_port=port, login=name)
        self.journal(
            Event(
                Op.ADMIN,
                session,
                path=request.path[:PATH_KEPT],
                message=f"{request.method} {status}",
                attrs={"method": request.method, "status": status, "token": name},
                duration=duration,
                status="ok" if status < 400 else f"http_{status}",
            )
        )

    def _endpoint(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        handler: Callable[..., Awaitable[Any]] = getattr(self, f"_do_{route.handler}")

        async def endpoint(request: web.Request) -> web.StreamResponse:
            if route.role is not None:
                token = authenticate(
                    request.headers.get("Authorization"), self.current().api.tokens
                )
                if token is None:
                    return _unauthorized()
                request["token"] = token
                if route.role == "admin" and token.role != "admin":
                    raise ApiError(403, "this token may only read")
            args = _arguments(route, request)
            body = await _body(request) if route.body is not None else None
            if route.stream:
                result: web.StreamResponse = await handler(request, args)
                return result
            payload = (
                await handler(request, args, body) if route.body else await handler(request, args)
            )
            if route.response == "OpenAPI":
                return web.json_response(payload, status=route.status)
            return web.Response(
                text=json.dumps(payload, ensure_ascii=True),
                status=route.status,
                content_type="application/json",
            )

        return endpoint

    # -- the handlers (one per route, found by the route's handler name) ------------------

    async def _do_openapi(self, request: web.Request, args: dict[str, Any]) -> Any:
        return self._document

    async def _do_journal(self, request: web.Request, args: dict[str, Any]) -> Any:
        flt = _journal_filter(args)
        limit = args.get("limit", 100)
        transfers = bool(args.get("transfers"))
        after = args.get("cursor")

        def page(reader: Any) -> dict[str, Any]:
            rows: list[dict[str, Any]] = []

            def emit(row: dict[str, Any]) -> None:
                rows.append(row)
                if len(rows) > limit:
                    raise _PageFull

            try:
                cursor: str | None = reader.scan(flt, emit, transfers=transfers, after=after)
            except _PageFull:
                # A row's id is a cursor too (ports.JournalReader.scan): the next page starts
                # after the last row of this one.
                return {
                    "rows": _rows(rows[:limit]),
                    "cursor": str(rows[limit - 1]["id"]),
                    "more": True,
                }
            except NothingThere:
                return {"rows": [], "cursor": None, "more": False}
            return {"rows": _rows(rows), "cursor": cursor, "more": False}

        return await self.call("reader", page)

    async def _do_follow(self, request: web.Request, args: dict[str, Any]) -> web.StreamResponse:
        flt = _journal_filter(args)
        transfers = bool(args.get("transfers"))
        cursor: str | None = args.get("cursor")

        def scan(reader: Any) -> tuple[list[dict[str, Any]], str | None]:
            rows: list[dict[str, Any]] = []
            try:
                if cursor is None:  # from now on: where the journal ends
                    end = reader.scan(replace(flt, limit=1), lambda row: None, transfers=transfers)
                    return [], str(end)
                new = reader.scan(flt, rows.append, transfers=transfers, after=cursor)
            except NothingThere:
                return [], None
            return rows, str(new)

        if cursor is None:
            _, cursor = await self.call("reader", scan)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            while not self.draining.is_set():
                rows, found = await self.call("reader", scan)
                if found is not None:
                    cursor = found
                for row in rows:
                    await response.write(formats.json_line(row).encode() + b"\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.draining.wait(), FOLLOW_INTERVAL)
            await response.write_eof()
        except (ConnectionError, ApiError):
            pass  # the client went away, or the database did: the stream just ends
        return response

    async def _do_sessions(self, request: web.Request, args: dict[str, Any]) -> Any:
        rows = await self.call(
            "admin", lambda store: store.sessions(node=args.get("node"), login=args.get("user"))
        )
        return {"sessions": rows}

    async def _do_disconnect(self, request: web.Request, args: dict[str, Any]) -> Any:
        name = request["token"].name
        return await self.call(
            "admin", lambda store: store.request_disconnect(args["id"], name, time.time())
        )

    async def _do_jobs(self, request: web.Request, args: dict[str, Any]) -> Any:
        jobs = await self.call(
            "jobs",
            lambda store: store.list(
                states=tuple(args.get("state", ())),
                login=args.get("user"),
                limit=args.get("limit", 100),
            ),
        )
        return {"jobs": [job.to_dict() for job in jobs]}

    async def _do_job(self, request: web.Request, args: dict[str, Any]) -> Any:
        return (await self.call("jobs", lambda store: store.get(args["id"]))).to_dict()

    async def _do_retry(self, request: web.Request, args: dict[str, Any]) -> Any:
        return (await self.call("jobs", lambda store: store.retry(args["id"]))).to_dict()

    async def _do_cancel(self, request: web.Request, args: dict[str, Any]) -> Any:
        return (await self.call("jobs", lambda store: store.cancel(args["id"]))).to_dict()

    async def _do_replay(self, request: web.Request, args: dict[str, Any]) -> Any:
        upload_id: int = args["id"]
        upload = await self.call("admin", lambda store: store.upload(upload_id))
        if upload is None:
            raise ApiError(404, f"no upload {upload_id}")
        cfg = self.current()
        user = cfg.user(upload["login"] or "")
        if user is None:
            raise ApiError(404, f"upload {upload_id}: its user is no longer configured")
        found = await asyncio.to_thread(_find_upload, user, upload)
        job_id = await self.call(
            "admin", lambda store: store.replay(upload_id, found, cfg.jobs.max_attempts)
        )
        return (await self.call("jobs", lambda store: store.get(job_id))).to_dict()

    async def _do_users(self, request: web.Request, args: dict[str, Any]) -> Any:
        return {"users": [user_row(user) for user in self.current().users]}

    async def _do_reload(self, request: web.Request, args: dict[str, Any]) -> Any:
        from ..config import load_config

        try:
            config = await asyncio.to_thread(load_config, self.current().path)
            await self._reload(config)
        except ConfigError as exc:
            raise ApiError(422, f"reload refused, the old config stays: {exc}") from None
        return {"reloaded": True, "users": len(self.current().users)}

    async def _do_bans(self, request: web.Request, args: dict[str, Any]) -> Any:
        bans: list[Ban] = await self.call("bans", lambda store: store.list())
        now = time.time()
        return {
            "bans": [
                {**ban.as_dict(), "active": ban.until > now}
                for ban in bans
                if ban.until > now or args.get("all")
            ]
        }

    async def _do_ban(self, request: web.Request, args: dict[str, Any], body: Any) -> Any:
        body = _ban_request(body)
        address = _address(body["address"])
        cfg = self.current()
        seconds = float(body.get("seconds", cfg.defender.ban_time))
        reason = body.get("reason") or "banned by an administrator"
        name = request["token"].name

        def ban(store: Any) -> Ban:
            now = time.time()
            old = next((b for b in store.list() if b.address == address), None)
            strikes = old.strikes + 1 if old and now - old.until < STRIKE_MEMORY else 1
            new = Ban(address, now + seconds, strikes, reason, now)
            store.upsert([new])
            store.journal(
                Event(
                    Op.BAN,
                    defender_session(address),
                    message=f"banned for {seconds:.0f} s by the admin API ({name}): {reason}",
                    attrs={"until": new.until, "strikes": strikes},
                )
            )
            return new

        new = await self.call("bans", ban)
        return {**new.as_dict(), "active": True}

    async def _do_unban(self, request: web.Request, args: dict[str, Any]) -> Any:
        address = _address(args["address"])
        name = request["token"].name

        def unban(store: Any) -> Ban | None:
            removed: Ban | None = store.remove(address)
            if removed is not None:
                store.journal(
                    Event(
                        Op.UNBAN,
                        defender_session(address),
                        message=f"ban lifted by the admin API ({name})",
                    )
                )
            return removed

        if await self.call("bans", unban) is None:
            raise ApiError(404, f"{address} is not banned")
        return {"address": address, "lifted": True}


def _journal_batch(events: list[Event], store: Any) -> None:
    store.journal(events)


class _PageFull(Exception):
    """A page has one row more than its limit: stop the scan."""


# -- helpers: pure, or blocking where they say ---------------------------------------------


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        text=json.dumps({"error": message}, ensure_ascii=True),
        status=status,
        content_type="application/json",
    )


def _unauthorized() -> web.Response:
    response = _error(401, UNAUTHORIZED["error"])
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(param: Param, text: str) -> Any:
    if param.type == "integer":
        if (
            not text.isdigit()
            or len(text) > 19
            or not (param.minimum or 0)
            <= int(text)
            <= (param.maximum if param.maximum is not None else MAX_ID)
        ):
            raise ApiError(400, f"{param.name}: must be a whole number in the allowed range")
        return int(text)
    if param.type == "boolean":
        value = _BOOLEANS.get(text.lower())
        if value is None:
            raise ApiError(400, f"{param.name}: must be true or false")
        return value
    if len(text) > param.max_length or "\x00" in text:
        raise ApiError(400, f"{param.name}: too long, or holds a NUL")
    if param.pattern is not None and not re.fullmatch(param.pattern, text):
        raise ApiError(400, f"{param.name}: not a value this API gave out")
    if param.enum and text not in param.enum:
        raise ApiError(400, f"{param.name}: {text!r} is not one of {', '.join(param.enum)}")
    return text


def _arguments(route: Route, request: web.Request) -> dict[str, Any]:
    """The route's parameters from the path and the query, converted; ApiError(400) for an
    unknown, repeated or bad one."""
    declared = {p.name: p for p in route.params if p.where == "query"}
    args: dict[str, Any] = {}
    for name in request.query:
        if name not in declared:
            raise ApiError(400, f"unknown parameter {name[:64]!r}")
    for name, param in declared.items():
        values = request.query.getall(name, [])
        if not values:
            continue
        if param.many:
            items = [v.strip() for value in values for v in value.split(",") if v.strip()]
            args[name] = [_convert(param, item) for item in items]
        elif len(values) > 1:
            raise ApiError(400, f"{name}: given more than once")
        else:
            args[name] = _convert(param, values[0])
    for param in route.params:
        if param.where == "path":
            args[param.name] = _convert(param, request.match_info[param.name])
    return args


async def _body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ApiError(400, "the body must be JSON (Content-Type: application/json)")
    raw = await request.read()  # aiohttp refuses more than client_max_size (413)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None


def _ban_request(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - {"address", "seconds", "reason"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0][:64]!r}")
    if not isinstance(body.get("address"), str):
        raise ApiError(400, "address: required, a string")
    seconds = body.get("seconds")
    if seconds is not None and (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds <= 10**9
    ):
        raise ApiError(400, "seconds: must be a number greater than 0 (at most 10^9)")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 256):
        raise ApiError(400, "reason: must be a string of at most 256 characters")
    return body


def _address(text: str) -> str:
    """The ban key of an address (an IPv6 address: its /64); ApiError(400) for anything else."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ApiError(400, f"not an IP address: {text[:64]!r}") from None
    return source_of(text)


def _journal_filter(args: dict[str, Any]) -> JournalFilter:
    now = time.time()
    times: dict[str, float | None] = {}
    for name in ("since", "until"):
        text = args.get(name)
        try:
            times[name] = None if text is None else parse_time(text, now)
        except (ValueError, OverflowError, OSError) as exc:
            raise ApiError(400, f"{name}: {exc}") from None
    since, until = times["since"], times["until"]
    if since is not None and until is not None and since >= until:
        raise ApiError(400, "since: must be before until")
    if args.get("op") and args.get("transfers"):
        raise ApiError(400, "op: not with transfers, which lists closes only")
    return JournalFilter(
        user=args.get("user"),
        since=since,
        until=until,
        ops=tuple(dict.fromkeys(args.get("op", ()))),
        path_glob=args.get("path"),
        session=args.get("session"),
        failed_only=bool(args.get("failed")),
        node=args.get("node"),
    )


def _rows(rows: list[dict[str, Any]]) -> list[Any]:
    """Rows as ``sftpgate journal --json`` prints them."""
    return [json.loads(formats.json_line(row)) for row in rows]


def user_row(user: Any) -> dict[str, Any]:
    """A user as ``sftpgate users list --json`` prints it."""
    return {
        "login": user.login,
        "name": user.name,
        "surname": user.surname,
        "email": user.email,
        "home": str(user.home),
        "auth": "+".join(
            m
            for m, on in (("password", user.password_hash), ("publickey", user.authorized_keys))
            if on
        ),
    }


def _find_upload(user: Any, upload: dict[str, Any]) -> ReplayFile:
    """The upload's file, opened as its user beneath the home (as the pipeline does), if it is
    still the file uploaded. Blocking. ApiError 404: gone; 409: another file or changed since."""
    from ..beneath import Home
    from ..frontdoor.ssh import user_identity
    from ..identity import call_as
    from ..media.files import Refused, open_upload

    home = Home(user.home)
    try:
        ident = user_identity(user)
        fd, device, inode = call_as(ident, open_upload, home, upload["path"], None)
    except Refused:
        raise ApiError(404, f"upload {upload['id']}: {upload['path']} is gone") from None
    except (OSError, SftpgateError) as exc:
        raise ApiError(404, f"upload {upload['id']}: cannot open {upload['path']}: {exc}") from None
    finally:
        home.close()
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    changed = (
        (upload["inode"] is not None and (upload["device"], upload["inode"]) != (device, inode))
        or not stat.S_ISREG(st.st_mode)
        or st.st_size != upload["bytes"]
        or st.st_mtime > upload["ts"] + 2
    )
    if changed:
        raise ApiError(
            409, f"upload {upload['id']}: {upload['path']} was replaced or changed since"
        )
    return ReplayFile(device, inode)


def _translate(exc: BaseException) -> ApiError | None:
    """An error a handler let through, as the client sees it (None: a bug, logged as one)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc))
    if isinstance(exc, Conflict):
        return ApiError(409, str(exc))
    if isinstance(exc, SftpgateError):
        return ApiError(409, str(exc))  # retry/cancel of a job in the wrong state
    return None
