"""Embedded workers: N asyncio tasks in `sftpgate serve` (or `sftpgate worker`) leasing job rows.

Each worker leases a job, runs the pipeline while a heartbeat extends the
lease (and notices a cancel), then records the outcome: succeeded, failed
(permanent), or requeued with exponential backoff until ``max_attempts``, then
dead. A job whose lease expired after its last attempt (its worker killed every
time: a poison job) is not taken over again but made dead by the keepalive
(``bury_abandoned``). The pool registers its process in the ``workers`` table and
heartbeats it (jobs/registry.py). Recovery is by lease expiry only: a job another live
worker holds is never touched, whoever starts; a job whose lease expired is
taken over and its leftover ffmpeg killed where it ran (pid and start time
checked), or, when it ran on another node, fenced: that worker's next commit
raises ``LeaseLost`` and its next heartbeat stops its ffmpeg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .. import metrics
from ..config import Config
from ..events import Op
from ..media.run import kill_leftover
from ..notify import EmailError
from ..notify.message import build_message
from ..notify.smtp import send
from ..notify.templates import render
from ..pipeline import PermanentJobError, Pipeline, Result
from . import registry
from .model import Job, JobState, Outcome
from .store import JobStore, LeaseLost

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
        self.node = config.server.node
        self.worker_id = registry.new_worker_id(self.node)
        self.owner_prefix = self.worker_id
        store.node, store.worker_id = self.node, self.worker_id
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[int, str] = {}  # job id -> owner
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._burying: asyncio.Task[list[Job]] | None = None

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.store.executor, lambda: fn(*args, **kwargs))

    @property
    def running(self) -> int:
        """Jobs this pool runs now."""
        return len(self._running)

    @property
    def beat(self) -> float:
        """Seconds between heartbeats (of leases and of the registry row): a third of a lease."""
        return min(2.0, self.config.jobs.lease_seconds / 3)

    async def start(self) -> None:
        """Register this worker process, recover what dead workers left, start the workers."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self._db(self.store.register_worker, self.worker_id, os.getpid(), self.store.clock())
        await self._recover()
        for index in range(self.config.jobs.workers):
            owner = registry.owner_of(self.worker_id, index)
            self._tasks.append(asyncio.create_task(self._work(owner)))
        self._tasks.append(asyncio.create_task(self._digests()))
        self._tasks.append(asyncio.create_task(self._keepalive()))

    async def _recover(self) -> None:
        """Expire the leases of workers proven dead here; flag digests dead workers cut off."""
        lease = self.config.jobs.lease_seconds
        now = self.store.clock()
        # A registry row silent for 10 leases (an hour at least) is forgotten.
        reaped = await self._db(self.store.reap_workers, now, max(3600.0, 10 * lease))
        for worker_id, job_ids in reaped.items():
            if job_ids:
                log.warning(
                    "worker %s is dead; its jobs %s are taken over",
                    worker_id,
                    ", ".join(map(str, job_ids)),
                )
        for job_id in await self._db(self.store.recover_emails, now, lease):
            log.warning(
                "job %d: its digest was being sent by a worker that died; "
                "not resent (email state uncertain)",
                job_id,
            )
        # Apart, so a leftover ffmpeg's death or a slow SMTP server never holds the heartbeat.
        if self._burying is None or self._burying.done():
            self._burying = asyncio.create_task(self.bury_abandoned())

    async def bury_abandoned(self) -> list[Job]:
        """End jobs whose lease expired after their last attempt: their worker stopped
        (killed, out of memory, its host lost) every time, and taking them over again would
        only stop the next one. Each goes ``dead`` (``store.bury_abandoned``: one caller
        gets it, however many race), its leftover ffmpeg is killed as a takeover kills it
        (or, on another node, its fenced worker stops it), and the admin is told once, as
        for any dead job. Returns the jobs this call buried."""
        try:
            jobs = await self._db(self.store.bury_abandoned)  # at the store's lease time
        except Exception:
            log.exception("jobs: cannot look for abandoned jobs; trying again")
            return []
        for job in jobs:
            error = job.last_error or "out of attempts"
            metrics.record_job("dead")
            log.error("job %d is dead: %s", job.id, error)
            try:
                if job.pid is not None:
                    await self._take_over(job)
            except Exception:
                log.exception("job %d: cannot stop its leftover ffmpeg", job.id)
            try:
                await self._tell_admin(job, error)
            except Exception:  # the job is dead already; the log says so
                log.exception("job %d: cannot tell the admin", job.id)
        return jobs

    async def _keepalive(self) -> None:
        """Heartbeat the registry row every ``beat`` seconds, and recover after dead workers."""
        while not self._stopping:
            await asyncio.sleep(self.beat)
            try:
                now = self.store.clock()
                if not await self._db(self.store.heartbeat_worker, self.worker_id, now):
                    log.warning("worker %s was forgotten (stalled?); registering again", self.node)
                    await self._db(self.store.register_worker, self.worker_id, os.getpid(), now)
                await self._recover()
            except Exception:
                log.exception("jobs: worker heartbeat failed; trying again")

    def alive(self) -> bool:
        """Whether the pool runs: started, not stopping, and none of its loops has ended."""
        return bool(self._tasks) and not self._stopping and not any(t.done() for t in self._tasks)

    def wake(self) -> None:
        """Thread-safe: a job was committed, start now rather than at the next poll."""
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        """Stop taking jobs; running ones are released at once: their ffmpeg killed (its
        process group), the lease given back and the attempt not counted (``store.release``),
        so the next worker resumes them after their last finished step."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._burying is not None:  # its jobs are dead already; let the admin be told
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._burying, 10)
        try:
            await self._db(self.store.unregister_worker, self.worker_id)
        except Exception:  # the row then goes when its heartbeat is old
            log.exception("jobs: cannot remove worker %s from the registry", self.worker_id)

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
        self._running[job.id] = owner
        try:
            await self._run_leased(job, owner)
        except LeaseLost:
            log.warning("job %d: lease lost (taken over, or cancelled); left to its holder", job.id)
        finally:
            self._running.pop(job.id, None)

    async def _take_over(self, job: Job) -> None:
        """Kill the ffmpeg a dead or stalled worker left running for ``job``, where we can."""
        assert job.pid is not None
        process = registry.Stamp.decode(str(job.data.get("ffmpeg") or ""))
        if process is not None and not process.here(self.node):
            log.warning(
                "job %d: its ffmpeg (pid %d) ran on %s; that worker is fenced and stops it "
                "at its next heartbeat",
                job.id,
                job.pid,
                process.node,
            )
        elif job.pid_marker:
            start = process.start if process is not None else None
            if await asyncio.to_thread(kill_leftover, job.pid, job.pid_marker, start):
                log.warning("job %d: killed leftover ffmpeg (pid %d)", job.id, job.pid)
                if process is not None:
                    await self._gone(process)
        await self._db(self.store.clear_pid, job.id)

    async def _gone(self, process: registry.Stamp, most: float = 10.0) -> None:
        """Wait (at most ``most`` seconds) until a killed process is gone: its files are free."""
        deadline = time.monotonic() + most
        while await asyncio.to_thread(registry.alive, process):
            if time.monotonic() > deadline:
                log.warning("ffmpeg pid %d outlived SIGKILL for %.0f s", process.pid, most)
                return
            await asyncio.sleep(0.05)

    async def _run_leased(self, job: Job, owner: str) -> None:
        cfg = self.config.jobs
        log.info("job %d: %s for %s (attempt %d)", job.id, job.path, job.login, job.attempts)
        if job.pid is not None:
            await self._take_over(job)
        state: dict[str, Any] = {"progress": job.progress, "step": job.step or "probe"}

        def progress(fraction: float, step: str) -> None:
            state["progress"], state["step"] = round(fraction, 3), step

        task = asyncio.create_task(self.pipeline.run(job, owner, progress))
        lost = False
        interval = self.beat
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
            # Shutdown: ffmpeg killed (media/run.py kills its group when cancelled), then the
            # job given back, this attempt not counted, for the next start or worker.
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await asyncio.shield(self._db(self.store.release, job, owner))
            metrics.record_job("released")
            log.info("job %d: released at shutdown (at %s); resumes later", job.id, state["step"])
            raise
        except PermanentJobError as exc:
            log.error("job %d failed: %s", job.id, exc)
            await self._db(self.store.finish, job, owner, JobState.FAILED, error=str(exc))
            metrics.record_job("failed")
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
        metrics.record_job("succeeded" if state is JobState.SUCCEEDED else "failed")
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
        metrics.record_job("dead" if state is JobState.DEAD else "retried")
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
