"""Embedded workers: N asyncio tasks in `sftpgate serve` (or `sftpgate worker`) leasing job rows.

Each worker leases a job, runs the pipeline while a heartbeat extends the
lease (and notices a cancel), then records the outcome: succeeded, failed
(permanent), or requeued with exponential backoff until ``max_attempts``, then
dead. At start-up every `running` row is an orphan of a crash: it is requeued
and its ffmpeg, if still alive, killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..config import Config
from ..events import Op
from ..media.run import kill_leftover
from ..notify import EmailError
from ..notify.message import build_message
from ..notify.smtp import send
from ..notify.templates import render
from ..pipeline import PermanentJobError, Pipeline, Result
from .model import Job, JobState, Outcome
from .store import JobStore

log = logging.getLogger(__name__)
T = TypeVar("T")


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt ``attempts + 1``: base, 2·base, 4·base ... capped. Pure."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


# outcome -> (final state, journal op, journal status)
_OUTCOMES: dict[Outcome, tuple[JobState, Op, str]] = {
    Outcome.CONVERTED: (JobState.SUCCEEDED, Op.CONVERTED, "ok"),
    Outcome.REJECTED: (JobState.SUCCEEDED, Op.REJECTED, "rejected"),
    Outcome.DUPLICATE: (JobState.SUCCEEDED, Op.CONVERTED, "duplicate"),
    Outcome.REFUSED: (JobState.FAILED, Op.REJECTED, "refused"),
}


class WorkerPool:
    """N workers taking jobs round-robin across users, and one loop sending digests.

    ``clock`` is the time of the email rate limit and the dedupe window
    (tests pass their own); leases use the real time.
    """

    def __init__(
        self,
        config: Config,
        store: JobStore,
        pipeline: Pipeline | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline or Pipeline(config, store, clock)
        self.owner_prefix = f"{socket.gethostname()}:{os.getpid()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[int, str] = {}  # job id -> owner
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.store.executor, lambda: fn(*args, **kwargs))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        for job in await self._db(self.store.requeue_orphans):
            log.warning("job %d was running when the gateway stopped; requeued", job.id)
            if job.pid and job.pid_marker:
                if await asyncio.to_thread(kill_leftover, job.pid, job.pid_marker):
                    log.warning("job %d: killed leftover ffmpeg (pid %d)", job.id, job.pid)
                await self._db(self.store.clear_pid, job.id)
        for job_id in await self._db(self.store.recover_emails):
            log.warning(
                "job %d: its digest was being sent when the gateway stopped; "
                "not resent (email state uncertain)",
                job_id,
            )
        for index in range(self.config.jobs.workers):
            self._tasks.append(asyncio.create_task(self._work(f"{self.owner_prefix}/{index}")))
        self._tasks.append(asyncio.create_task(self._digests()))

    def wake(self) -> None:
        """Thread-safe: a job was committed, start now rather than at the next poll."""
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        """Stop taking jobs; running ones are cancelled and requeued (their steps resume)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _work(self, owner: str) -> None:
        cfg = self.config.jobs
        assert self._wake is not None
        while not self._stopping:
            try:
                job = await self._db(
                    self.store.lease, owner, cfg.lease_seconds, cfg.per_user_running
                )
            except Exception:
                log.exception("jobs: cannot lease; retrying")
                await asyncio.sleep(cfg.poll_interval)
                continue
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), cfg.poll_interval)
                continue
            await self._run(job, owner)

    async def _digests(self) -> None:
        """Send waiting digests as users' email slots free up (checked every poll interval)."""
        while not self._stopping:
            try:
                await self.pipeline.send_digests()
            except Exception:
                log.exception("jobs: digests failed; trying again")
            await asyncio.sleep(self.config.jobs.poll_interval)

    async def _run(self, job: Job, owner: str) -> None:
        cfg = self.config.jobs
        log.info("job %d: %s for %s (attempt %d)", job.id, job.path, job.login, job.attempts)
        state: dict[str, Any] = {"progress": job.progress, "step": job.step or "probe"}

        def progress(fraction: float, step: str) -> None:
            state["progress"], state["step"] = round(fraction, 3), step

        task = asyncio.create_task(self.pipeline.run(job, owner, progress))
        lost = False
        interval = min(2.0, cfg.lease_seconds / 3)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=interval)
                if task.done():
                    break
                ok = await self._db(
                    self.store.heartbeat,
                    job.id,
                    owner,
                    cfg.lease_seconds,
                    progress=float(state["progress"]),
                    step=str(state["step"]),
                )
                if not ok:
                    lost = True
                    log.warning("job %d: lease lost or cancelled; stopping it", job.id)
                    task.cancel()
            result = await task
        except asyncio.CancelledError:
            if lost:
                return
            # Shutdown: give the job back so the next start resumes it.
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await asyncio.shield(self._db(self.store.release, job, owner))
            raise
        except PermanentJobError as exc:
            log.error("job %d failed: %s", job.id, exc)
            await self._db(self.store.finish, job, owner, JobState.FAILED, error=str(exc))
            return
        except Exception as exc:
            await self._retry(job, owner, exc)
            return
        await self._succeed(job, owner, result)

    async def _succeed(self, job: Job, owner: str, result: Result) -> None:
        state, op, status = _OUTCOMES[result.outcome]
        await self._db(
            self.store.finish,
            job,
            owner,
            state,
            outcome=result.outcome.value,
            error=result.warning if state is JobState.SUCCEEDED else result.message,
            journal=(op, result.output, status, result.message),
        )
        log.info(
            "job %d: %s %s%s",
            job.id,
            result.outcome.value,
            job.path,
            "" if result.outcome is Outcome.CONVERTED else f" ({result.message})",
        )

    async def _retry(self, job: Job, owner: str, exc: Exception) -> None:
        cfg = self.config.jobs
        error = str(exc) or type(exc).__name__
        wait = backoff(job.attempts, cfg.backoff_base, cfg.backoff_max)
        state = await self._db(self.store.retry_later, job, owner, error, wait)
        if state is JobState.DEAD:
            log.error("job %d is dead after %d attempts: %s", job.id, job.attempts, error)
            await self._tell_admin(job, error)
        else:
            log.warning(
                "job %d attempt %d failed (%s); retry in %.0f s", job.id, job.attempts, error, wait
            )

    async def _tell_admin(self, job: Job, error: str) -> None:
        admin = self.config.email.admin
        if not admin or not self.config.email.enabled:
            return
        user = self.config.user(job.login)
        rendered = render(
            "dead",
            {
                "login": job.login,
                "file": job.path,
                "reason": error,
                "job_id": str(job.id),
                "name": user.name if user else "?",
                "surname": user.surname if user else "?",
            },
            self.config.email.templates_dir,
        )
        message = build_message(
            rendered, sender=self.config.smtp.sender, recipient=admin, poster=None
        )
        try:
            await asyncio.to_thread(send, message, self.config.smtp)
        except EmailError as exc:  # the job is already dead; the log still says so
            log.error("job %d: cannot tell the admin: %s", job.id, exc)
