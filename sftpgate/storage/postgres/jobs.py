"""The job store on PostgreSQL: the Scheduler and JobLedger ports (storage/ports.py).

Leasing is ``SELECT … FOR UPDATE SKIP LOCKED``: workers on many hosts pick
different due jobs without waiting on each other, and a job is held by one
lease at a time. Per-user caps are checked again under the user's
``job_turns`` row lock, so two workers cannot both start a user's only slot.
Every change that takes ``owner`` acts only while that owner holds the lease.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from psycopg_pool import ConnectionPool

from ...errors import NotFoundError, SftpgateError
from ...events import Op
from ...jobs import registry
from ...jobs.model import ACTIVE, EmailState, Job, JobState
from ...jobs.store import ABANDONED, abandoned_error
from ..ports import LeaseLost as PortLeaseLost
from ..ports import QueueStats
from .journal import insert_operations
from .pool import Conn, PoolPort, unavailable_as_storage

_JOB_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))


LeaseLost = PortLeaseLost  # the port's one class, which jobs/worker.py catches


def _job(row: dict[str, Any]) -> Job:
    # Only the columns this build's Job knows (the table may carry newer ones).
    return Job.from_row({k: v for k, v in row.items() if k in _JOB_FIELDS})  # type: ignore[arg-type]


# Due, or its lease expired with attempts left (one without is bury_abandoned's).
_DUE = (
    "((j.state = 'queued' AND j.next_run_at <= %(now)s)"
    " OR (j.state = 'running' AND j.lease_expires_at < %(now)s"
    " AND j.attempts < j.max_attempts))"
)

_PICK = (
    "SELECT j.id, j.login FROM jobs AS j LEFT JOIN job_turns AS t ON t.login = j.login"  # noqa: S608
    f" WHERE {_DUE} AND NOT (j.login = ANY(%(skip)s))"
    " AND (%(cap)s < 0 OR (SELECT count(*) FROM jobs AS r WHERE r.login = j.login"
    "   AND r.state = 'running' AND r.lease_expires_at >= %(now)s) < %(cap)s)"
    " ORDER BY COALESCE(t.last_turn, 0), j.next_run_at, j.id"
    " LIMIT 1 FOR UPDATE OF j SKIP LOCKED"
)


class PgJobStore(PoolPort):
    """:class:`~sftpgate.storage.ports.JobStore` on PostgreSQL. Thread-safe (a pool).

    Also what jobs/worker.py's pool and pipeline.py use beyond the port, as SQLite's
    JobStore offers it: ``executor`` (the threads its calls run on), ``clock``, ``node``,
    ``worker_id`` and the registry of live workers.
    """

    def __init__(
        self,
        pool: ConnectionPool[Conn],
        release: Callable[[], None] | None = None,
        *,
        node: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(pool, release)
        self.clock = clock
        self.node = node or socket.gethostname()
        self.worker_id: str | None = None
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="jobs-pg")

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        super().close()

    @contextmanager
    def _tx(self) -> Iterator[Conn]:
        with unavailable_as_storage(), self._pool.connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def _conn(self) -> Iterator[Conn]:
        with unavailable_as_storage(), self._pool.connection() as conn:
            yield conn

    # -- scheduling ------------------------------------------------------------------

    def lease(self, owner: str, lease_seconds: float, per_user: int | None = None) -> Job | None:
        now = time.time()
        cap = per_user if per_user is not None else -1
        skip: list[str] = []
        with self._tx() as conn:
            for _ in range(16):  # users found at their cap meanwhile are passed over
                pick = conn.execute(_PICK, {"now": now, "cap": cap, "skip": skip}).fetchone()
                if pick is None:
                    return None
                login = pick["login"]
                # The user's turn row, locked until commit: other leases of this user wait here,
                # then count the jobs this one starts.
                conn.execute(
                    "INSERT INTO job_turns (login, last_turn) VALUES (%s, %s)"
                    " ON CONFLICT (login) DO UPDATE SET last_turn = excluded.last_turn",
                    (login, now),
                )
                if cap >= 0:
                    running = conn.execute(
                        "SELECT count(*) AS n FROM jobs WHERE login = %s AND state = 'running'"
                        " AND lease_expires_at >= %s AND id != %s",
                        (login, now, pick["id"]),
                    ).fetchone()
                    if running is not None and running["n"] >= cap:
                        skip.append(login)
                        continue
                row = conn.execute(
                    "UPDATE jobs SET state = 'running', lease_owner = %(owner)s,"
                    " lease_expires_at = %(until)s, attempts = attempts + 1,"
                    " started_at = COALESCE(started_at, %(now)s), updated_at = %(now)s,"
                    " pid = NULL, pid_marker = NULL WHERE id = %(id)s RETURNING *",
                    {"owner": owner, "until": now + lease_seconds, "now": now, "id": pick["id"]},
                ).fetchone()
                return _job(row) if row else None
        return None

    def heartbeat(
        self,
        job_id: int,
        owner: str,
        lease_seconds: float,
        *,
        progress: float | None = None,
        step: str | None = None,
    ) -> bool:
        now = time.time()
        with self._conn() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires_at = %s, updated_at = %s,"
                " progress = COALESCE(%s, progress), step = COALESCE(%s, step)"
                " WHERE id = %s AND lease_owner = %s AND state = 'running'",
                (now + lease_seconds, now, progress, step, job_id, owner),
            )
            return cursor.rowcount == 1

    def set_pid(self, job_id: int, owner: str, pid: int | None, marker: str | None) -> None:
        """Record ffmpeg's pid (or its end: None) and its stamp (node, boot, start time), so
        whoever takes the job over kills exactly that process, and only where it ran."""
        stamp = registry.stamp(pid, self.node) if pid is not None else None
        with self._conn() as conn:
            conn.execute(
                "UPDATE jobs SET pid = %(pid)s, pid_marker = %(marker)s, data = (CASE"
                " WHEN %(stamp)s::text IS NULL THEN data::jsonb - 'ffmpeg'"
                " ELSE jsonb_set(data::jsonb, '{ffmpeg}', to_jsonb(%(stamp)s::text)) END)::text"
                " WHERE id = %(id)s AND lease_owner = %(owner)s",
                {
                    "pid": pid,
                    "marker": marker,
                    "stamp": stamp.encode() if stamp is not None else None,
                    "id": job_id,
                    "owner": owner,
                },
            )

    def clear_pid(self, job_id: int) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE jobs SET pid = NULL, pid_marker = NULL,"
                " data = (data::jsonb - 'ffmpeg')::text WHERE id = %s",
                (job_id,),
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
        now = time.time()
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = %(state)s, outcome = COALESCE(%(outcome)s, outcome),"
                " last_error = %(error)s, finished_at = %(now)s, updated_at = %(now)s,"
                " lease_owner = NULL, lease_expires_at = NULL, pid = NULL,"
                " progress = CASE WHEN %(state)s = 'succeeded' THEN 1 ELSE progress END,"
                " step = CASE WHEN %(state)s = 'succeeded' THEN 'done' ELSE step END"
                " WHERE id = %(id)s AND lease_owner = %(owner)s AND state = 'running'",
                {
                    "state": state.value,
                    "outcome": outcome,
                    "error": error,
                    "now": now,
                    "id": job.id,
                    "owner": owner,
                },
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"job {job.id}: lease lost")
            if journal is not None:
                op, path2, status, message = journal
                row = (now, job.session_id, job.login, None, op.value, job.path, path2)
                insert_operations(
                    conn, [(*row, None, None, None, None, None, None, status, message)]
                )

    def retry_later(self, job: Job, owner: str, error: str, backoff: float) -> JobState:
        dead = job.attempts >= job.max_attempts
        state = JobState.DEAD if dead else JobState.QUEUED
        now = time.time()
        with self._conn() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = %s, last_error = %s, next_run_at = %s, updated_at = %s,"
                " finished_at = %s, lease_owner = NULL, lease_expires_at = NULL, pid = NULL,"
                " handed_at = NULL WHERE id = %s AND lease_owner = %s AND state = 'running'",
                (state.value, error, now + backoff, now, now if dead else None, job.id, owner),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"job {job.id}: lease lost")
        return state

    def bury_abandoned(self, now: float | None = None) -> list[Job]:
        """As SQLite's (jobs/store.py): running jobs whose lease expired after their last
        attempt go ``dead``, each returned to one caller only (``FOR UPDATE SKIP LOCKED``,
        then an update that still needs it ``running``)."""
        now = time.time() if now is None else now
        buried: list[Job] = []
        with self._tx() as conn:
            found = conn.execute(
                f"SELECT * FROM jobs WHERE {ABANDONED.format(now='%s')}"  # noqa: S608
                " ORDER BY id FOR UPDATE SKIP LOCKED",
                (now,),
            ).fetchall()
            for row in found:
                job = _job(row)
                dead = conn.execute(
                    "UPDATE jobs SET state = 'dead', last_error = %s, finished_at = %s,"
                    " updated_at = %s, lease_owner = NULL, lease_expires_at = NULL,"
                    " handed_at = NULL, email_state = CASE WHEN email_state = 'sending'"
                    " THEN 'uncertain' ELSE email_state END"
                    " WHERE id = %s AND state = 'running' RETURNING *",
                    (abandoned_error(job), now, now, job.id),
                ).fetchone()
                if dead is not None:
                    buried.append(_job(dead))
        return buried

    def release(self, job: Job, owner: str) -> None:
        now = time.time()
        with self._conn() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = greatest(0, attempts - 1),"
                " next_run_at = %s, updated_at = %s, lease_owner = NULL, lease_expires_at = NULL,"
                " pid = NULL, handed_at = NULL"
                " WHERE id = %s AND lease_owner = %s AND state = 'running'",
                (now, now, job.id, owner),
            )

    # -- Procrastinate's side (queue.py) ------------------------------------------------

    def lease_job(
        self, job_id: int, owner: str, lease_seconds: float, per_user: int | None = None
    ) -> Job | None:
        """Lease job ``job_id`` itself for ``owner`` (a Procrastinate task runs that job), or
        None: it is not due, held by a live lease, finished or cancelled, or its user already
        has ``per_user`` jobs running (counted under the user's turn row lock, as ``lease``
        does). A leftover ffmpeg's pid stays on the job, for its new holder to kill."""
        now = time.time()
        with self._tx() as conn:
            pick = conn.execute(
                f"SELECT j.id, j.login FROM jobs AS j WHERE j.id = %(id)s AND {_DUE}"  # noqa: S608
                " FOR UPDATE",
                {"id": job_id, "now": now},
            ).fetchone()
            if pick is None:
                return None
            conn.execute(
                "INSERT INTO job_turns (login, last_turn) VALUES (%s, %s)"
                " ON CONFLICT (login) DO UPDATE SET last_turn = excluded.last_turn",
                (pick["login"], now),
            )
            if per_user is not None:
                running = conn.execute(
                    "SELECT count(*) AS n FROM jobs WHERE login = %s AND state = 'running'"
                    " AND lease_expires_at >= %s AND id != %s",
                    (pick["login"], now, job_id),
                ).fetchone()
                if running is not None and running["n"] >= per_user:
                    return None
            row = conn.execute(
                "UPDATE jobs SET state = 'running', lease_owner = %(owner)s,"
                " lease_expires_at = %(until)s, attempts = attempts + 1,"
                " started_at = COALESCE(started_at, %(now)s), updated_at = %(now)s"
                " WHERE id = %(id)s RETURNING *",
                {"owner": owner, "until": now + lease_seconds, "now": now, "id": job_id},
            ).fetchone()
        return _job(row) if row else None

    def to_hand_over(
        self, now: float, most: int = 500, grace: float = 30.0
    ) -> list[tuple[int, float, int]]:
        """Claim jobs not yet handed to Procrastinate (``handed_at`` set now), oldest first:
        (job id, when it is due, its turn). The turn is how many of its user's active jobs
        come before it: handed over as Procrastinate's priority (negated), so users' first
        jobs run before anyone's second. Rows are claimed with SKIP LOCKED, so two processes
        handing over at once never both take one.

        A claim that never reached Procrastinate (its process died between the two), and a
        running job whose lease expired with its worker and Procrastinate's record of it
        gone, are claimable again once no Procrastinate job waits for or runs them and the
        claim is ``grace`` seconds old (not one out of attempts: ``bury_abandoned`` ends it).
        """
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs AS j SET handed_at = NULL WHERE j.handed_at < %(stale)s"
                " AND (j.state = 'queued' OR (j.state = 'running'"
                "      AND j.lease_expires_at < %(now)s AND j.attempts < j.max_attempts))"
                " AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs AS p"
                "  WHERE p.status IN ('todo', 'doing')"
                "  AND p.queueing_lock = 'sftpgate-job-' || j.id)",
                {"now": now, "stale": now - grace},
            )
            rows = conn.execute(
                "UPDATE jobs AS j SET handed_at = %(now)s FROM ("
                "  SELECT c.id, (SELECT count(*) FROM jobs AS e WHERE e.login = c.login"
                "   AND e.id < c.id AND e.state IN ('queued', 'running')) AS turn"
                "  FROM jobs AS c WHERE c.handed_at IS NULL"
                "  AND c.state IN ('queued', 'running') ORDER BY c.id LIMIT %(most)s"
                "  FOR UPDATE OF c SKIP LOCKED) AS pick"
                " WHERE j.id = pick.id RETURNING j.id, j.next_run_at, pick.turn",
                {"now": now, "most": most},
            ).fetchall()
        rows.sort(key=lambda r: r["id"])
        return [(int(r["id"]), float(r["next_run_at"]), int(r["turn"])) for r in rows]

    def unhand(self, job_id: int) -> None:
        """Hand the job over again (its hand-over failed)."""
        with self._conn() as conn:
            conn.execute(
                "UPDATE jobs SET handed_at = NULL WHERE id = %s AND state = 'queued'", (job_id,)
            )

    def get(self, job_id: int) -> Job:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id}")
        return _job(row)

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
        now = time.time()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT steps, data FROM jobs WHERE id = %s AND lease_owner = %s FOR UPDATE",
                (job_id, owner),
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
                "UPDATE jobs SET steps = %s, data = %s, step = %s, updated_at = %s WHERE id = %s"
                " RETURNING *",
                (json.dumps(steps), json.dumps(merged), step, now, job_id),
            ).fetchone()
        assert result is not None
        return _job(result)

    def set_email_state(
        self, job_id: int, owner: str, state: EmailState, error: str | None = None
    ) -> None:
        with self._conn() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET email_state = %s, last_error = COALESCE(%s, last_error),"
                " updated_at = %s WHERE id = %s AND lease_owner = %s",
                (state.value, error, time.time(), job_id, owner),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"job {job_id}: lease lost")

    @staticmethod
    def _hold(conn: Conn, job_id: int, owner: str) -> None:
        """Inside a transaction: lock the job, or raise LeaseLost unless ``owner`` holds it."""
        row = conn.execute(
            "SELECT 1 FROM jobs WHERE id = %s AND lease_owner = %s AND state = 'running'"
            " FOR UPDATE",
            (job_id, owner),
        ).fetchone()
        if row is None:
            raise LeaseLost(f"job {job_id}: lease lost")

    @staticmethod
    def _lock_user(conn: Conn, login: str) -> None:
        """Serialize one user's content and email decisions (a transaction-level advisory lock)."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (login,))

    def claim_content(
        self, job: Job, owner: str, sha256: str, window: float, now: float
    ) -> Job | None:
        with self._tx() as conn:
            self._hold(conn, job.id, owner)
            self._lock_user(conn, job.login)
            row = conn.execute(
                "SELECT * FROM jobs WHERE login = %s AND id != %s AND created_at >= %s"
                " AND (data::jsonb ->> 'sha256') = %s"
                " AND state NOT IN ('failed', 'dead', 'cancelled')"
                " AND (outcome IS NULL OR outcome = 'converted') ORDER BY id LIMIT 1",
                (job.login, job.id, now - window, sha256),
            ).fetchone()
            if row is not None:
                return _job(row)
            conn.execute(
                "UPDATE jobs SET data = (jsonb_set(data::jsonb, '{sha256}', to_jsonb(%s::text)))"
                "::text, updated_at = %s WHERE id = %s AND lease_owner = %s",
                (sha256, time.time(), job.id, owner),
            )
        return None

    @staticmethod
    def _email_budget(conn: Conn, login: str, limit: int, window: float, now: float) -> bool:
        row = conn.execute(
            "SELECT count(*) AS n FROM email_log WHERE login = %s AND sent_at > %s",
            (login, now - window),
        ).fetchone()
        return bool(row is not None and row["n"] < limit)

    def reserve_email(
        self, job: Job, owner: str, limit: int, window: float, now: float
    ) -> int | None:
        with self._tx() as conn:
            self._hold(conn, job.id, owner)
            self._lock_user(conn, job.login)
            log_id: int | None = None
            state = EmailState.DIGEST
            waiting = conn.execute(
                "SELECT 1 FROM jobs WHERE login = %s AND email_state = 'digest' LIMIT 1",
                (job.login,),
            ).fetchone()
            if self._email_budget(conn, job.login, limit, window, now) and waiting is None:
                row = conn.execute(
                    "INSERT INTO email_log (login, sent_at, kind, jobs)"
                    " VALUES (%s, %s, 'single', %s) RETURNING id",
                    (job.login, now, json.dumps([job.id])),
                ).fetchone()
                assert row is not None
                log_id, state = int(row["id"]), EmailState.SENDING
            conn.execute(
                "UPDATE jobs SET email_state = %s, updated_at = %s"
                " WHERE id = %s AND lease_owner = %s",
                (state.value, time.time(), job.id, owner),
            )
        return log_id

    def unreserve_email(self, job: Job, owner: str, log_id: int, error: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM email_log WHERE id = %s", (log_id,))
            conn.execute(
                "UPDATE jobs SET email_state = 'none', last_error = %s, updated_at = %s"
                " WHERE id = %s AND lease_owner = %s",
                (error, time.time(), job.id, owner),
            )

    def digests_due(self, limit: int, window: float, now: float) -> list[str]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT DISTINCT login FROM jobs WHERE email_state = 'digest'"
                " AND state NOT IN ('queued', 'running') ORDER BY login"
            ).fetchall()
            return [
                row["login"]
                for row in rows
                if self._email_budget(conn, row["login"], limit, window, now)
            ]

    def claim_digest(
        self, login: str, limit: int, window: float, now: float, most: int = 100
    ) -> tuple[int, list[Job]] | None:
        with self._tx() as conn:
            self._lock_user(conn, login)
            if not self._email_budget(conn, login, limit, window, now):
                return None
            rows = conn.execute(
                "SELECT * FROM jobs WHERE login = %s AND email_state = 'digest'"
                " AND state NOT IN ('queued', 'running') ORDER BY id LIMIT %s FOR UPDATE",
                (login, most),
            ).fetchall()
            if not rows:
                return None
            jobs = [_job(row) for row in rows]
            ids = [job.id for job in jobs]
            log = conn.execute(
                "INSERT INTO email_log (login, sent_at, kind, jobs)"
                " VALUES (%s, %s, 'digest', %s) RETURNING id",
                (login, now, json.dumps(ids)),
            ).fetchone()
            assert log is not None
            # The jobs name their sender while it sends: only its death makes them `uncertain`.
            sender = registry.owner_of(self.worker_id, "digest") if self.worker_id else None
            conn.execute(
                "UPDATE jobs SET email_state = 'sending', lease_owner = %s WHERE id = ANY(%s)",
                (sender, ids),
            )
        return int(log["id"]), jobs

    def digest_sent(
        self, log_id: int, jobs: list[Job], state: EmailState, error: str | None
    ) -> None:
        ids = [job.id for job in jobs]
        with self._tx() as conn:
            if state is EmailState.DIGEST:
                conn.execute("DELETE FROM email_log WHERE id = %s", (log_id,))
            conn.execute(
                "UPDATE jobs SET email_state = %s, last_error = COALESCE(%s, last_error),"
                " updated_at = %s, lease_owner = NULL WHERE id = ANY(%s)"
                " AND email_state = 'sending'",
                (state.value, error, time.time(), ids),
            )

    def recover_emails(self, now: float | None = None, timeout: float | None = None) -> list[int]:
        """Finished jobs still ``sending`` (a digest cut off) whose sender is dead: ``uncertain``
        (never resent). A digest's jobs name their sender (``<worker id>/digest``); it is dead
        when its ``workers`` row is gone or, with ``timeout``, silent that long."""
        now = time.time() if now is None else now
        since = now - timeout if timeout is not None else float("-inf")
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id, lease_owner FROM jobs WHERE email_state = 'sending'"
                " AND state NOT IN ('queued', 'running') FOR UPDATE"
            ).fetchall()
            if not rows:
                return []
            live = {
                r["id"]
                for r in conn.execute("SELECT id, heartbeat_at FROM workers").fetchall()
                if r["heartbeat_at"] >= since
            }
            dead = [
                int(r["id"])
                for r in rows
                if not r["lease_owner"] or registry.worker_of(str(r["lease_owner"])) not in live
            ]
            if dead:
                conn.execute(
                    "UPDATE jobs SET email_state = 'uncertain', lease_owner = NULL,"
                    " updated_at = %s WHERE id = ANY(%s)",
                    (now, dead),
                )
        return sorted(dead)

    # -- the registry of live workers (jobs/registry.py) ------------------------------------

    def register_worker(self, worker_id: str, pid: int, now: float) -> None:
        own = registry.stamp(pid, self.node)
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO workers (id, node, pid, boot_id, pid_start, started_at,"
                " heartbeat_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE"
                " SET heartbeat_at = excluded.heartbeat_at",
                (worker_id, self.node, pid, registry.boot_id(), own.start if own else 0, now, now),
            )

    def heartbeat_worker(self, worker_id: str, now: float) -> bool:
        with self._conn() as conn:
            cursor = conn.execute(
                "UPDATE workers SET heartbeat_at = %s WHERE id = %s", (now, worker_id)
            )
            return cursor.rowcount == 1

    def unregister_worker(self, worker_id: str) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM workers WHERE id = %s", (worker_id,))

    def workers(self) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return list(conn.execute("SELECT * FROM workers ORDER BY started_at, id").fetchall())

    def reap_workers(self, now: float, forget_after: float) -> dict[str, list[int]]:
        """Remove workers proven dead (only provable on this node: their process is gone) and
        expire their jobs' leases; forget other rows silent for ``forget_after`` seconds (their
        jobs go by lease expiry alone). Returns {worker id: job ids taken back}."""
        with self._tx() as conn:
            dead: dict[str, list[int]] = {}
            for row in conn.execute("SELECT * FROM workers FOR UPDATE").fetchall():
                process = registry.Stamp(row["node"], row["boot_id"], row["pid"], row["pid_start"])
                if row["node"] == self.node and not registry.alive(process):
                    jobs = conn.execute(
                        "UPDATE jobs SET lease_expires_at = %s WHERE state = 'running'"
                        " AND left(lease_owner, %s) = %s RETURNING id",
                        (now - 1, len(row["id"]) + 1, row["id"] + "/"),
                    ).fetchall()
                    dead[row["id"]] = [int(j["id"]) for j in jobs]
                elif row["heartbeat_at"] < now - forget_after:
                    dead[row["id"]] = []
            if dead:
                conn.execute("DELETE FROM workers WHERE id = ANY(%s)", (list(dead),))
        return dead

    def upload_time(self, upload_id: int | None) -> float | None:
        if upload_id is None:
            return None
        with self._conn() as conn:
            row = conn.execute("SELECT ts FROM uploads WHERE id = %s", (upload_id,)).fetchone()
        return float(row["ts"]) if row is not None else None

    # -- admins ---------------------------------------------------------------------

    def retry(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job.state.value in ACTIVE or job.state is JobState.SUCCEEDED:
            raise SftpgateError(
                f"job {job_id} is {job.state.value}; only failed, dead or "
                "cancelled jobs can be retried"
            )
        now = time.time()
        with self._conn() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_run_at = %s,"
                " updated_at = %s, finished_at = NULL, handed_at = NULL,"
                " email_state = CASE WHEN email_state IN ('failed', 'uncertain')"
                " OR outcome = 'refused' THEN 'none' ELSE email_state END,"
                " data = CASE WHEN outcome = 'refused' THEN (data::jsonb - 'refused')::text"
                " ELSE data END,"
                " outcome = CASE WHEN outcome = 'refused' THEN NULL ELSE outcome END"
                " WHERE id = %s AND state NOT IN ('queued', 'running', 'succeeded') RETURNING *",
                (now, now, job_id),
            ).fetchone()
        if row is None:
            raise SftpgateError(f"job {job_id} changed meanwhile; look again")
        return _job(row)

    def cancel(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job.state.value not in ACTIVE:
            raise SftpgateError(f"job {job_id} is {job.state.value}; nothing to cancel")
        now = time.time()
        with self._conn() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = %s, updated_at = %s,"
                " last_error = COALESCE(last_error, 'cancelled by an admin')"
                " WHERE id = %s AND state IN ('queued', 'running') RETURNING *",
                (now, now, job_id),
            ).fetchone()
        if row is None:
            raise SftpgateError(f"job {job_id} ended meanwhile; nothing to cancel")
        return _job(row)

    def queue_stats(self) -> QueueStats:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT state, count(*) AS n, min(created_at) AS oldest FROM jobs "
                "WHERE state IN ('queued', 'running') GROUP BY state"
            ).fetchall()
        by_state = {row["state"]: row for row in rows}
        queued, running = by_state.get("queued"), by_state.get("running")
        return QueueStats(
            queued=int(queued["n"]) if queued else 0,
            running=int(running["n"]) if running else 0,
            oldest_queued_at=float(queued["oldest"]) if queued else None,
        )

    def list(
        self, *, states: tuple[str, ...] = (), login: str | None = None, limit: int = 100
    ) -> list[Job]:
        where = ["true"]
        params: dict[str, Any] = {"limit": limit}
        if states:
            where.append("state = ANY(%(states)s)")
            params["states"] = list(states)
        if login:
            where.append("login = %(login)s")
            params["login"] = login
        sql = (
            f"SELECT * FROM (SELECT * FROM jobs WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY id DESC LIMIT %(limit)s) AS last ORDER BY id"
        )
        with self._conn() as conn:
            rows = conn.execute(sql.encode(), params).fetchall()
        return [_job(row) for row in rows]
