"""Events between ``sftpgate subsystem`` and the daemon: one JSON object a line. Pure.

The tap sends ``{"seq": N, "event": {...}}``; the daemon answers ``{"ack": N}``
once event N is committed. Events the tap could not get acknowledged go to a
spool file, replayed by the daemon later; ``key`` (session id + seq) lets the
journal drop an event it already has, so a lost ack never means a duplicate.
"""

from __future__ import annotations

import json
from dataclasses import fields as dataclass_fields
from typing import Any

from ..events import Event, Op, SessionInfo, UploadState

MAX_LINE = 1 << 20  # an event line is small; anything bigger is garbage
_EVENT_FIELDS = tuple(f.name for f in dataclass_fields(Event))
_SESSION_FIELDS = tuple(f.name for f in dataclass_fields(SessionInfo))


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


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event; raises ValueError/TypeError/KeyError for anything malformed."""
    fields = dict(data)
    session = SessionInfo(**fields.pop("session"))
    fields["op"] = Op(fields["op"])
    fields["upload"] = UploadState(fields["upload"]) if fields.get("upload") else None
    event = Event(session=session, **fields)
    if not isinstance(event.session.id, str) or not isinstance(event.time, int | float):
        raise ValueError("malformed event")
    return event


def encode_line(seq: int, event: Event) -> bytes:
    """Event ``seq`` of a tap's stream, stamped with its de-duplication key."""
    data = event_to_dict(event, key=f"{event.session.id}#{seq}")
    return json.dumps({"seq": seq, "event": data}).encode() + b"\n"


def decode_line(line: bytes) -> tuple[int, Event]:
    """Parse one line from a tap; raises ValueError for anything malformed."""
    if len(line) > MAX_LINE:
        raise ValueError("line too long")
    try:
        data = json.loads(line)
        return int(data["seq"]), event_from_dict(data["event"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed event line: {exc}") from None


def ack_line(seq: int) -> bytes:
    """``{"ack": seq}`` as one line: what json.dumps gives, without it (one per event)."""
    return b'{"ack": %d}\n' % seq
