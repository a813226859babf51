"""The admin API's one table of routes, and the JSON schemas of what they take and return.

``server.py`` dispatches from :data:`ROUTES` (handlers found by name) and ``openapi.py``
renders the same table as ``/openapi.json``: a route, its parameters, its role and its
response shape are written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..events import Op
from ..jobs.model import JobState

MAX_ID = 2**63 - 1
MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter. ``many``: repeatable (and comma-separated)."""

    name: str
    doc: str
    type: str = "string"  # string | integer | boolean
    where: str = "query"
    many: bool = False
    enum: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    max_length: int = 256
    pattern: str | None = None  # a string must match it whole

    def schema(self) -> dict[str, Any]:
        one: dict[str, Any] = {"type": self.type}
        if self.enum:
            one["enum"] = list(self.enum)
        if self.minimum is not None:
            one["minimum"] = self.minimum
        if self.maximum is not None:
            one["maximum"] = self.maximum
        if self.type == "string" and not self.enum:
            one["maxLength"] = self.max_length
            if self.where == "path":
                one["minLength"] = 1
            if self.pattern is not None:
                one["pattern"] = f"^{self.pattern}$"
        return {"type": "array", "items": one} if self.many else one


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint. ``role``: the least token role it needs (None: no token needed)."""

    method: str
    path: str
    handler: str
    summary: str
    response: str  # a schema name in SCHEMAS
    role: str | None = "read"
    params: tuple[Param, ...] = ()
    body: str | None = None  # a schema name in SCHEMAS
    status: int = 200
    errors: tuple[int, ...] = (400,)
    stream: bool = False  # newline-delimited JSON, one `response` object a line


JOB_ID = Param("id", "a job id", "integer", "path", minimum=1, maximum=MAX_ID)
UPLOAD_ID = Param(
    "id", "an upload id (the `uploads` row)", "integer", "path", minimum=1, maximum=MAX_ID
)
JOURNAL_FILTERS = (
    Param("node", "only sessions on this host"),
    Param("user", "only this login"),
    Param("since", "from this time: 15m, 2h, 1d, 1w ago, or ISO 8601 (2026-11-23T10:00Z)"),
    Param("until", "before this time (same forms as since)"),
    Param("op", "only these operations", many=True, enum=tuple(op.value for op in Op)),
    Param("path", "path or rename target matches this glob (* crosses /)", max_length=4096),
    Param("session", "only this session id"),
    Param("failed", "only operations that failed", "boolean"),
    Param(
        "transfers", "only file transfers (closes that moved bytes), with upload_state", "boolean"
    ),
    Param(
        "cursor",
        "where the previous page (or follow) ended: the `cursor` it returned (opaque)",
        max_length=20,
        pattern="[0-9]{1,19}",
    ),
)

_NULLABLE_STRING = {"type": "string", "nullable": True}
_NULLABLE_INT = {"type": "integer", "nullable": True}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}


def _object(required: tuple[str, ...], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


def _list_of(name: str, item: str) -> dict[str, Any]:
    return _object(
        (name,), **{name: {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}}}
    )


SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object(("error",), error={"type": "string"}),
    # A row of `sftpgate journal --json`.
    "JournalRow": _object(
        ("id", "ts", "time", "session_id", "op", "status"),
        id={"type": "integer"},
        ts={"type": "number"},
        time={"type": "string"},
        session_id={"type": "string"},
        login=_NULLABLE_STRING,
        remote_addr=_NULLABLE_STRING,
        op={"type": "string"},
        path=_NULLABLE_STRING,
        path2=_NULLABLE_STRING,
        flags=_NULLABLE_INT,
        mode=_NULLABLE_INT,
        attrs={"nullable": True},
        bytes_read=_NULLABLE_INT,
        bytes_written=_NULLABLE_INT,
        duration_ms=_NULLABLE_NUMBER,
        status={"type": "string"},
        message=_NULLABLE_STRING,
        remote_port=_NULLABLE_INT,
        client_version=_NULLABLE_STRING,
        auth_method=_NULLABLE_STRING,
        node=_NULLABLE_STRING,
        upload_state=_NULLABLE_STRING,
    ),
    "JournalPage": _object(
        ("rows", "cursor", "more"),
        rows={"type": "array", "items": {"$ref": "#/components/schemas/JournalRow"}},
        cursor={
            "type": "string",
            "nullable": True,
            "description": "pass as `cursor` for the next page (null: no journal yet)",
        },
        more={"type": "boolean", "description": "more rows match beyond this page now"},
    ),
    "Session": _object(
        ("id", "result", "started_at"),
        id={"type": "string"},
        login=_NULLABLE_STRING,
        remote_addr=_NULLABLE_STRING,
        remote_port=_NULLABLE_INT,
        client_version=_NULLABLE_STRING,
        auth_method=_NULLABLE_STRING,
        result={"type": "string"},
        node=_NULLABLE_STRING,
        started_at={"type": "number"},
        ended_at=_NULLABLE_NUMBER,
        disconnect_requested_at=_NULLABLE_NUMBER,
    ),
    "Sessions": _list_of("sessions", "Session"),
    # `sftpgate jobs --json`.
    "Job": _object(
        ("id", "login", "path", "state", "attempts", "max_attempts", "created_at"),
        id={"type": "integer"},
        upload_id=_NULLABLE_INT,
        session_id={"type": "string"},
        login={"type": "string"},
        path={"type": "string"},
        state={"type": "string", "enum": [s.value for s in JobState]},
        outcome=_NULLABLE_STRING,
        step=_NULLABLE_STRING,
        progress={"type": "number"},
        attempts={"type": "integer"},
        max_attempts={"type": "integer"},
        next_run_at={"type": "number"},
        lease_owner=_NULLABLE_STRING,
        lease_expires_at=_NULLABLE_NUMBER,
        pid=_NULLABLE_INT,
        pid_marker=_NULLABLE_STRING,
        created_at={"type": "number"},
        updated_at={"type": "number"},
        started_at=_NULLABLE_NUMBER,
        finished_at=_NULLABLE_NUMBER,
        last_error=_NULLABLE_STRING,
        email_state={"type": "string"},
        steps={"type": "object"},
        data={"type": "object"},
        node=_NULLABLE_STRING,
    ),
    "Jobs": _list_of("jobs", "Job"),
    # `sftpgate users list --json`.
    "User": _object(
        ("login", "name", "surname", "email", "home", "auth"),
        login={"type": "string"},
        name={"type": "string"},
        surname={"type": "string"},
        email={"type": "string"},
        home={"type": "string"},
        auth={"type": "string", "description": "password, publickey, both (+) or empty"},
    ),
    "Users": _list_of("users", "User"),
    "Reloaded": _object(
        ("reloaded", "users"), reloaded={"type": "boolean"}, users={"type": "integer"}
    ),
    # `sftpgate bans list --json`.
    "Ban": _object(
        ("address", "until", "strikes", "reason", "created_at", "active"),
        address={"type": "string"},
        until={"type": "number"},
        strikes={"type": "integer"},
        reason={"type": "string"},
        created_at={"type": "number"},
        active={"type": "boolean"},
    ),
    "Bans": _list_of("bans", "Ban"),
    "BanRequest": {
        "type": "object",
        "required": ["address"],
        "additionalProperties": False,
        "properties": {
            "address": {"type": "string", "maxLength": 64, "description": "IPv4 or IPv6 (its /64)"},
            "seconds": {
                "type": "number",
                "exclusiveMinimum": True,
                "minimum": 0,
                "maximum": 10**9,
                "description": "default: defender.ban_time",
            },
            "reason": {"type": "string", "maxLength": 256},
        },
    },
    "Lifted": _object(
        ("address", "lifted"), address={"type": "string"}, lifted={"type": "boolean"}
    ),
}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/openapi.json",
        "openapi",
        "This document (no token needed: it describes the API, and holds no data).",
        "OpenAPI",
        role=None,
        errors=(),
    ),
    Route(
        "GET",
        "/v1/journal",
        "journal",
        "Journal rows matching the filters, oldest first, one page (the CLI's filters).",
        "JournalPage",
        params=(
            *JOURNAL_FILTERS,
            Param("limit", "rows per page (default 100)", "integer", minimum=1, maximum=MAX_LIMIT),
        ),
        errors=(400, 503),
    ),
    Route(
        "GET",
        "/v1/journal/follow",
        "follow",
        "New journal rows as they commit, one JSON object a line; ends when the server drains."
        " Without `cursor`, from now on.",
        "JournalRow",
        params=JOURNAL_FILTERS,
        stream=True,
        errors=(400, 503),
    ),
    Route(
        "GET",
        "/v1/sessions",
        "sessions",
        "Live sessions on every gateway process and node.",
        "Sessions",
        params=(Param("node", "only this host"), Param("user", "only this login")),
        errors=(400, 503),
    ),
    Route(
        "POST",
        "/v1/sessions/{id}/disconnect",
        "disconnect",
        "End a live session, on whichever process or node holds it (within "
        "api.disconnect_poll seconds); journaled on the session.",
        "Session",
        role="admin",
        params=(Param("id", "a session id", where="path", max_length=128),),
        status=202,
        errors=(400, 404, 503),
    ),
    Route(
        "GET",
        "/v1/jobs",
        "jobs",
        "The newest jobs matching, oldest first.",
        "Jobs",
        params=(
            Param(
                "state",
                "only jobs in these states",
                many=True,
                enum=tuple(s.value for s in JobState),
            ),
            Param("user", "only this login's jobs"),
            Param("limit", "the newest N (default 100)", "integer", minimum=1, maximum=MAX_LIMIT),
        ),
        errors=(400, 503),
    ),
    Route(
        "GET", "/v1/jobs/{id}", "job", "One job.", "Job", params=(JOB_ID,), errors=(400, 404, 503)
    ),
    Route(
        "POST",
        "/v1/jobs/{id}/retry",
        "retry",
        "Queue a failed, dead or cancelled job again.",
        "Job",
        role="admin",
        params=(JOB_ID,),
        errors=(400, 404, 409, 503),
    ),
    Route(
        "POST",
        "/v1/jobs/{id}/cancel",
        "cancel",
        "Cancel a queued or running job.",
        "Job",
        role="admin",
        params=(JOB_ID,),
        errors=(400, 404, 409, 503),
    ),
    Route(
        "POST",
        "/v1/uploads/{id}/replay",
        "replay",
        "Queue a new job for a complete upload whose file is still the one uploaded.",
        "Job",
        role="admin",
        params=(UPLOAD_ID,),
        status=201,
        errors=(400, 404, 409, 503),
    ),
    Route("GET", "/v1/users", "users", "The users of the running config.", "Users", errors=(400,)),
    Route(
        "POST",
        "/v1/users/reload",
        "reload",
        "Re-read config.yaml as SIGHUP does (every gateway process).",
        "Reloaded",
        role="admin",
        errors=(400, 422),
    ),
    Route(
        "GET",
        "/v1/bans",
        "bans",
        "Bans in force (with all=true, also those ended within a day).",
        "Bans",
        params=(Param("all", "also ended bans", "boolean"),),
        errors=(400, 503),
    ),
    Route(
        "POST",
        "/v1/bans",
        "ban",
        "Ban an address (every gateway takes it within defender.reload_interval).",
        "Ban",
        role="admin",
        body="BanRequest",
        status=201,
        errors=(400, 413, 503),
    ),
    Route(
        "DELETE",
        "/v1/bans/{address}",
        "unban",
        "Lift the ban of an address.",
        "Lifted",
        role="admin",
        params=(Param("address", "an IPv4 or IPv6 address", where="path", max_length=64),),
        errors=(400, 404, 503),
    ),
)
