"""Job rows in the journal database: enqueue, lease, heartbeat, finish, retry.

Blocking calls on one connection: the worker pool runs them on its own
single thread (``JobStore.executor``), the CLI calls them directly. Leasing is
``BEGIN IMMEDIATE`` + ``UPDATE ... RETURNING``, so two workers never take the
same job.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, SftpgateError
from ..events import Event, Op
from ..journal.store import connect
from .model import ACTIVE, EmailState, Job, JobState


def enqueue(
    conn: sqlite3.Connection, upload_id: int, path: str, event: Event, max_attempts: int
) -> int:
    """Insert a queued job for an upload, inside the caller's transaction.

    Where the event names the uploaded file (``device``, ``inode``), the job's
    data holds them: the pipeline converts that file and refuses any other
    that later takes its name.
    """
    now = time.time()
    data: dict[str, Any] = {}
    if event.device is not None and event.inode is not None:
        data = {"device": event.device, "inode": event.inode}
    cursor = conn.execute(
        "INSERT INTO jobs (upload_id, session_id, login, path, state, max_attempts, next_run_at,"
        " created_at, updated_at, data) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
        (
            upload_id,
            event.session.id,
            event.session.login or "",
            path,
            max_attempts,
            now,
            now,
            now,
            json.dumps(data),
        ),
    )
    return int(cursor.lastrowid or 0)


class JobStore:
    """All job-row changes. Methods taking ``owner`` only act while that owner holds the lease."""

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self.conn = connect(path, synchronous=synchronous)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="jobs-db")

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _one(self, sql: str, params: tuple[Any, ...]) -> Job | None:
        with self._tx() as conn:
            row = conn.execute(sql, params).fetchone()
        return Job.from_row(row) if row else None

    # -- workers -------------------------------------------------------------

    def lease(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the next due job (or one whose lease expired) for ``owner``."""
        now = time.time()
        return self._one(
            "UPDATE jobs SET state = 'running', lease_owner = ?, lease_expires_at = ?,"
            " attempts = attempts + 1, started_at = COALESCE(started_at, ?), updated_at = ?,"
            " pid = NULL, pid_marker = NULL"
            " WHERE id = (SELECT id FROM jobs WHERE (state = 'queued' AND next_run_at <= ?)"
            "   OR (state = 'running' AND lease_expires_at < ?) ORDER BY next_run_at, id LIMIT 1)"
            " RETURNING *",
            (owner, now + lease_seconds, now, now, now, now),
        )

    def heartbeat(
        self,
        job_id: int,
        owner: str,
        lease_seconds: float,
        *,
        progress: float | None = None,
        step: str | None = None,
    ) -> bool:
        """Extend the lease; False if it was lost (cancelled, or taken over)."""
        now = time.time()
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ?,"
                " progress = COALESCE(?, progress), step = COALESCE(?, step)"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (now + lease_seconds, now, progress, step, job_id, owner),
            )
            return cursor.rowcount == 1

    def set_pid(self, job_id: int, owner: str, pid: int | None, marker: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET pid = ?, pid_marker = ? WHERE id = ? AND lease_owner = ?",
                (pid, marker, job_id, owner),
            )

    def mark_step(
        self,
        job_id: int,
        owner: str,
        step: str,
        *,
        finished: bool = False,
        error: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> Job:
        """Record a step starting or finishing (its marker), and merge ``data`` into the job."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT steps, data FROM jobs WHERE id = ? AND lease_owner = ?", (job_id, owner)
            ).fetchone()
            if row is None:
                raise SftpgateError(f"job {job_id}: lease lost")
            steps = json.loads(row["steps"])
            entry = steps.setdefault(step, {})
            if finished:
                entry["finished"] = now
                entry.pop("error", None)
            elif error is not None:
                entry["error"] = error
                entry["failed_at"] = now
            else:
                entry["started"] = now
            merged = json.loads(row["data"])
            merged.update(data or {})
            result = conn.execute(
                "UPDATE jobs SET steps = ?, data = ?, step = ?, updated_at = ? WHERE id = ?"
                " RETURNING *",
                (json.dumps(steps), json.dumps(merged), step, now, job_id),
            ).fetchone()
        return Job.from_row(result)

    def set_email_state(
        self, job_id: int, owner: str, state: EmailState, error: str | None = None
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET email_state = ?, last_error = COALESCE(?, last_error),"
                " updated_at = ? WHERE id = ? AND lease_owner = ?",
                (state.value, error, time.time(), job_id, owner),
            )

    def finish(
        self,
        job: Job,
        owner: str,
        state: JobState,
        *,
        outcome: str | None = None,
        error: str | None = None,
        journal: tuple[Op, str | None, str, str | None] | None = None,
    ) -> None:
        """End a job; ``journal`` = (op, output path, status, message) for the operations table."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, outcome = COALESCE(?, outcome), last_error = ?,"
                " finished_at = ?, updated_at = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " pid = NULL, progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END,"
                " step = CASE WHEN ? = 'succeeded' THEN 'done' ELSE step END"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (state.value, outcome, error, now, now, state.value, state.value, job.id, owner),
            )
            if journal is not None:
                op, path2, status, message = journal
                conn.execute(
                    "INSERT INTO operations (ts, session_id, login, op, path, path2, status,"
                    " message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, job.session_id, job.login, op.value, job.path, path2, status, message),
                )

    def retry_later(self, job: Job, owner: str, error: str, backoff: float) -> JobState:
        """Requeue after ``backoff`` seconds, or mark dead when out of attempts."""
        dead = job.attempts >= job.max_attempts
        state = JobState.DEAD if dead else JobState.QUEUED
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, last_error = ?, next_run_at = ?, updated_at = ?,"
                " finished_at = CASE WHEN ? THEN ? ELSE NULL END, lease_owner = NULL,"
                " lease_expires_at = NULL, pid = NULL"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (state.value, error, now + backoff, now, dead, now, job.id, owner),
            )
        return state

    def release(self, job: Job, owner: str) -> None:
        """Give a job back at shutdown: queued, and this attempt does not count."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(0, attempts - 1),"
                " next_run_at = ?, updated_at = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " pid = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (now, now, job.id, owner),
            )

    def requeue_orphans(self) -> list[Job]:
        """At start-up: every `running` job lost its worker; requeue them and return them."""
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute(
                "UPDATE jobs SET state = 'queued', next_run_at = ?, updated_at = ?,"
                " lease_owner = NULL, lease_expires_at = NULL WHERE state = 'running' RETURNING *",
                (now, now),
            ).fetchall()
        return [Job.from_row(row) for row in rows]

    def clear_pid(self, job_id: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET pid = NULL, pid_marker = NULL WHERE id = ?", (job_id,))

    # -- admins ----------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id}")
        return Job.from_row(row)

    def list(
        self, *, states: tuple[str, ...] = (), login: str | None = None, limit: int = 100
    ) -> list[Job]:
        sql, params = "SELECT * FROM jobs", []
        where = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params += list(states)
        if login:
            where.append("login = ?")
            params.append(login)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.conn.execute(
            f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id",  # noqa: S608
            (*params, limit),
        ).fetchall()
        return [Job.from_row(row) for row in rows]

    def retry(self, job_id: int) -> Job:
        """Queue a failed, dead or cancelled job again (finished steps are not redone)."""
        job = self.get(job_id)
        if job.state.value in ACTIVE or job.state is JobState.SUCCEEDED:
            raise SftpgateError(
                f"job {job_id} is {job.state.value}; only failed, dead or "
                "cancelled jobs can be retried"
            )
        now = time.time()
        found = self._one(
            "UPDATE jobs SET state = 'queued', attempts = 0, next_run_at = ?, updated_at = ?,"
            " finished_at = NULL, email_state = CASE WHEN email_state IN ('failed', 'uncertain')"
            " THEN 'none' ELSE email_state END WHERE id = ? RETURNING *",
            (now, now, job_id),
        )
        assert found is not None
        return found

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued or running job (a running one stops at its next heartbeat)."""
        job = self.get(job_id)
        if job.state.value not in ACTIVE:
            raise SftpgateError(f"job {job_id} is {job.state.value}; nothing to cancel")
        now = time.time()
        found = self._one(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?,"
            " last_error = COALESCE(last_error, 'cancelled by an admin') WHERE id = ? RETURNING *",
            (now, now, job_id),
        )
        assert found is not None
        return found
