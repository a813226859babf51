"""Procrastinate runs the jobs on PostgreSQL (DESIGN.md §5, issue 18 point 5).

Our ``jobs`` table stays the truth (state, lease, steps, email state); Procrastinate
is how a job reaches a worker on any host. Three things make that safe:

- **An outbox.** The job row commits with its upload. A hand-over claims rows not yet
  handed (``handed_at``, with SKIP LOCKED: concurrent hand-overs never take one row
  twice) and defers each to Procrastinate with the queueing lock ``sftpgate-job-<id>``.
  A hand-over cut off between claim and defer is found by a later sweep (a stale claim
  with nothing in Procrastinate) and handed over again; one that did reach Procrastinate
  meets the queueing lock (``AlreadyEnqueued``), and a second Procrastinate job that
  slips in after the first started finds our row leased or finished and does nothing.
  Never lost, never run twice at once.
- **Our own per-job heartbeat.** A task leases our row (``lease_job``) and the runner
  heartbeats that lease while ffmpeg runs, for an hour if need be. Procrastinate's
  stalled-job API only says a *worker* went quiet (issue #702: liveness of a long job
  is ours to judge), so a stalled Procrastinate job is retried only once our lease has
  expired too.
- **A periodic sweep** (every few seconds, a queueing lock and no ``lock``, so a sweep
  that stalls never blocks the next; Procrastinate issue #1408): retries stalled jobs
  through ``get_stalled_jobs``/``retry_job``, and hands over what is waiting. Issue
  #1518 (jobs left ``doing`` forever): since Procrastinate 3.10 (our floor) a pruned
  worker's jobs lose their ``worker_id`` and ``get_stalled_jobs`` returns them; and a
  running job whose lease expired with no Procrastinate job left to run it is handed
  over again by the outbox (``PgJobStore.to_hand_over``). Worker names carry the
  process id, so a restarted worker never heartbeats for a dead one's jobs.
- **A poison job ends.** One whose lease expired after its last attempt (its worker
  killed every time) is neither retried nor handed over again: its Procrastinate job is
  finished ``failed``, and the pool's keepalive (jobs/worker.py) makes our row ``dead``
  (``PgJobStore.bury_abandoned``) and tells the admin once.

Cancel: an admin's ``cancel`` ends our row; the runner's next heartbeat fails and it
stops the pipeline, killing ffmpeg.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from procrastinate import App, JobContext, PsycopgConnector, RetryStrategy
from procrastinate import jobs as pjobs
from procrastinate.exceptions import AlreadyEnqueued, UniqueViolation

from ...errors import NotFoundError
from ...jobs import registry
from ...jobs.model import ACTIVE, Job, JobState
from .jobs import PgJobStore

if TYPE_CHECKING:
    from ...config import Config

log = logging.getLogger(__name__)

QUEUE = "sftpgate"
RUN_TASK = "sftpgate.run_job"
SWEEP_TASK = "sftpgate.sweep"

# Runs a job leased for ``owner`` to its end: heartbeats the lease, finishes or retries it;
# returns when the lease is lost (cancelled or taken over). jobs/worker.py's runner.
Runner = Callable[[Job, str], Awaitable[None]]


class _Later(Exception):
    """The job cannot run yet; Procrastinate retries this task a second later."""


def queueing_lock(job_id: int) -> str:
    return f"sftpgate-job-{job_id}"


def _abandoned(job: Job, now: float) -> bool:
    """Running, its lease expired, out of attempts: never run again (a poison job). Pure."""
    return (
        job.state is JobState.RUNNING
        and (job.lease_expires_at or 0) < now
        and job.attempts >= job.max_attempts
    )


class JobQueue:
    """Our job rows handed to Procrastinate and run by its workers (see the module)."""

    def __init__(
        self,
        url: str,
        store: PgJobStore,
        runner: Runner,
        *,
        node: str,
        lease_seconds: float,
        stalled_after: float = 30.0,
        sweep_cron: str = "* * * * * */5",
        worker_id: str | None = None,
        per_user: int | None = None,
        hand_over_grace: float = 30.0,
    ) -> None:
        self.hand_over_grace = hand_over_grace
        self.per_user = per_user  # jobs.per_user_running
        # Lease owners are `<worker id>/<slot>` (jobs/registry.py), so the registry can tell
        # whose jobs a dead worker held.
        self.worker_id = worker_id or registry.new_worker_id(node)
        self.store = store
        self.runner = runner
        self.node = node
        self.lease_seconds = lease_seconds
        self.stalled_after = stalled_after
        self.app = App(connector=PsycopgConnector(conninfo=url, min_size=1, max_size=4))
        # A job not yet due, or whose user is at jobs.per_user_running, raises _Later: the same
        # Procrastinate job is retried a second later (no new one, nothing handed twice).
        self.run_task = self.app.task(
            name=RUN_TASK,
            queue=QUEUE,
            pass_context=True,
            retry=RetryStrategy(wait=1, retry_exceptions={_Later}),
        )(self._run)

        async def sweep(timestamp: int) -> None:
            await self.sweep()

        periodic = self.app.periodic(cron=sweep_cron, periodic_id="sweep")
        periodic(self.app.task(name=SWEEP_TASK, queue=QUEUE, queueing_lock=SWEEP_TASK)(sweep))

    async def open(self) -> None:
        await self.app.open_async()

    async def close(self) -> None:
        await self.app.close_async()

    async def run_worker(self, concurrency: int, **options: Any) -> None:
        """A Procrastinate worker on our queue until cancelled (its name names this process)."""
        await self.app.run_worker_async(
            queues=[QUEUE],
            name=f"{self.node}/{os.getpid()}",
            concurrency=concurrency,
            install_signal_handlers=False,
            **options,
        )

    # -- the outbox -------------------------------------------------------------------

    async def hand_over(self) -> list[int]:
        """Hand every job not yet handed to Procrastinate; the ids handed (or found there)."""
        handed = []
        claimed = await asyncio.to_thread(
            self.store.to_hand_over, time.time(), grace=self.hand_over_grace
        )
        for n, (job_id, due, turn) in enumerate(claimed):
            deferrer = self.run_task.configure(
                queueing_lock=queueing_lock(job_id),
                schedule_at=datetime.datetime.fromtimestamp(due, datetime.UTC),
                priority=-turn,  # users take turns: everyone's first job, then second ...
            )
            try:
                # AlreadyEnqueued: a hand-over cut off before; it waits there once.
                with contextlib.suppress(AlreadyEnqueued):
                    await deferrer.defer_async(job_id=job_id)
            except BaseException:
                for left, _, _ in claimed[n:]:  # not handed: claimable again at once
                    await asyncio.shield(asyncio.to_thread(self.store.unhand, left))
                raise
            handed.append(job_id)
        return handed

    # -- running ----------------------------------------------------------------------

    async def _run(self, context: JobContext, job_id: int) -> None:
        pjob = context.job.id
        owner = registry.owner_of(self.worker_id, f"pq{pjob}")
        job = await asyncio.to_thread(
            self.store.lease_job, job_id, owner, self.lease_seconds, self.per_user
        )
        if job is None:
            ours = await self._ours(job_id)
            if ours is not None and ours.state is JobState.QUEUED:
                raise _Later(f"job {job_id}: not due, or its user is at their cap")
            return  # held by a live lease, finished or cancelled: nothing to do
        await self.runner(job, owner)

    # -- stalled jobs -----------------------------------------------------------------

    async def retry_stalled(self) -> list[int]:
        """Retry Procrastinate jobs whose worker went quiet, once our lease says the job is
        dead too; clear those whose job ended. The Procrastinate job ids retried."""
        manager = self.app.job_manager
        stalled = list(
            await manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=self.stalled_after)
        )
        retried: list[int] = []
        now = time.time()
        for pjob in {j.id: j for j in stalled}.values():
            assert pjob.id is not None
            job_id = pjob.task_kwargs.get("job_id")
            ours = await self._ours(job_id)
            if (
                ours is not None
                and ours.state is JobState.RUNNING
                and (ours.lease_expires_at or 0) >= now
            ):
                continue  # its runner still heartbeats our lease (#702): alive, just long
            if ours is not None and ours.state.value in ACTIVE and not _abandoned(ours, now):
                try:
                    await manager.retry_job(pjob)
                except UniqueViolation:  # handed again meanwhile: that one runs it
                    await manager.finish_job(pjob, pjobs.Status.FAILED, delete_job=False)
                    continue
                log.warning("job %s: its worker stalled; retried", job_id)
                retried.append(pjob.id)
            else:
                # The job ended, or is not ours (e.g. a stalled sweep), or its lease expired
                # after its last attempt (a workers' keepalive buries it: bury_abandoned):
                # nothing to run.
                await manager.finish_job(pjob, pjobs.Status.FAILED, delete_job=False)
        return retried

    async def _ours(self, job_id: object) -> Job | None:
        if not isinstance(job_id, int):
            return None
        try:
            return await asyncio.to_thread(self.store.get, job_id)
        except NotFoundError:
            return None

    async def sweep(self) -> None:
        """The periodic task: stalled jobs first, then the outbox."""
        await self.retry_stalled()
        await self.hand_over()


class _Waker:
    """Hands committed jobs to Procrastinate when woken (from the journal writer's thread),
    not at the next sweep. A hand-over that fails is left to a sweep."""

    queue: JobQueue
    _loop: asyncio.AbstractEventLoop | None
    _handing: set[asyncio.Task[list[int]]]

    def wake(self) -> None:
        """Thread-safe: jobs were committed; hand them over now."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        task = asyncio.create_task(self.queue.hand_over())
        self._handing.add(task)
        task.add_done_callback(self._handed)

    def _handed(self, task: asyncio.Task[list[int]]) -> None:
        self._handing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("jobs: hand-over failed (%s); a sweep retries", task.exception())


class QueuedWorkers(_Waker):
    """jobs/worker.py's pool on PostgreSQL, with Procrastinate deciding which job runs where.

    The pool keeps its registry row, digests, takeover of leftover ffmpeg and its runner
    (heartbeats, finish, retry); its own leasing loops are off (``jobs.workers`` of them
    become Procrastinate's concurrency). A commit that created jobs hands them over at once
    (``wake``); the periodic sweep catches anything else. Looks like a ``WorkerPool`` to
    gateway.py: ``start``, ``wake``, ``stop``, ``worker_id``, ``store``.
    """

    def __init__(self, config: Config, url: str, store: PgJobStore) -> None:
        from ...jobs.worker import WorkerPool

        jobs = dataclasses.replace(config.jobs, workers=0)
        # WorkerPool is typed to SQLite's JobStore; PgJobStore offers what it uses.
        self.pool = WorkerPool(dataclasses.replace(config, jobs=jobs), store)  # type: ignore[arg-type]
        self.store = store
        self.worker_id = self.pool.worker_id
        self.concurrency = config.jobs.workers
        self.poll = config.jobs.poll_interval
        self.queue = JobQueue(
            url,
            store,
            self.pool._run,  # the pool's runner for one leased job
            node=config.server.node,
            lease_seconds=config.jobs.lease_seconds,
            # A job is only retried once our lease has expired too: no need to wait longer.
            stalled_after=config.jobs.lease_seconds,
            worker_id=self.pool.worker_id,
            per_user=config.jobs.per_user_running,
        )
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handing: set[asyncio.Task[list[int]]] = set()

    # A reload (SIGHUP) sets these as on a WorkerPool; they reach the pool and its pipeline.
    @property
    def config(self) -> Config:
        return self.pool.config

    @config.setter
    def config(self, config: Config) -> None:
        self.pool.config = config

    @property
    def pipeline(self) -> Any:
        return self.pool.pipeline

    @property
    def running(self) -> int:
        return self.pool.running

    def alive(self) -> bool:
        """Whether the pool and Procrastinate's worker both run (for ``/readyz``)."""
        return self.pool.alive() and self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.pool.start()
        await self.queue.open()
        await self.queue.sweep()
        lease = self.pool.config.jobs.lease_seconds
        self._task = asyncio.create_task(
            self.queue.run_worker(
                self.concurrency,
                fetch_job_polling_interval=self.poll,
                update_heartbeat_interval=min(10.0, lease / 3),
                stalled_worker_timeout=lease,
                # Stop means release: Procrastinate cancels our running task at once (its
                # default waits for it to end, a whole transcode); our runner kills ffmpeg
                # and gives the row back, the attempt not counted (``PgJobStore.release``
                # clears handed_at: the outbox hands it over again).
                shutdown_graceful_timeout=0,
            )
        )

    async def stop(self) -> None:
        """Stop Procrastinate's worker (running jobs are released by the pool's runner), then
        the pool."""
        self._loop = None  # later wakes do nothing; a sweep elsewhere hands their jobs over
        for task in [*self._handing, *([self._task] if self._task else [])]:
            task.cancel()
        await asyncio.gather(
            *self._handing, *([self._task] if self._task else []), return_exceptions=True
        )
        self._task = None
        await self.queue.close()
        await self.pool.stop()


class HandOver(_Waker):
    """A gateway that runs no workers (``jobs.workers: 0``, the cluster's gateways) hands the
    jobs its commits made to Procrastinate at once, rather than leaving them to the next
    sweep of a worker host. Runs no task itself."""

    def __init__(self, url: str, store: PgJobStore, node: str) -> None:
        async def never(job: Job, owner: str) -> None:  # this process runs no worker
            raise AssertionError("a hand-over process ran a job")

        self.store = store
        self.queue = JobQueue(url, store, never, node=node, lease_seconds=60)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handing: set[asyncio.Task[list[int]]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.queue.open()

    async def stop(self) -> None:
        await asyncio.gather(*self._handing, return_exceptions=True)
        await self.queue.close()
        await asyncio.to_thread(self.store.close)
