"""Logging to stderr (journald picks it up), plain or one JSON object a line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from .events import current_node, set_node


class NodeFilter(logging.Filter):
    """Puts the node name (``server.node``) on every record: a cluster's logs say whose line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = current_node()
        return True


# C0 and C1 controls, DEL, and Unicode's own line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN``): one line."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


class PlainFormatter(logging.Formatter):
    """One line a record: the message's control characters escaped.

    Messages carry what users send (logins, paths, client versions): a login of
    ``"eve\\nINFO … login root"`` must not write a second, forged line. A
    traceback keeps its own lines (it is ours, after the message).
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": getattr(record, "node", None) or current_node(),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
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
