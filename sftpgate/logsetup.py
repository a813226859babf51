"""Logging to stderr (journald picks it up), plain or one JSON object a line."""

from __future__ import annotations

import json
import logging
import sys
import time

from .events import current_node, set_node


class NodeFilter(logging.Filter):
    """Puts the node name (``server.node``) on every record: a cluster's logs say whose line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = current_node()
        return True


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
            logging.Formatter("%(levelname)s %(node)s[%(process)d] %(name)s: %(message)s")
        )
    handler.addFilter(NodeFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh logs every packet at info; keep it to warnings unless debugging.
    logging.getLogger("asyncssh").setLevel("DEBUG" if level == "debug" else "WARNING")
