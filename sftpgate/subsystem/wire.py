"""Events between ``sftpgate subsystem`` and the daemon: one JSON object a line. Pure.

The tap sends ``{"seq": N, "event": {...}}``; the daemon answers ``{"ack": N}``
once event N is committed. Events the tap could not get acknowledged go to a
spool file, replayed by the daemon later; ``key`` (session id + seq) lets the
journal drop an event it already has, so a lost ack never means a duplicate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

from ..events import Event, Op, SessionInfo, UploadState

MAX_LINE = 1 << 20  # an event line is small; anything bigger is garbage


def event_to_dict(event: Event) -> dict[str, Any]:
    data = asdict(event)
    data["op"] = event.op.value
    data["upload"] = event.upload.value if event.upload else None
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
    return json.dumps({"seq": seq, "event": event_to_dict(event)}).encode() + b"\n"


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
    return json.dumps({"ack": seq}).encode() + b"\n"


def with_key(event: Event, seq: int) -> Event:
    """The event stamped with its de-duplication key."""
    return replace(event, key=f"{event.session.id}#{seq}")
