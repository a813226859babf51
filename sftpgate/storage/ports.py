"""The storage ports: what sftpgate asks of a database, and nothing about how.

DESIGN.md §4: the journal, the job ledger and the scheduler sit behind small
interfaces; every line of SQL lives in an adapter (SQLite today: ``sftpgate.journal``
and ``sftpgate.jobs.store``; PostgreSQL beside it), and ONE contract suite
(``tests/contract/``) runs unchanged against each adapter. huey's storage
classes are the model.

Rules for every adapter:

* **Every method blocks.** Callers run them on a thread (the journal writer's,
  the job store's executor, ``asyncio.to_thread``), never on the event loop.
  An adapter object is used by one thread at a time unless its class says more.
* **Times are unix seconds (float, UTC).** Ids are ints, session ids strings.
* **Errors:** :class:`StorageUnavailable` means the database, the disk, the
  network or a lock failed and the same call may succeed later (nothing is
  wrong with what was asked); any other exception from a write means the
  records themselves cannot be written (the journal writer then sets them
  aside one by one). :class:`SchemaBehind` means ``sftpgate db migrate`` must
  run first. Adapters translate their driver's exceptions into these.

Method names and signatures here are stable: another adapter implements them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import SftpgateError
from ..events import Event

if TYPE_CHECKING:
    from ..defender import Ban
    from ..events import Op
    from ..jobs.model import EmailState, Job, JobState
    from ..journal.query import JournalFilter

MIGRATE_COMMAND = "sftpgate db migrate"


class StorageUnavailable(SftpgateError):
    """The database cannot be reached or written now (disk, lock, network); retry later."""


class SchemaBehind(SftpgateError):
    """The database's schema is older than this sftpgate (or missing): migrate first.

    The message names :data:`MIGRATE_COMMAND`.
    """

    exit_code = 2


class LeaseLost(SftpgateError):
    """The worker no longer holds the job: its lease expired and another took it, or an admin
    cancelled it. Adapters raise this one class (or a subclass), so workers catch one."""


class SchemaAhead(SftpgateError):
    """The database's schema is newer than this sftpgate: upgrade sftpgate, do not write."""

    exit_code = 2


# -- rules: pure ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a rule decides for a completed upload: start a job, with these limits.

    ``max_attempts``: attempts before the job is ``dead``. ``queue_cap``: when
    the user already has this many queued or running (not refused) jobs, the
    job is written as a refusal (outcome ``refused``, reason in
    ``data["refused"]``; email state ``skipped`` when the user was already told
    of this backlog); None: no cap.
    """

    max_attempts: int
    queue_cap: int | None = None


# A rule: (the upload's final path, the event that completed it) -> a job to
# start, or None. Pure: no I/O, no database; it may be called on any thread.
JobRule = Callable[[str, Event], JobSpec | None]


# -- journal -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one committed batch wrote: its new job ids, in upload order."""

    jobs: tuple[int, ...] = ()


@runtime_checkable
class JournalStore(Protocol):
    """Writes the journal: sessions, operations, uploads, and the jobs uploads start."""

    def record_batch(self, events: Sequence[Event], rule: JobRule | None = None) -> BatchResult:
        """Write ``events`` in ONE transaction, in order; all of it commits or none of it.

        * An event whose ``key`` is not None and was recorded before (by any
          process on this database) is skipped entirely.
        * ``login``/``login_failed``/``logout`` upsert the session row (its
          ``node`` is ``getattr(event.session, "node", None)``; a session once
          ``ok`` stays ``ok``; ``logout`` sets ``ended_at``). Every event is one
          operations row; ids grow in the order of ``events``.
        * An event with ``upload`` set is one uploads row (path: ``path2`` for a
          rename, else ``path``); a ``complete`` one is passed to ``rule`` and,
          when it returns a :class:`JobSpec`, a queued job row is inserted in the
          same transaction (``data`` holds ``device``/``inode`` when the event
          has them; ``node`` is the session's). A rule that raises fails the batch.

        Returns the new jobs' ids. Raises :class:`StorageUnavailable` when the
        database failed (retry the whole batch later); any other exception
        means a record cannot be written (nothing of the batch was).
        """
        ...

    def close(self) -> None:
        """Let go of the database (idempotent)."""
        ...


# An opaque position in the journal's commit order, from JournalReader.scan().
# Adapters encode it as they like (SQLite: the highest operation id seen); callers
# only hand it back.
JournalCursor = str


@runtime_checkable
class JournalReader(Protocol):
    """Reads the journal for ``sftpgate journal``: query and follow. Never writes."""

    def scan(
        self,
        flt: JournalFilter,
        emit: Callable[[dict[str, Any]], None],
        *,
        transfers: bool = False,
        after: JournalCursor | None = None,
    ) -> JournalCursor:
        """Pass every operation matching ``flt`` to ``emit``, oldest first; return a cursor.

        Rows are dicts with the keys of :data:`sftpgate.journal.query.OPERATION_COLUMNS`
        then ``remote_port``, ``client_version``, ``auth_method`` and ``node`` from
        the session (None without a session row). With ``transfers``, only
        ``close`` operations that read or wrote bytes, plus ``upload_state``
        (``complete``, ``incomplete`` or None); ``flt.ops`` is then ignored.
        ``flt.limit`` keeps the last N matches. ``flt.after_id`` is ignored:
        following goes by ``after``.

        The returned cursor marks everything committed up to this scan, whether
        it matched or not, read from the same snapshot as the rows. Following is
        ``cursor = scan(flt, emit, after=cursor)`` again and again: each row
        committed is emitted exactly once, none skipped, even when transactions
        commit out of id order. ``after=None`` starts at the beginning.
        Raises ``NothingThere`` when there is no journal yet (no file, no
        tables: nothing journaled so far), :class:`SchemaBehind` when its
        schema is older, ``ValueError`` for a negative limit.
        """
        ...

    def close(self) -> None:
        """Let go of the database (idempotent)."""
        ...


@dataclass(frozen=True, slots=True)
class PruneReport:
    """Rows removed by :meth:`JournalPruner.prune`, by table."""

    removed: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.removed.values())


@runtime_checkable
class JournalPruner(Protocol):
    """Retention (``journal.retention``, ``sftpgate journal prune``)."""

    def prune(self, before: float, *, batch: int = 5000) -> PruneReport:
        """Delete journal rows older than ``before``, ``batch`` rows per transaction.

        Removed: jobs finished (not queued or running) before ``before``;
        uploads older than it that no remaining job refers to; operations
        older than it that no remaining upload refers to; sessions that ended
        before it (or, never ended, started before it) with no operation or job
        left; email log rows sent before it. The newest row of each numbered
        table stays (ids must never be handed out again). Bans are not pruned
        here (the defender forgets them itself).
        Never removed: a job that is queued or running, whatever its age, nor
        its upload, nor that upload's operation, nor that job's session.
        Raises ``ValueError`` for a batch below 1.
        Each transaction is short, so the writer is never held up for long;
        a crash between batches leaves a consistent, partly pruned journal.
        """
        ...


# -- jobs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The job queue as :meth:`JobLedger.queue_stats` sees it, cluster-wide.

    ``queued``: jobs waiting (due now or after a retry's backoff); ``running``: jobs
    leased; ``oldest_queued_at``: ``created_at`` of the oldest queued job, None when
    none waits.
    """

    queued: int
    running: int
    oldest_queued_at: float | None


@runtime_checkable
class Scheduler(Protocol):
    """Who runs which job: leases with expiry, so a dead worker's job is taken over.

    What ``sftpgate.jobs.store.JobStore`` implements on SQLite. Every method
    that takes ``owner`` acts only while that owner holds the job's lease
    (fencing: a worker whose lease expired and was taken over changes
    nothing). Otherwise :meth:`heartbeat` returns False, :meth:`release`,
    :meth:`set_pid` do nothing, and :meth:`finish`, :meth:`retry_later` and
    the ledger's owner methods raise ``LeaseLost`` (an ``SftpgateError``).
    """

    def lease(self, owner: str, lease_seconds: float, per_user: int | None = None) -> Job | None:
        """Take the next job for ``owner`` for ``lease_seconds``, or None.

        Takes a queued job whose ``next_run_at`` has come, or a running one
        whose lease has expired (recovery by lease expiry: its worker is
        gone; not one out of attempts: :meth:`bury_abandoned`). Users take
        turns (the one served longest ago first; their oldest due job); users
        with ``per_user`` live-leased jobs wait. The
        job comes back ``running`` with ``attempts`` + 1. Two owners never
        hold the same job.
        """
        ...

    def heartbeat(
        self,
        job_id: int,
        owner: str,
        lease_seconds: float,
        *,
        progress: float | None = None,
        step: str | None = None,
    ) -> bool:
        """Extend the lease to now + ``lease_seconds`` (and note progress/step).

        False when the lease is lost (cancelled, or taken over after expiry):
        the worker must stop.
        """
        ...

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
        """End a running job in ``state`` (lease dropped); ``journal`` adds its operation row.

        Raises ``LeaseLost`` (journaling nothing) when ``owner`` lost the lease.
        """
        ...

    def retry_later(self, job: Job, owner: str, error: str, backoff: float) -> JobState:
        """Queue again after ``backoff`` s, or ``dead`` when out of attempts; the state set.

        Raises ``LeaseLost`` when ``owner`` lost the lease.
        """
        ...

    def release(self, job: Job, owner: str) -> None:
        """Give a job back (shutdown): queued now, this attempt not counted."""
        ...

    def bury_abandoned(self, now: float | None = None) -> list[Job]:
        """Running jobs whose lease expired after their last attempt (``attempts`` ≥
        ``max_attempts``; released attempts do not count): ``dead``, with ``last_error``
        saying so, the lease owner cleared (the old worker is fenced), ``sending`` email made
        ``uncertain``; ``pid`` kept, for the caller to kill a leftover ffmpeg. Each job is
        returned to one caller only, however many race. :meth:`lease` never takes them.
        """
        ...

    def set_pid(self, job_id: int, owner: str, pid: int | None, marker: str | None) -> None:
        """Record the job's ffmpeg pid and a marker its command line holds (pid reuse)."""
        ...

    def clear_pid(self, job_id: int) -> None:
        """Forget the job's pid (its leftover process was dealt with)."""
        ...


@runtime_checkable
class JobLedger(Protocol):
    """What a job did: steps, progress, outputs, email state; and the admin's view."""

    def get(self, job_id: int) -> Job:
        """The job; raises ``NotFoundError``."""
        ...

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
        """Record ``step`` started, finished or failed, merge ``data``; the job after it.

        Raises ``SftpgateError`` when ``owner`` lost the lease.
        """
        ...

    def set_email_state(
        self, job_id: int, owner: str, state: EmailState, error: str | None = None
    ) -> None:
        """Set the job's email state (``none → sending → sent``; see EmailState)."""
        ...

    def claim_content(
        self, job: Job, owner: str, sha256: str, window: float, now: float
    ) -> Job | None:
        """Store ``job``'s content hash, or return the earlier live job of the same content."""
        ...

    def reserve_email(
        self, job: Job, owner: str, limit: int, window: float, now: float
    ) -> int | None:
        """An email slot (its log id, job ``sending``), or None (job set ``digest``)."""
        ...

    def unreserve_email(self, job: Job, owner: str, log_id: int, error: str) -> None:
        """The email was not accepted: free the slot, email state ``none``."""
        ...

    def digests_due(self, limit: int, window: float, now: float) -> list[str]:
        """Logins with notices waiting for a digest and a free email slot now."""
        ...

    def claim_digest(
        self, login: str, limit: int, window: float, now: float, most: int = 100
    ) -> tuple[int, list[Job]] | None:
        """Take a user's waiting notices for one digest (jobs ``sending``), or None."""
        ...

    def digest_sent(
        self, log_id: int, jobs: list[Job], state: EmailState, error: str | None
    ) -> None:
        """End a digest: ``sent``/``failed``; ``digest`` again frees its slot."""
        ...

    def recover_emails(self) -> list[int]:
        """Finished jobs still ``sending`` become ``uncertain`` (never resent); their ids."""
        ...

    def upload_time(self, upload_id: int | None) -> float | None:
        """When upload ``upload_id`` was journaled, or None (no such row, or None given)."""
        ...

    def retry(self, job_id: int) -> Job:
        """An admin queues a failed, dead or cancelled job again; raises otherwise."""
        ...

    def cancel(self, job_id: int) -> Job:
        """An admin cancels a queued or running job; raises otherwise."""
        ...

    def list(
        self, *, states: tuple[str, ...] = (), login: str | None = None, limit: int = 100
    ) -> list[Job]:
        """The last ``limit`` jobs matching, oldest first."""
        ...

    def queue_stats(self) -> QueueStats:
        """How many jobs wait and run over the whole database (every node), and since when
        the oldest queued one waits: what the metrics show at each scrape. One cheap query."""
        ...


@runtime_checkable
class JobStore(Scheduler, JobLedger, Protocol):
    """The job store: a :class:`Scheduler` and a :class:`JobLedger` on one database."""

    def close(self) -> None:
        """Let go of the database."""
        ...


# -- bans and quotas --------------------------------------------------------------


@runtime_checkable
class BanStore(Protocol):
    """The defender's bans, shared by every gateway on the database."""

    def upsert(self, bans: Iterable[Ban]) -> None:
        """Write ``bans``; a ban replaces the stored one of its address only if newer."""
        ...

    def load(self, now: float, memory: float) -> tuple[list[Ban], list[Ban]]:
        """(every ban on or ended less than ``memory`` s ago, those that ended since last look).

        The second list is marked lifted in the same transaction, so exactly one
        caller (of all gateways) journals each ban's end. Older rows are deleted.
        """
        ...

    def list(self) -> list[Ban]:
        """Every stored ban, by address."""
        ...

    def active(self, now: float) -> int:
        """How many addresses are banned at ``now`` (every gateway's bans): for the metrics."""
        ...

    def remove(self, address: str) -> Ban | None:
        """Delete the ban of ``address``; the ban it was, or None."""
        ...

    def journal(self, event: Event) -> None:
        """Journal ``event`` (an admin's ban or unban) in its own transaction."""
        ...

    def close(self) -> None:
        """Let go of the database."""
        ...


@runtime_checkable
class UsageLedger(Protocol):
    """Users' quota usage (the same as ``sftpgate.frontdoor.limits.UsageLedger``).

    Changes add up (``bytes = bytes + n``), so gateways sharing the database
    never overwrite each other's sums. Safe to call from several threads.
    """

    def load(self, login: str) -> tuple[int, int] | None:
        """The stored (bytes, files) of ``login``, or None if never scanned."""
        ...

    def store(self, login: str, used_bytes: int, files: int) -> None:
        """Replace the stored usage of ``login`` (after a scan)."""
        ...

    def add(self, login: str, used_bytes: int, files: int) -> tuple[int, int] | None:
        """Add (never below 0); the new totals, or None if nothing is stored."""
        ...

    def forget(self, login: str) -> None:
        """Drop the stored usage of ``login``."""
        ...

    def close(self) -> None:
        """Let go of the database."""
        ...


# -- the admin API ----------------------------------------------------------------


class Conflict(SftpgateError):
    """What an admin asked clashes with the records as they are now (HTTP 409)."""


@dataclass(frozen=True, slots=True)
class ReplayFile:
    """The upload's file as the admin API found it on disk, for :meth:`AdminStore.replay`."""

    device: int
    inode: int


@runtime_checkable
class AdminStore(Protocol):
    """What the admin API (``sftpgate/api/``) reads and writes beyond the other ports:
    its own journal rows, live sessions, disconnect requests and upload replays.

    Disconnect requests are rows, not messages: every gateway process (of every
    node on the database) polls :meth:`disconnects` and ends the sessions it
    holds, so a request reaches the one process that has the session.
    """

    def journal(self, events: Sequence[Event]) -> None:
        """Journal ``events`` (admin actions, API requests) in ONE transaction."""
        ...

    def sessions(
        self, *, node: str | None = None, login: str | None = None
    ) -> list[dict[str, Any]]:
        """Sessions logged in and not ended, oldest first: the session row's columns, plus
        ``disconnect_requested_at`` (None unless an admin asked)."""
        ...

    def request_disconnect(self, session_id: str, by: str, now: float) -> dict[str, Any]:
        """Ask every gateway to end live session ``session_id``; the session (as
        :meth:`sessions` gives it). Raises ``NotFoundError`` when no such session is
        live. Asking twice keeps the first request."""
        ...

    def disconnects(self, now: float, expire: float) -> list[str]:
        """Session ids with a request not yet acted on; requests older than ``expire`` s
        (their session is on no gateway any more) are dropped."""
        ...

    def disconnected(self, session_id: str, now: float) -> str | None:
        """Mark the request of ``session_id`` done; who asked, or None when another
        process did first (so exactly one journals it)."""
        ...

    def upload(self, upload_id: int) -> dict[str, Any] | None:
        """The uploads row (plus ``device``/``inode`` of its newest job's data, None
        without), or None."""
        ...

    def replay(self, upload_id: int, found: ReplayFile, max_attempts: int) -> int:
        """Queue a new job for complete upload ``upload_id`` on the file ``found``; its id.

        In one transaction: raises ``NotFoundError`` for no such upload,
        :class:`Conflict` when it is not complete or a job of it is queued or
        running. The job is inserted as the journal inserts an upload's job
        (on PostgreSQL, handed to Procrastinate by the outbox), with
        ``data["replay"] = True``.
        """
        ...

    def close(self) -> None:
        """Let go of the database."""
        ...


# -- gateway processes and the sessions they leave ----------------------------------


@dataclass(frozen=True, slots=True)
class GatewayRow:
    """One gateway process as the registry knows it (``gateways`` table; see journal/sweep.py).

    ``boot`` and ``start`` are those of :class:`sftpgate.jobs.registry.Stamp`."""

    id: str
    node: str
    pid: int
    boot: str
    start: int
    started_at: float
    heartbeat_at: float


@runtime_checkable
class GatewayRegistry(Protocol):
    """Live gateway processes (each heartbeats its row) and the ending of the sessions of one
    that died without closing them. Every session the journal inserts names its process
    (``sessions.process``, from :func:`sftpgate.events.current_process`)."""

    def register(self, row: GatewayRow) -> None:
        """Insert (or replace) the row of a gateway process."""
        ...

    def heartbeat(self, gateway_id: str, now: float) -> bool:
        """Renew the row's heartbeat; False when the row is gone (a sweeper took this
        process for dead and ended its sessions)."""
        ...

    def gateways(self) -> list[GatewayRow]:
        """Every registered gateway process, oldest first."""
        ...

    def end_process(self, row: GatewayRow, now: float, why: str, upload_why: str) -> list[str]:
        """Claim dead process ``row`` and end its sessions, in ONE transaction; their ids.

        The claim is a conditional delete of the row as read (same heartbeat): a process
        that heartbeated since, or a sweeper elsewhere that claimed it first, makes this a
        no-op returning ``[]``, so exactly one sweeper in the cluster ends each session. Each
        session still open gets ``ended_at = now`` and a ``logout`` row with message
        ``why``; each upload the journal saw opened for write in it and never closed gets an
        ``incomplete`` uploads row (message ``upload_why``); a disconnect request pending on
        it is marked done."""
        ...

    def retire(self, gateway_id: str) -> bool:
        """A clean exit: delete the row unless sessions of it are still open in the journal
        (then a sweeper ends them once this process is gone). Whether it was deleted."""
        ...

    def close(self) -> None:
        """Let go of the database."""
        ...


# -- the database as a whole -----------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """One database: its schema, and a factory for every port on it.

    Built by :func:`sftpgate.storage.open_backend` from the config. Each
    factory opens its own connection (or takes one from a pool) and checks the
    schema: it raises :class:`SchemaBehind` when the schema is older than
    :attr:`latest` (:class:`SchemaAhead` when newer).
    """

    name: str  # "sqlite", "postgresql"

    @property
    def latest(self) -> int:
        """The schema version this sftpgate needs (its last migration's)."""
        ...

    def schema_version(self) -> int:
        """The database's schema version now; 0 when it has none (or does not exist)."""
        ...

    def migrate(self) -> list[int]:
        """Create or upgrade the schema to :attr:`latest`; the versions applied, in order.

        Each migration runs in its own transaction with its version bump; two
        processes migrating at once do not both apply one. Raises
        :class:`SchemaAhead` for a newer database.
        """
        ...

    def journal(self) -> JournalStore: ...

    def reader(self) -> JournalReader: ...

    def pruner(self) -> JournalPruner: ...

    def jobs(self) -> JobStore: ...

    def bans(self) -> BanStore: ...

    def usage(self) -> UsageLedger: ...

    def admin(self) -> AdminStore: ...

    def gateways(self) -> GatewayRegistry: ...
