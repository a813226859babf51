"""Job rows in the journal database: enqueue, lease, heartbeat, finish, retry.

Blocking calls on one connection: the worker pool runs them on its own
single thread (``JobStore.executor``), the CLI calls them directly. Leasing is
``BEGIN IMMEDIATE`` + ``UPDATE ... RETURNING``, so two workers never take the
same job. A running job is taken over only once its lease expired (a worker
proven dead on this host has its leases expired at once: ``reap_workers``);
every commit of a step checks the lease owner, the lease's fencing token
(jobs/registry.py), and raises :class:`LeaseLost` where it is someone else's.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, SftpgateError
from ..events import Event, Op
from ..journal.store import connect
from ..storage.ports import LeaseLost as PortLeaseLost
from ..storage.ports import QueueStats
from . import registry
from .model import ACTIVE, EmailState, Job, JobState, Outcome

# The scheduling port's one class (every backend raises it): imported here for the worker.
LeaseLost = PortLeaseLost


def enqueue(
    conn: sqlite3.Connection,
    upload_id: int,
    path: str,
    event: Event,
    max_attempts: int,
    queue_cap: int | None = None,
) -> int:
    """Insert a queued job for an upload, inside the caller's transaction.

    Where the event names the uploaded file (``device``, ``inode``), the job's
    data holds them: the pipeline converts that file and refuses any other
    that later takes its name.

    When the user already has ``queue_cap`` queued or running jobs, the job is
    still written (nothing is lost silently) but as a refusal: outcome
    ``refused``, the reason in ``data["refused"]``. A worker then only tells
    the user, and only for the first refusal of a backlog (the others get
    email state ``skipped``), and ends it ``failed`` with the reason journaled.
    """
    now = time.time()
    login = event.session.login or ""
    data: dict[str, Any] = {}
    if event.device is not None and event.inode is not None:
        data = {"device": event.device, "inode": event.inode}
    outcome: str | None = None
    email_state = EmailState.NONE.value
    if queue_cap is not None:
        waiting = conn.execute(
            "SELECT count(*) FROM jobs WHERE login = ? AND state IN ('queued', 'running')"
            " AND outcome IS NULL",
            (login,),
        ).fetchone()[0]
        if waiting >= queue_cap:
            outcome = Outcome.REFUSED.value
            data["refused"] = (
                f"not converted: {waiting} of your uploads are already waiting (at most "
                f"{queue_cap}); upload it again once they are done"
            )
            if _told_of_backlog(conn, login):
                email_state = EmailState.SKIPPED.value
    cursor = conn.execute(
        "INSERT INTO jobs (upload_id, session_id, login, path, state, outcome, max_attempts,"
        " next_run_at, created_at, updated_at, email_state, data)"
        " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
        (
            upload_id,
            event.session.id,
            login,
            path,
            outcome,
            max_attempts,
            now,
            now,
            now,
            email_state,
            json.dumps(data),
        ),
    )
    return int(cursor.lastrowid or 0)


def _told_of_backlog(conn: sqlite3.Connection, login: str) -> bool:
    """Whether a refusal was recorded since the user's last accepted job (one notice a backlog)."""
    row = conn.execute(
        "SELECT 1 FROM jobs WHERE login = ? AND outcome = 'refused' AND id > COALESCE("
        " (SELECT max(id) FROM jobs WHERE login = ? AND (outcome IS NULL OR outcome != 'refused')),"
        " 0) LIMIT 1",
        (login, login),
    ).fetchone()
    return row is not None


def _due(t: str = "") -> str:
    """SQL: a job (of table alias ``t``) a worker may take now: due, or its lease expired
    with attempts left (one without is :meth:`JobStore.bury_abandoned`'s: never run again)."""
    p = f"{t}." if t else ""
    return (
        f"(({p}state = 'queued' AND {p}next_run_at <= :now)"
        f" OR ({p}state = 'running' AND {p}lease_expires_at < :now"
        f" AND {p}attempts < {p}max_attempts))"
    )


# SQL: a running job whose lease expired after its last attempt: its worker stopped (killed,
# out of memory, its host lost) without finishing it, every time it was given one.
ABANDONED = "state = 'running' AND lease_expires_at < {now} AND attempts >= max_attempts"


def abandoned_error(job: Job) -> str:
    """``last_error`` of a job buried by ``bury_abandoned`` (``job`` as it was found): how
    many attempts it had, where the last one ran (node and pid from its lease owner, a
    ``registry.owner_of`` name) and at which step, and an earlier failure's error, if
    any (then not every attempt was a stopped worker). Pure."""
    holder = registry.worker_of(job.lease_owner or "")
    parts = holder.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit():
        where = f"last on {parts[0]}, pid {parts[1]}"
    else:
        where = f"last held by {holder or 'nobody'}"
    at = f"{where}, at {job.step or 'its start'}"
    if job.last_error:  # an attempt failed too: not every one was a stopped worker
        text = (
            f"its worker stopped without finishing it on its last attempt ({job.attempts} of"
            f" {job.max_attempts}; {at}); not run again; before: {job.last_error}"
        )
    else:
        text = (
            f"its worker stopped without finishing it {job.attempts} times, out of"
            f" {job.max_attempts} attempts ({at}); not run again"
        )
    if job.email_state is EmailState.SENDING:
        text += "; its email may have gone out: not resent"
    return text


class JobStore:
    """All job-row changes. Methods taking ``owner`` only act while that owner holds the lease."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        node: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.clock = clock  # leases' time (tests pass their own)
        self.conn = connect(path, synchronous=synchronous)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="jobs-db")
        self.node = node or socket.gethostname()
        # The registered worker process this store serves (set by the WorkerPool): a digest
        # it claims names it, so only its death makes that digest `uncertain`.
        self.worker_id: str | None = None

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

    def lease(self, owner: str, lease_seconds: float, per_user: int | None = None) -> Job | None:
        """Take the next due job (or one whose lease expired) for ``owner``, fairly.

        Users take turns: of the users with a due job and fewer than
        ``per_user`` jobs running (no cap when None), the one whose job was
        taken longest ago (or never) goes first, and their oldest due job is
        taken. One user's backlog therefore never holds up another's upload.

        A job whose ``pid`` is set comes from a worker that died or stalled:
        its ffmpeg may still run (``data["ffmpeg"]`` says where, as a
        ``registry.Stamp``). The new holder kills it, then :meth:`clear_pid`.

        A running job whose lease expired after its last attempt is not taken
        (it would only stop its next worker too): :meth:`bury_abandoned` ends it.
        """
        now = self.clock()
        params: dict[str, Any] = {"now": now, "cap": per_user if per_user is not None else -1}
        with self._tx() as conn:
            pick = conn.execute(
                "SELECT j.login FROM jobs AS j LEFT JOIN job_turns AS t ON t.login = j.login"  # noqa: S608
                f" WHERE {_due('j')}"
                " GROUP BY j.login HAVING :cap < 0 OR (SELECT count(*) FROM jobs AS r"
                "   WHERE r.login = j.login AND r.state = 'running' AND r.lease_expires_at >= :now)"
                "   < :cap"
                " ORDER BY COALESCE(max(t.last_turn), 0), min(j.id) LIMIT 1",
                params,
            ).fetchone()
            if pick is None:
                return None
            row = conn.execute(
                "UPDATE jobs SET state = 'running', lease_owner = :owner,"  # noqa: S608
                " lease_expires_at = :until, attempts = attempts + 1,"
                " started_at = COALESCE(started_at, :now), updated_at = :now"
                f" WHERE id = (SELECT id FROM jobs WHERE login = :login AND {_due()}"
                "   ORDER BY next_run_at, id LIMIT 1)"
                " RETURNING *",
                {**params, "owner": owner, "until": now + lease_seconds, "login": pick[0]},
            ).fetchone()
            conn.execute(
                "INSERT INTO job_turns (login, last_turn) VALUES (?, ?)"
                " ON CONFLICT(login) DO UPDATE SET last_turn = excluded.last_turn",
                (pick[0], now),
            )
        return Job.from_row(row) if row else None

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
        now = self.clock()
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ?,"
                " progress = COALESCE(?, progress), step = COALESCE(?, step)"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (now + lease_seconds, now, progress, step, job_id, owner),
            )
            return cursor.rowcount == 1

    def set_pid(self, job_id: int, owner: str, pid: int | None, marker: str | None) -> None:
        """Record ffmpeg's pid (or its end: None), and where and when it started (its stamp).

        The stamp (node, boot, pid, start time from ``/proc``) lets whoever
        takes the job over kill exactly that process, never a recycled pid.
        """
        stamp = registry.stamp(pid, self.node) if pid is not None else None
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET pid = ?, pid_marker = ?, data = CASE WHEN ? IS NULL"
                " THEN json_remove(data, '$.ffmpeg') ELSE json_set(data, '$.ffmpeg', ?) END"
                " WHERE id = ? AND lease_owner = ?",
                (pid, marker, stamp and stamp.encode(), stamp and stamp.encode(), job_id, owner),
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
        now = self.clock()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT steps, data FROM jobs WHERE id = ? AND lease_owner = ?", (job_id, owner)
            ).fetchone()
            if row is None:
                raise LeaseLost(f"job {job_id}: lease lost")
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
        """Raises :class:`LeaseLost` when ``owner`` no longer holds the job."""
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET email_state = ?, last_error = COALESCE(?, last_error),"
                " updated_at = ? WHERE id = ? AND lease_owner = ?",
                (state.value, error, self.clock(), job_id, owner),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"job {job_id}: lease lost")

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
        """End a job; ``journal`` = (op, output path, status, message) for the operations table.

        Raises :class:`LeaseLost` (and journals nothing) when ``owner`` no
        longer holds the running job: another worker took it over, or an admin
        cancelled it.
        """
        now = self.clock()
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = ?, outcome = COALESCE(?, outcome), last_error = ?,"
                " finished_at = ?, updated_at = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " pid = NULL, progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END,"
                " step = CASE WHEN ? = 'succeeded' THEN 'done' ELSE step END"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (state.value, outcome, error, now, now, state.value, state.value, job.id, owner),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"job {job.id}: lease lost")
            if journal is not None:
                op, path2, status, message = journal
                conn.execute(
                    "INSERT INTO operations (ts, session_id, login, op, path, path2, status,"
                    " message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, job.session_id, job.login, op.value, job.path, path2, status, message),
                )

    def retry_later(self, job: Job, owner: str, error: str, backoff: float) -> JobState:
        """Requeue after ``backoff`` seconds, or mark dead when out of attempts.

        Raises :class:`LeaseLost` when ``owner`` no longer holds the running job.
        """
        dead = job.attempts >= job.max_attempts
        state = JobState.DEAD if dead else JobState.QUEUED
        now = self.clock()
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = ?, last_error = ?, next_run_at = ?, updated_at = ?,"
                " finished_at = CASE WHEN ? THEN ? ELSE NULL END, lease_owner = NULL,"
                " lease_expires_at = NULL, pid = NULL"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (state.value, error, now + backoff, now, dead, now, job.id, owner),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"job {job.id}: lease lost")
        return state

    # -- same content again --------------------------------------------------

    def claim_content(
        self, job: Job, owner: str, sha256: str, window: float, now: float
    ) -> Job | None:
        """Record ``job``'s content, or return the job that already converts it.

        In one transaction: an earlier job of the same user with the same
        sha256, created within ``window`` seconds of ``now`` and not failed,
        dead, cancelled, refused or itself a duplicate, is returned (``job``
        is then a duplicate of it); else ``sha256`` is stored on ``job`` and
        None returned. Two workers checking the same content one after the
        other thus find each other. Raises :class:`LeaseLost` when ``owner``
        no longer holds ``job``.
        """
        with self._tx() as conn:
            self._hold(conn, job.id, owner)
            row = conn.execute(
                "SELECT * FROM jobs WHERE login = ? AND id != ? AND created_at >= ?"
                " AND json_extract(data, '$.sha256') = ?"
                " AND state NOT IN ('failed', 'dead', 'cancelled')"
                " AND (outcome IS NULL OR outcome = 'converted') ORDER BY id LIMIT 1",
                (job.login, job.id, now - window, sha256),
            ).fetchone()
            if row is not None:
                return Job.from_row(row)
            conn.execute(
                "UPDATE jobs SET data = json_set(data, '$.sha256', ?), updated_at = ?"
                " WHERE id = ? AND lease_owner = ?",
                (sha256, self.clock(), job.id, owner),
            )
        return None

    # -- emails, rate-limited ------------------------------------------------

    def reserve_email(
        self, job: Job, owner: str, limit: int, window: float, now: float
    ) -> int | None:
        """Take one of the user's email slots for ``job``, or put it in their next digest.

        In one transaction: when fewer than ``limit`` emails went to the user
        in the ``window`` seconds before ``now`` and none of their notices is
        already waiting for a digest, an ``email_log`` row is written and the
        job set ``sending``; the row's id is returned. Otherwise the job is set
        ``digest`` and None returned. Raises :class:`LeaseLost` (and reserves
        nothing) when ``owner`` no longer holds ``job``: a worker whose job was
        taken over never sends its email.
        """
        with self._tx() as conn:
            self._hold(conn, job.id, owner)
            if (
                self._email_budget(conn, job.login, limit, window, now)
                and not conn.execute(
                    "SELECT 1 FROM jobs WHERE login = ? AND email_state = 'digest' LIMIT 1",
                    (job.login,),
                ).fetchone()
            ):
                log_id = conn.execute(
                    "INSERT INTO email_log (login, sent_at, kind, jobs) VALUES (?, ?, 'single', ?)",
                    (job.login, now, json.dumps([job.id])),
                ).lastrowid
                state = EmailState.SENDING
            else:
                log_id, state = None, EmailState.DIGEST
            conn.execute(
                "UPDATE jobs SET email_state = ?, updated_at = ? WHERE id = ? AND lease_owner = ?",
                (state.value, self.clock(), job.id, owner),
            )
        return int(log_id) if log_id is not None else None

    def unreserve_email(self, job: Job, owner: str, log_id: int, error: str) -> None:
        """The email was not accepted (a transient failure): free its slot, state ``none``."""
        with self._tx() as conn:
            conn.execute("DELETE FROM email_log WHERE id = ?", (log_id,))
            conn.execute(
                "UPDATE jobs SET email_state = 'none', last_error = ?, updated_at = ?"
                " WHERE id = ? AND lease_owner = ?",
                (error, self.clock(), job.id, owner),
            )

    @staticmethod
    def _hold(conn: sqlite3.Connection, job_id: int, owner: str) -> None:
        """Inside a transaction: raise :class:`LeaseLost` unless ``owner`` holds the running job."""
        row = conn.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (job_id, owner),
        ).fetchone()
        if row is None:
            raise LeaseLost(f"job {job_id}: lease lost")

    @staticmethod
    def _email_budget(
        conn: sqlite3.Connection, login: str, limit: int, window: float, now: float
    ) -> bool:
        sent = conn.execute(
            "SELECT count(*) FROM email_log WHERE login = ? AND sent_at > ?",
            (login, now - window),
        ).fetchone()[0]
        return bool(sent < limit)

    def digests_due(self, limit: int, window: float, now: float) -> list[str]:
        """Users with finished jobs waiting for a digest and an email slot free now."""
        rows = self.conn.execute(
            "SELECT DISTINCT login FROM jobs WHERE email_state = 'digest'"
            " AND state NOT IN ('queued', 'running') ORDER BY login"
        ).fetchall()
        return [row[0] for row in rows if self._email_budget(self.conn, row[0], limit, window, now)]

    def claim_digest(
        self, login: str, limit: int, window: float, now: float, most: int = 100
    ) -> tuple[int, list[Job]] | None:
        """Take the user's waiting notices (at most ``most``) for one digest, or None.

        In one transaction: the slot is checked again, an ``email_log`` row
        written and the jobs set ``sending``. A crash before
        :meth:`digest_sent` leaves them ``sending``; :meth:`recover_emails`
        then flags them ``uncertain`` and they are never sent twice.
        """
        with self._tx() as conn:
            if not self._email_budget(conn, login, limit, window, now):
                return None
            rows = conn.execute(
                "SELECT * FROM jobs WHERE login = ? AND email_state = 'digest'"
                " AND state NOT IN ('queued', 'running') ORDER BY id LIMIT ?",
                (login, most),
            ).fetchall()
            if not rows:
                return None
            jobs = [Job.from_row(row) for row in rows]
            ids = [job.id for job in jobs]
            log_id = conn.execute(
                "INSERT INTO email_log (login, sent_at, kind, jobs) VALUES (?, ?, 'digest', ?)",
                (login, now, json.dumps(ids)),
            ).lastrowid
            # The finished jobs name their sender while it sends, so that only its death
            # makes them `uncertain` (recover_emails).
            sender = registry.owner_of(self.worker_id, "digest") if self.worker_id else None
            conn.execute(
                "UPDATE jobs SET email_state = 'sending', lease_owner = ?"  # noqa: S608
                f" WHERE id IN ({','.join('?' * len(ids))})",
                (sender, *ids),
            )
        return int(log_id or 0), jobs

    def digest_sent(
        self, log_id: int, jobs: list[Job], state: EmailState, error: str | None
    ) -> None:
        """End a digest: ``sent`` or ``failed``; ``digest`` again (slot freed) if it may pass."""
        ids = [job.id for job in jobs]
        marks = ",".join("?" * len(ids))
        with self._tx() as conn:
            if state is EmailState.DIGEST:
                conn.execute("DELETE FROM email_log WHERE id = ?", (log_id,))
            conn.execute(
                f"UPDATE jobs SET email_state = ?, last_error = COALESCE(?, last_error),"  # noqa: S608
                f" updated_at = ?, lease_owner = NULL WHERE id IN ({marks})"
                " AND email_state = 'sending'",
                (state.value, error, self.clock(), *ids),
            )

    def recover_emails(self, now: float | None = None, timeout: float | None = None) -> list[int]:
        """Finished jobs still ``sending`` (a digest cut off) whose sender is dead: ``uncertain``.

        They may have been delivered, so they are flagged, never resent. A
        digest's jobs name their sender (``<worker id>/digest``); it is dead
        when its row in ``workers`` is gone (a clean exit, or
        :meth:`reap_workers` proved it dead) or, when ``timeout`` is given,
        has not heartbeaten in ``timeout`` seconds before ``now``. Jobs
        without a sender (written by an older version) count as dead. A live
        worker's digest is never touched. (A running job's own email is the
        next lease holder's: the pipeline flags it.)
        """
        now = self.clock() if now is None else now
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id, lease_owner FROM jobs WHERE email_state = 'sending'"
                " AND state NOT IN ('queued', 'running')"
            ).fetchall()
            if not rows:
                return []
            since = now - timeout if timeout is not None else float("-inf")
            live = {
                row[0]
                for row in conn.execute("SELECT id, heartbeat_at FROM workers").fetchall()
                if row[1] >= since
            }
            dead = [
                int(row[0])
                for row in rows
                if not row[1] or registry.worker_of(str(row[1])) not in live
            ]
            if dead:
                conn.execute(
                    "UPDATE jobs SET email_state = 'uncertain', lease_owner = NULL,"  # noqa: S608
                    f" updated_at = ? WHERE id IN ({','.join('?' * len(dead))})",
                    (now, *dead),
                )
        return dead

    def bury_abandoned(self, now: float | None = None) -> list[Job]:
        """Running jobs whose lease expired after their last attempt: ``dead``, returned.

        Their worker stopped without finishing them every time (killed, out of
        memory, its host lost); taking them over again would only stop the
        next worker. A released attempt (:meth:`release`) never counts, so
        clean stops never bring a job here. ``last_error`` says why
        (:func:`abandoned_error`); the lease owner is cleared, so the worker
        that held it, if it still runs, is fenced (its next heartbeat stops its
        ffmpeg); an email found ``sending`` becomes ``uncertain`` (never
        resent). ``pid`` and the ffmpeg stamp stay for the caller, which kills
        a leftover ffmpeg here (as a takeover does) and tells the admin. Each
        job is returned to one caller only, however many call at once.
        """
        now = self.clock() if now is None else now
        buried: list[Job] = []
        with self._tx() as conn:
            found = conn.execute(
                f"SELECT * FROM jobs WHERE {ABANDONED.format(now='?')} ORDER BY id",  # noqa: S608
                (now,),
            ).fetchall()
            for row in found:
                job = Job.from_row(row)
                dead = conn.execute(
                    "UPDATE jobs SET state = 'dead', last_error = ?, finished_at = ?,"
                    " updated_at = ?, lease_owner = NULL, lease_expires_at = NULL,"
                    " email_state = CASE WHEN email_state = 'sending' THEN 'uncertain'"
                    " ELSE email_state END WHERE id = ? AND state = 'running' RETURNING *",
                    (abandoned_error(job), now, now, job.id),
                ).fetchone()
                if dead is not None:
                    buried.append(Job.from_row(dead))
        return buried

    def release(self, job: Job, owner: str) -> None:
        """Give a job back at shutdown: queued, and this attempt does not count."""
        now = self.clock()
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(0, attempts - 1),"
                " next_run_at = ?, updated_at = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " pid = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (now, now, job.id, owner),
            )

    def requeue_orphans(self, now: float | None = None) -> list[Job]:
        """Running jobs whose lease expired (their worker died or stalled): requeue them.

        Only expired leases: a job another live worker holds is never touched.
        Their ``pid`` stays, so the next holder kills a leftover ffmpeg. One
        out of attempts is left for :meth:`bury_abandoned`.
        """
        now = self.clock() if now is None else now
        with self._tx() as conn:
            rows = conn.execute(
                "UPDATE jobs SET state = 'queued', next_run_at = ?, updated_at = ?,"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE state = 'running' AND lease_expires_at < ?"
                " AND attempts < max_attempts RETURNING *",
                (now, now, now),
            ).fetchall()
        return [Job.from_row(row) for row in rows]

    def clear_pid(self, job_id: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET pid = NULL, pid_marker = NULL,"
                " data = json_remove(data, '$.ffmpeg') WHERE id = ?",
                (job_id,),
            )

    # -- the registry of live workers -------------------------------------------

    def register_worker(self, worker_id: str, pid: int, now: float) -> None:
        """Add (or renew) this process's row in ``workers``; see jobs/registry.py."""
        own = registry.stamp(pid, self.node)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO workers (id, node, pid, boot_id, pid_start, started_at,"
                " heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE"
                " SET heartbeat_at = excluded.heartbeat_at",
                (worker_id, self.node, pid, registry.boot_id(), own.start if own else 0, now, now),
            )

    def heartbeat_worker(self, worker_id: str, now: float) -> bool:
        """Renew the row's heartbeat; False if it is gone (reaped): register again."""
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, worker_id)
            )
            return cursor.rowcount == 1

    def unregister_worker(self, worker_id: str) -> None:
        """A clean exit: the row goes (its jobs were released first)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self) -> list[dict[str, Any]]:
        """Every registered worker, oldest first."""
        rows = self.conn.execute("SELECT * FROM workers ORDER BY started_at, id").fetchall()
        return [dict(row) for row in rows]

    def reap_workers(self, now: float, forget_after: float) -> dict[str, list[int]]:
        """Remove workers proven dead; expire their leases. Returns {worker id: job ids}.

        Proof is only had on this node (``registry.dead``): the row is of an
        earlier boot, or of this boot and pid namespace and its pid is gone or
        is another process (its start time differs). Such a worker's running
        jobs get an expired lease, so any worker takes them over now rather
        than after the lease. A row of another node, or an earlier boot, is
        only forgotten after ``forget_after`` seconds without a heartbeat; its
        jobs are taken over by lease expiry alone (a stale row with a live
        lease keeps its job).
        """
        with self._tx() as conn:
            rows = conn.execute("SELECT * FROM workers").fetchall()
            dead: dict[str, list[int]] = {}
            for row in rows:
                process = registry.Stamp(row["node"], row["boot_id"], row["pid"], row["pid_start"])
                if registry.dead(process, self.node):
                    jobs = conn.execute(
                        "UPDATE jobs SET lease_expires_at = ? WHERE state = 'running'"
                        " AND substr(lease_owner, 1, ?) = ? RETURNING id",
                        (now - 1, len(row["id"]) + 1, row["id"] + "/"),
                    ).fetchall()
                    dead[row["id"]] = [int(job[0]) for job in jobs]
                elif row["heartbeat_at"] < now - forget_after:
                    dead[row["id"]] = []
            for worker_id in dead:
                conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
        return dead

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

    def queue_stats(self) -> QueueStats:
        """Jobs queued and running, and the oldest queued one's creation (for the metrics)."""
        rows = self.conn.execute(
            "SELECT state, COUNT(*) AS n, MIN(created_at) AS oldest FROM jobs "
            "WHERE state IN ('queued', 'running') GROUP BY state"
        ).fetchall()
        by_state = {row["state"]: row for row in rows}
        queued, running = by_state.get("queued"), by_state.get("running")
        return QueueStats(
            queued=queued["n"] if queued else 0,
            running=running["n"] if running else 0,
            oldest_queued_at=queued["oldest"] if queued else None,
        )

    def retry(self, job_id: int) -> Job:
        """Queue a failed, dead or cancelled job again (finished steps are not redone)."""
        job = self.get(job_id)
        if job.state.value in ACTIVE or job.state is JobState.SUCCEEDED:
            raise SftpgateError(
                f"job {job_id} is {job.state.value}; only failed, dead or "
                "cancelled jobs can be retried"
            )
        now = self.clock()
        found = self._one(
            "UPDATE jobs SET state = 'queued', attempts = 0, next_run_at = ?, updated_at = ?,"
            " finished_at = NULL, email_state = CASE WHEN email_state IN ('failed', 'uncertain')"
            " OR outcome = 'refused' THEN 'none' ELSE email_state END,"
            # An admin's retry of a refusal converts the upload after all.
            " data = CASE WHEN outcome = 'refused' THEN json_remove(data, '$.refused')"
            " ELSE data END,"
            " outcome = CASE WHEN outcome = 'refused' THEN NULL ELSE outcome END"
            " WHERE id = ? RETURNING *",
            (now, now, job_id),
        )
        assert found is not None
        return found

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued or running job (a running one stops at its next heartbeat)."""
        job = self.get(job_id)
        if job.state.value not in ACTIVE:
            raise SftpgateError(f"job {job_id} is {job.state.value}; nothing to cancel")
        now = self.clock()
        found = self._one(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?,"
            " last_error = COALESCE(last_error, 'cancelled by an admin') WHERE id = ? RETURNING *",
            (now, now, job_id),
        )
        assert found is not None
        return found

    # -- the uploads a job came from (storage port: JobLedger) ----------------

    def upload_time(self, upload_id: int | None) -> float | None:
        """When upload ``upload_id`` was journaled, or None (no such row, or None given)."""
        if upload_id is None:
            return None
        row = self.conn.execute("SELECT ts FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        return float(row[0]) if row is not None else None
