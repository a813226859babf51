"""Events between ``sftpgate subsystem`` and the daemon: one JSON object a line. Pure.

The tap sends ``{"seq": N, "event": {...}}``; the daemon answers ``{"ack": N}``
once event N is committed. Events the tap could not get acknowledged go to a
spool file, replayed by the daemon later; ``key`` (session id + seq) lets the
journal drop an event it already has, so a lost ack never means a duplicate.

The socket is open to every local user, so :func:`decode_line` trusts nothing:
each field has a type, a range or size limit, and ops, statuses and upload
states must be names the tap itself can send. A line that breaks any rule
raises :class:`SchemaError`, whose message names the field and the rule but
never echoes the value (it may be a megabyte, or a lie meant for a log).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from typing import Any, Final

from ..events import Event, Op, SessionInfo, UploadState
from ..sftp.constants import status_name

MAX_LINE: Final = 64 * 1024  # the largest real line (two 4 KiB paths + message) is ~10 KiB
MAX_SEQ: Final = 2**53
MAX_PATH: Final = 4096  # PATH_MAX
MAX_MESSAGE: Final = 2048
MAX_TEXT: Final = 256  # addresses, versions, attribute strings
MAX_ATTRS: Final = 16  # keys in ``attrs``; also the length of a list value
MAX_TIME: Final = 2.0**34  # seconds since 1970: the year 2514
MAX_BYTES: Final = 2**63 - 1  # SQLite's INTEGER
MAX_DURATION: Final = 1e7  # seconds: four months
# What a tap emits: never a failed login (sshd saw that) nor a pipeline outcome.
TAP_OPS: Final = frozenset(Op) - {Op.LOGIN_FAILED, Op.CONVERTED, Op.REJECTED}
_STATUSES: Final = frozenset(status_name(code) for code in range(64))
_STATUS_CODE = re.compile(r"status_[0-9]{1,10}")  # status_name of an unknown code
_SESSION_ID = re.compile(r"[0-9A-Za-z_.-]{1,64}")

_EVENT_FIELDS = tuple(f.name for f in dataclass_fields(Event))
# Not ``node``: the daemon that takes the line names its own node; the tap runs as the user.
_SESSION_FIELDS = tuple(f.name for f in dataclass_fields(SessionInfo) if f.name != "node")


class SchemaError(ValueError):
    """A line the daemon refuses. ``seq`` is the line's number when it had a valid one."""

    def __init__(self, why: str, seq: int | None = None) -> None:
        super().__init__(why)
        self.seq = seq


def event_to_dict(event: Event, key: str | None = None) -> dict[str, Any]:
    """The event as JSON-ready data (``key`` replaces the event's own if given).

    What ``dataclasses.asdict`` gives, without its deep copies: the tap encodes
    every event at once, and asdict was half of its parsing time.
    """
    data = {name: getattr(event, name) for name in _EVENT_FIELDS}
    data["session"] = {name: getattr(event.session, name) for name in _SESSION_FIELDS}
    data["op"] = event.op.value
    data["upload"] = event.upload.value if event.upload else None
    if key is not None:
        data["key"] = key
    return data


# -- field checks: each returns the typed value or raises SchemaError naming ``where``

Check = Callable[[str, Any], Any]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _optional(check: Check) -> Check:
    def optional(where: str, value: Any) -> Any:
        return None if value is None else check(where, value)

    return optional


def _integer(low: int, high: int) -> Check:
    def integer(where: str, value: Any) -> int:
        if type(value) is not int:  # bool is an int subclass; JSON true is no number
            raise SchemaError(f"{where}: must be an integer, got {_kind(value)}")
        if not low <= value <= high:
            raise SchemaError(f"{where}: out of range {low}..{high}")
        return value

    return integer


def _number(low: float, high: float) -> Check:
    def number(where: str, value: Any) -> float:
        if type(value) not in (int, float):
            raise SchemaError(f"{where}: must be a number, got {_kind(value)}")
        if not (math.isfinite(value) and low <= value <= high):
            raise SchemaError(f"{where}: out of range {low:g}..{high:g}")
        return float(value)

    return number


def _text(limit: int, pattern: re.Pattern[str] | None = None) -> Check:
    def text(where: str, value: Any) -> str:
        if type(value) is not str:
            raise SchemaError(f"{where}: must be a string, got {_kind(value)}")
        if len(value) > limit:
            raise SchemaError(f"{where}: longer than {limit} characters")
        if "\0" in value:
            raise SchemaError(f"{where}: contains NUL")
        try:
            value.encode()  # a lone surrogate ("\ud800") is valid JSON, not UTF-8
        except UnicodeEncodeError:
            raise SchemaError(f"{where}: not valid Unicode") from None
        if pattern is not None and not pattern.fullmatch(value):
            raise SchemaError(f"{where}: not of the form {pattern.pattern}")
        return value

    return text


def _enum(choices: frozenset[str]) -> Check:
    def enum(where: str, value: Any) -> str:
        if type(value) is not str or value not in choices:
            raise SchemaError(f"{where}: not one of the known values")
        return value

    return enum


def _status(where: str, value: Any) -> str:
    if type(value) is not str or not (value in _STATUSES or _STATUS_CODE.fullmatch(value)):
        raise SchemaError(f"{where}: not an SFTP status name")
    return value


_scalar_text = _text(MAX_TEXT)


def _scalar(where: str, value: Any) -> Any:
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        return _integer(-(2**63), 2**63 - 1)(where, value)
    if type(value) is float:
        return _number(-math.inf, math.inf)(where, value)
    return _scalar_text(where, value)


def _attrs(where: str, value: Any) -> dict[str, Any]:
    """A small flat mapping: scalars or short lists of scalars (what the tap journals)."""
    if type(value) is not dict:
        raise SchemaError(f"{where}: must be an object, got {_kind(value)}")
    if len(value) > MAX_ATTRS:
        raise SchemaError(f"{where}: more than {MAX_ATTRS} keys")
    out: dict[str, Any] = {}
    for key, item in value.items():
        _text(32)(f"{where} key", key)
        if type(item) is list:
            if len(item) > MAX_ATTRS:
                raise SchemaError(f"{where}.{key}: more than {MAX_ATTRS} items")
            out[key] = [_scalar(f"{where}.{key}[]", x) for x in item]
        else:
            out[key] = _scalar(f"{where}.{key}", item)
    return out


def _object(spec: dict[str, Check], where: str, value: Any) -> dict[str, Any]:
    """Every field of ``spec``, each checked; no other field."""
    if type(value) is not dict:
        raise SchemaError(f"{where}: must be an object, got {_kind(value)}")
    unknown = len(value.keys() - spec.keys())
    if unknown:
        raise SchemaError(f"{where}: {unknown} unknown field(s)")
    missing = sorted(spec.keys() - value.keys())
    if missing:
        raise SchemaError(f"{where}.{missing[0]}: missing")
    return {name: check(f"{where}.{name}", value[name]) for name, check in spec.items()}


_SESSION: Final[dict[str, Check]] = {
    "id": _text(64, _SESSION_ID),
    "remote_addr": _text(MAX_TEXT),
    "remote_port": _integer(0, 65535),
    "login": _optional(_text(32)),
    "client_version": _optional(_text(MAX_TEXT)),
    "auth_method": _optional(_text(32)),
    "started_at": _number(0, MAX_TIME),
}

_CHECKS: Final[dict[str, Check]] = {
    "op": _enum(frozenset(op.value for op in TAP_OPS)),
    "session": lambda where, value: SessionInfo(**_object(_SESSION, where, value)),
    "time": _number(0, MAX_TIME),
    "path": _optional(_text(MAX_PATH)),
    "path2": _optional(_text(MAX_PATH)),
    "flags": _optional(_integer(0, 2**32 - 1)),
    "mode": _optional(_integer(0, 0o7777)),
    "attrs": _optional(_attrs),
    "bytes_read": _optional(_integer(0, MAX_BYTES)),
    "bytes_written": _optional(_integer(0, MAX_BYTES)),
    "duration": _optional(_number(0, MAX_DURATION)),
    "status": _status,
    "message": _optional(_text(MAX_MESSAGE)),
    "upload": _optional(_enum(frozenset(state.value for state in UploadState))),
    "key": _optional(_text(128)),
    # The uploaded file's identity, as the tap saw it: a lie only makes the
    # pipeline refuse the upload (it opens the file as the user and compares).
    "device": _optional(_integer(0, 2**64 - 1)),
    "inode": _optional(_integer(0, 2**64 - 1)),
}
# Every field of Event, each checked: a new field without a check fails here, at import.
_EVENT: Final[dict[str, Check]] = {name: _CHECKS[name] for name in _EVENT_FIELDS}
assert _SESSION.keys() == set(_SESSION_FIELDS)


def event_from_dict(data: Any) -> Event:
    """The event ``data`` describes, every field checked; raises :class:`SchemaError`."""
    fields = _object(_EVENT, "event", data)
    fields["op"] = Op(fields["op"])
    fields["upload"] = UploadState(fields["upload"]) if fields["upload"] else None
    return Event(**fields)


def encode_line(seq: int, event: Event) -> bytes:
    """Event ``seq`` of a tap's stream, stamped with its de-duplication key."""
    data = event_to_dict(event, key=f"{event.session.id}#{seq}")
    return json.dumps({"seq": seq, "event": data}).encode() + b"\n"


def _no_constant(name: str) -> Any:
    raise SchemaError(f"{name} is not a number")


def decode_line(line: bytes) -> tuple[int, Event]:
    """Parse one line from a tap into ``(seq, event)``; raises :class:`SchemaError`.

    The error's ``seq`` is set when the line had a valid one, so the refusal
    can be acknowledged (it is journaled; a resend would only be refused again).
    """
    if len(line) > MAX_LINE:
        raise SchemaError(f"line longer than {MAX_LINE} bytes")
    try:
        data = json.loads(line, parse_constant=_no_constant)
    except SchemaError:
        raise
    except UnicodeDecodeError:
        raise SchemaError("not UTF-8") from None
    except (ValueError, RecursionError):  # RecursionError: "[[[[...": nested too deep
        raise SchemaError("not a JSON value") from None
    if type(data) is not dict:
        raise SchemaError(f"line: must be an object, got {_kind(data)}")
    seq = data.get("seq")
    seq = seq if type(seq) is int and 1 <= seq <= MAX_SEQ else None
    try:
        if seq is None:
            raise SchemaError("line.seq: missing, or not an integer in 1..2^53")
        if data.keys() != {"seq", "event"}:
            raise SchemaError("line: must hold exactly seq and event")
        return seq, event_from_dict(data["event"])
    except SchemaError as exc:
        exc.seq = seq
        raise
    except RecursionError:
        raise SchemaError("nested too deep", seq) from None


def ack_line(seq: int) -> bytes:
    """``{"ack": seq}`` as one line: what json.dumps gives, without it (one per event)."""
    return b'{"ack": %d}\n' % seq
