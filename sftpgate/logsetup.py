"""Logging to stderr (journald picks it up), plain or one JSON object a line.

Every line logged on behalf of a session names it: ``session=<id>`` (the
journal's session id: ``sftpgate journal --session ID`` finds its rows),
``login=<login>`` once the client has named one, and ``peer=<addr>:<port>``.
The front door sets a :class:`SessionTag` in a context variable where a
session begins (:func:`enter_session`, :func:`tagged`); a filter copies it
onto each record, so no log call has to pass it along.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from .events import current_node, set_node

P = ParamSpec("P")
R = TypeVar("R")


class SessionTag:
    """Who a session's log lines are about; one per session, completed as it goes on.

    Mutable on purpose: the tag is set once where the session begins, and
    every context that inherited it (tasks, timers) sees the login once the
    client names it.
    """

    __slots__ = ("login", "peer", "session")

    def __init__(self, session: str, peer: str | None = None, login: str | None = None) -> None:
        self.session = session
        self.peer = peer
        self.login = login

    def __repr__(self) -> str:
        return f"SessionTag({self.session!r}, {self.peer!r}, {self.login!r})"


_SESSION: contextvars.ContextVar[SessionTag | None] = contextvars.ContextVar(
    "sftpgate_session", default=None
)


def current_session() -> SessionTag | None:
    """The session the running code works for (None: no session's work)."""
    return _SESSION.get()


def enter_session(tag: SessionTag | None) -> contextvars.Token[SessionTag | None]:
    """Make ``tag`` the current session in this context (and in tasks created from it)."""
    return _SESSION.set(tag)


def leave_session(token: contextvars.Token[SessionTag | None]) -> None:
    """Undo the :func:`enter_session` that gave ``token``."""
    _SESSION.reset(token)


@contextmanager
def in_session(tag: SessionTag | None) -> Iterator[None]:
    """Run a block on behalf of ``tag`` (None: of no session), then restore what was."""
    token = _SESSION.set(tag)
    try:
        yield
    finally:
        _SESSION.reset(token)


def tagged(tag: SessionTag | None, fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, called on behalf of ``tag`` whoever calls it (a transport, a thread, a timer).

    The cost per call is one context variable set and reset.
    """
    var = _SESSION

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        token = var.set(tag)
        try:
            return fn(*args, **kwargs)
        finally:
            var.reset(token)

    return call


def peer_name(addr: str, port: int) -> str:
    """``addr:port`` (``[addr]:port`` for IPv6)."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def session_extra(session: str, login: str | None, addr: str, port: int) -> dict[str, Any]:
    """``extra=`` for a line about a session other than the current one."""
    return {"session": session, "login": login, "peer": peer_name(addr, port)}


def outside_sessions() -> contextvars.Context:
    """A copy of the current context on behalf of no session: for shared work (a timer
    that saves every user's quota) that a session happened to start."""
    context = contextvars.copy_context()
    context.run(_SESSION.set, None)
    return context


class NodeFilter(logging.Filter):
    """Puts the node name (``server.node``) on every record, and the session it is about.

    A record logged with ``extra={"session": ...}`` keeps what it was given.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = current_node()
        tag = _SESSION.get()
        if tag is not None and getattr(record, "session", None) is None:
            record.session = tag.session
            record.login = tag.login
            record.peer = tag.peer
        return True


# C0 and C1 controls, DEL, and Unicode's own line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A field's value is written bare unless it holds one of these (or is empty).
_NEEDS_QUOTES = re.compile('[\\s"=\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]')


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN``): one line."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def field_value(value: str) -> str:
    """``value`` as one token of a ``key=value`` field: bare if it can be, else quoted.

    Quoted: ``\\`` and ``"`` are backslash-escaped, controls escaped as by
    :func:`escape_controls`; so a login ``eve login=root`` or ``eve\\n…`` cannot
    pass for another field or another line.
    """
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return '"' + escape_controls(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def session_fields(record: logging.LogRecord) -> str:
    """``session=… login=… peer=…`` for a record about a session ("" otherwise)."""
    session = getattr(record, "session", None)
    if session is None:
        return ""
    parts = [f"session={field_value(str(session))}"]
    login = getattr(record, "login", None)
    if login is not None:
        parts.append(f"login={field_value(str(login))}")
    peer = getattr(record, "peer", None)
    if peer is not None:
        parts.append(f"peer={field_value(str(peer))}")
    return " ".join(parts)


class PlainFormatter(logging.Formatter):
    """One line a record: the session's fields first, the message's control characters escaped.

    Messages carry what users send (logins, paths, client versions): a login of
    ``"eve\\nINFO … login root"`` must not write a second, forged line. The
    session's fields come before the message, so text in a message can never
    stand in for them. A traceback keeps its own lines (it is ours, after the
    message).
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = session_fields(record)
        message = escape_controls(record.message)
        record.message = f"{fields} {message}" if fields else message
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": getattr(record, "node", None) or current_node(),
            "pid": record.process,
            "logger": record.name,
        }
        session = getattr(record, "session", None)
        if session is not None:
            data["session"] = session
            data["login"] = getattr(record, "login", None)
            data["peer"] = getattr(record, "peer", None)
        data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str = "info", as_json: bool = False, node: str | None = None) -> None:
    """Log to stderr at ``level``; each line names the node (``node``, else the one set)."""
    if node is not None:
        set_node(node)
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            PlainFormatter("%(levelname)s %(node)s[%(process)d] %(name)s: %(message)s")
        )
    handler.addFilter(NodeFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh logs every packet at info; keep it to warnings unless debugging.
    logging.getLogger("asyncssh").setLevel("DEBUG" if level == "debug" else "WARNING")


def announce(text: str) -> None:
    """Say ``text`` on stderr whatever ``log.level`` is: a plain line, or with ``log.json`` one
    JSON object like every other line (so a shipper reading stderr never meets a line that is
    not JSON). The "listening" and "workers" lines that scripts and people wait for."""
    handler = next(iter(logging.getLogger().handlers), None)
    if handler is None or not isinstance(handler.formatter, JsonFormatter):
        print(text, file=sys.stderr, flush=True)
        return
    record = logging.LogRecord("sftpgate", logging.INFO, __file__, 0, text, None, None)
    handler.handle(record)  # its filters name the node; the level is not consulted
    handler.flush()
