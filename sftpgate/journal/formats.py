"""Pure formatters for journal rows (the dicts of :mod:`.query`): table, JSON lines, xferlog.

Paths, logins and messages come from clients, so every formatter makes sure a
crafted value cannot forge an extra line or send escape sequences to the
terminal reading the output.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..events import STATUS_OK, UploadState

Row = Mapping[str, Any]

# Minimum widths; longer values push the line rather than being cut (an audit
# log must not hide the end of a name).
_TIME_W, _USER_W, _REMOTE_W, _NODE_W, _OP_W, _STATUS_W, _BYTES_W = 19, 12, 21, 12, 12, 17, 20

_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    r"""Return ``text`` with one visible line and no terminal controls.

    Backslash becomes ``\\``; newline, carriage return and tab become ``\n``,
    ``\r``, ``\t``; any other character Python does not call printable (C0/C1
    controls such as ESC, DEL, bidi overrides, line separators, lone surrogates
    from undecodable names) becomes ``\xNN``, ``\uNNNN`` or ``\UNNNNNNNN``.
    The result is unambiguous: different inputs give different outputs.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out: list[str] = []
    for char in text:
        named = _NAMED_ESCAPES.get(char)
        if named is not None:
            out.append(named)
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            if code <= 0xFF:
                out.append(f"\\x{code:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else escape(str(value))


def local_time(ts: float) -> str:
    """Return ``ts`` as local ISO 8601 to the second, e.g. ``2026-11-23T10:00:00``."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%dT%H:%M:%S")


def utc_time(ts: float) -> str:
    """Return ``ts`` as ISO 8601 UTC with milliseconds, e.g. ``2026-11-23T09:00:00.000Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _remote(row: Row) -> str:
    addr = row.get("remote_addr")
    if not addr:
        return "-"
    port = row.get("remote_port")
    host = f"[{addr}]" if ":" in str(addr) else str(addr)
    return escape(f"{host}:{port}" if port is not None else str(addr))


def _bytes(row: Row) -> str:
    parts = []
    if row.get("bytes_read") is not None:
        parts.append(f"r={row['bytes_read']}")
    if row.get("bytes_written") is not None:
        parts.append(f"w={row['bytes_written']}")
    return " ".join(parts)


TABLE_HEADER = (
    f"{'TIME':<{_TIME_W}} {'USER':<{_USER_W}} {'REMOTE':<{_REMOTE_W}} {'NODE':<{_NODE_W}} "
    f"{'OP':<{_OP_W}} "
    f"{'STATUS':<{_STATUS_W}} {'BYTES':<{_BYTES_W}} PATH"
)


def table_row(row: Row) -> str:
    """Format one row as a line of :func:`table` (no header, no newline).

    Columns: local time, user, remote address:port, node (the host the
    session was on; ``-`` when not recorded), op, status, bytes
    (``r=N`` read, ``w=N`` written, when recorded), path (``-> path2`` when
    there is one) and, after ``--``, the message. Every client-supplied text
    goes through :func:`escape`.
    """
    path = _text(row.get("path"))
    if row.get("path2") is not None:
        path = f"{path} -> {_text(row['path2'])}"
    line = (
        f"{local_time(float(row['ts'])):<{_TIME_W}} {_text(row.get('login')):<{_USER_W}} "
        f"{_remote(row):<{_REMOTE_W}} {_text(row.get('node')):<{_NODE_W}} "
        f"{_text(row.get('op')):<{_OP_W}} "
        f"{_text(row.get('status')):<{_STATUS_W}} {_bytes(row):<{_BYTES_W}} {path}"
    )
    if row.get("message"):
        line = f"{line}  -- {_text(row['message'])}"
    return line


def table(rows: Iterable[Row], *, header: bool = True) -> list[str]:
    """Return readable fixed-width lines for ``rows``, after a header line if ``header``.

    No line contains a newline or a control character, whatever the rows hold.
    """
    lines = [TABLE_HEADER] if header else []
    lines.extend(table_row(row) for row in rows)
    return lines


def json_line(row: Row) -> str:
    """Return ``row`` as one line of JSON (ASCII only, so no raw controls).

    Keys are the row's column names in order, plus ``time``: ``ts`` as ISO
    8601 UTC. ``attrs``, stored as JSON text, is decoded into an object.
    """
    data = dict(row)
    data["time"] = utc_time(float(row["ts"]))
    attrs = data.get("attrs")
    if isinstance(attrs, str):
        # Not JSON after all: keep the text as it is.
        with contextlib.suppress(ValueError):
            data["attrs"] = json.loads(attrs)
    return json.dumps(data, ensure_ascii=True)


def _field(value: Any, empty: str = "-") -> str:
    """One xferlog field: never empty, no whitespace, no control characters."""
    if value is None or str(value) == "":
        return empty
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in str(value))


def xferlog_line(row: Row) -> str:
    """Return a transfer row (from ``fetch_transfers``) as one wu-ftpd xferlog line.

    The 14 fields: current-time (``ctime`` of the close, local time, e.g.
    ``Mon Nov 23 10:00:00 2026``; this field itself holds spaces, as in
    wu-ftpd, so parsers take its first 24 characters), transfer-time (duration
    rounded to whole seconds), remote-host, file-size (bytes transferred),
    filename, transfer-type ``b``, special-action-flag ``_``, direction ``i``
    (upload: bytes were written) or ``o`` (download), access-mode ``r``,
    username, service-name ``sftp``, authentication-method ``0``,
    authenticated-user-id ``*`` and completion-status ``c``, or ``i`` when the
    upload was left incomplete or the close failed.

    The format is space-separated, so in the filename (and in host and user)
    every whitespace or non-printable character is replaced by ``_``: a name
    like ``a b\\n.txt`` is logged as ``a_b_.txt``. Use ``--json`` for exact names.
    """
    written = int(row.get("bytes_written") or 0)
    read = int(row.get("bytes_read") or 0)
    upload = written > 0
    duration_ms = row.get("duration_ms")
    seconds = max(0, round(float(duration_ms) / 1000)) if duration_ms is not None else 0
    incomplete = (
        row.get("upload_state") == UploadState.INCOMPLETE.value
        or row.get("status", STATUS_OK) != STATUS_OK
    )
    fields = (
        time.ctime(float(row["ts"])),
        str(seconds),
        _field(row.get("remote_addr")),
        str(written if upload else read),
        _field(row.get("path")),
        "b",
        "_",
        "i" if upload else "o",
        "r",
        _field(row.get("login")),
        "sftp",
        "0",
        "*",
        "i" if incomplete else "c",
    )
    return " ".join(fields)
