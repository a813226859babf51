"""Job states and the job record. Pure data."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import Enum
from typing import Any


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a permanent failure: retrying would not help
    DEAD = "dead"  # out of attempts; an admin can `sftpgate jobs retry`
    CANCELLED = "cancelled"


class EmailState(str, Enum):
    NONE = "none"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    # Found in `sending` after a crash: it may or may not have gone out, and
    # sending again could duplicate it, so it is flagged instead.
    UNCERTAIN = "uncertain"
    # Over the user's email rate limit: told in the next digest (then `sending`, `sent`).
    DIGEST = "digest"
    # No email for this job: a duplicate, or a refusal the user was already told of.
    SKIPPED = "skipped"


class Outcome(str, Enum):
    CONVERTED = "converted"
    REJECTED = "rejected"
    # The same content as an earlier upload of the user's, within jobs.dedupe_window.
    DUPLICATE = "duplicate"
    # Over jobs.per_user_queue: recorded, journaled, not converted.
    REFUSED = "refused"


ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    upload_id: int | None
    session_id: str
    login: str
    path: str
    state: JobState
    outcome: str | None
    step: str | None
    progress: float
    attempts: int
    max_attempts: int
    next_run_at: float
    lease_owner: str | None
    lease_expires_at: float | None
    pid: int | None
    pid_marker: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    last_error: str | None
    email_state: EmailState
    steps: dict[str, Any]
    data: dict[str, Any]
    node: str | None = None  # the host of the session that uploaded it (schema 5)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["state"] = JobState(values["state"])
        values["email_state"] = EmailState(values["email_state"])
        values["steps"] = json.loads(values["steps"] or "{}")
        values["data"] = json.loads(values["data"] or "{}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["state"] = self.state.value
        out["email_state"] = self.email_state.value
        return out

    def done(self, step: str) -> bool:
        """True if ``step`` finished in an earlier attempt (its marker is set)."""
        return bool(self.steps.get(step, {}).get("finished"))
