"""Prometheus metrics: the families, where their numbers come from, and one host's exposition.

Counting happens in few places: the journal writer sees every session, login,
operation and upload event (:func:`record_events`, on its own thread, once per
batch) and times its commits; the worker pool counts job outcomes, the pipeline
times its steps, ``notify.smtp`` counts emails. The queue and the bans are read
from the database at scrape time (:class:`StorageCollector`), cluster-wide.

Label values are always from a closed set (an :class:`~sftpgate.events.Op`, an
SFTP status name, an auth method we know): never a login, an address or a path,
which a client chooses and which would make one series each.

Processes: with ``server.processes`` > 1 the supervisor calls :func:`configure`
with a private folder before it starts its children; prometheus-client's
multiprocess mode then keeps every process's numbers in files there
(``PROMETHEUS_MULTIPROC_DIR``, inherited by the children), which the
supervisor sums at each scrape. A single process keeps them in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .events import Event, Op, UploadState
from .private import private_dir
from .sftp.constants import status_name

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Closed sets of label values: anything else is counted as "other".
AUTH_METHODS = frozenset({"password", "publickey", "keyboard-interactive", "none", "openssh"})
_SFTP_STATUSES = frozenset(status_name(code) for code in range(32))
STATUSES = _SFTP_STATUSES | {
    "refused",
    "rejected",
    "duplicate",
    "journal_error",
    "journal_timeout",
}
JOB_OUTCOMES = ("succeeded", "failed", "retried", "dead", "released")
EMAIL_RESULTS = ("sent", "transient_failure", "permanent_failure")
STEPS = ("probe", "transcode", "sidecar", "email")
_STEP_SET = frozenset(STEPS)
_COUNTED = frozenset({Op.LOGIN, Op.LOGIN_FAILED, Op.LOGOUT, Op.CLOSE})
_MAX_BYTES = 2**62  # a byte count above this is not one (a hostile tap's record)

# Seconds: a step of a small clip takes ~0.1 s, a long film's transcode an hour.
_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Families:
    """Every family this process updates. Built by :func:`families` once :func:`configure`
    has chosen in-memory or multiprocess values."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.sessions_active = Gauge(
            "sftpgate_sessions_active",
            "SFTP sessions logged in now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions = Counter(
            "sftpgate_sessions_total", "SFTP sessions that logged in", registry=r
        )
        self.logins = Counter(
            "sftpgate_logins_total",
            "login attempts, by auth method and result (ok, failed)",
            ["method", "result"],
            registry=r,
        )
        self.received = Counter(
            "sftpgate_received_bytes_total", "bytes clients wrote (uploads)", registry=r
        )
        self.sent = Counter(
            "sftpgate_sent_bytes_total", "bytes clients read (downloads)", registry=r
        )
        self.uploads = Counter(
            "sftpgate_uploads_total",
            "uploads that ended, by state (complete, incomplete)",
            ["state"],
            registry=r,
        )
        self.operations = Counter(
            "sftpgate_operations_total",
            "journaled operations, by op and status",
            ["op", "status"],
            registry=r,
        )
        self.batch = Histogram(
            "sftpgate_journal_batch_records",
            "records per journal commit",
            registry=r,
            buckets=_BATCH_BUCKETS,
        )
        self.commit = Histogram(
            "sftpgate_journal_commit_duration_seconds",
            "time of one journal commit (a batch)",
            registry=r,
            buckets=_COMMIT_BUCKETS,
        )
        self.commit_failures = Counter(
            "sftpgate_journal_commit_failures_total",
            "journal commits that failed on the disk, the lock or the database (retried)",
            registry=r,
        )
        self._registry = r
        self._writable: Gauge | None = None
        self.jobs = Counter(
            "sftpgate_job_outcomes_total",
            "job attempts' ends: succeeded, failed, retried, dead, released",
            ["outcome"],
            registry=r,
        )
        self.steps = Histogram(
            "sftpgate_pipeline_step_duration_seconds",
            "time of one pipeline step, by step and result (ok, error)",
            ["step", "result"],
            registry=r,
            buckets=_STEP_BUCKETS,
        )
        self.emails = Counter(
            "sftpgate_emails_total",
            "emails handed to SMTP: sent, transient_failure, permanent_failure",
            ["result"],
            registry=r,
        )
        # Every label value known up front: a family shows 0, not nothing, before it moves.
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(outcome)
        for result in EMAIL_RESULTS:
            self.emails.labels(result)
        for state in UploadState:
            self.uploads.labels(state.value)
        for step in STEPS:
            self.steps.labels(step, "ok")
        for op in (Op.LOGIN, Op.LOGOUT, Op.CLOSE):
            self.operations.labels(op.value, "ok")
        for method in ("password", "publickey"):
            for result in ("ok", "failed"):
                self.logins.labels(method, result)

    @property
    def journal_writable(self) -> Gauge:
        """Made by the first journal writer of the process only: a process without one (the
        supervisor) must not hold a 0 that the least over processes would report."""
        if self._writable is None:
            with _lock:
                if self._writable is None:
                    self._writable = Gauge(
                        "sftpgate_journal_writable",
                        "1 while each journal writer's last commit succeeded, else 0 (the "
                        "least over processes)",
                        registry=self._registry,
                        multiprocess_mode="livemin",
                    )
        return self._writable


_lock = threading.Lock()
_families: Families | None = None
_registry = CollectorRegistry()  # the families of a single process


def configure(directory: Path | None) -> None:
    """Choose where this process's numbers live, before any is counted.

    ``directory``: multiprocess mode there (made 0700 and emptied, then named in
    ``PROMETHEUS_MULTIPROC_DIR`` for this process and its children); None: in
    memory (a ``PROMETHEUS_MULTIPROC_DIR`` from outside is dropped). Raises
    ``OSError`` when the folder cannot be made.
    """
    global _families, _registry
    if directory is not None:
        private_dir(directory)
        for entry in os.scandir(directory):
            if entry.name.endswith(".db") and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        os.environ[MULTIPROC_ENV] = str(directory)
    else:
        os.environ.pop(MULTIPROC_ENV, None)
        os.environ.pop(MULTIPROC_ENV.lower(), None)
    # No `_created` twin beside each counter: half the lines, for nothing alerts on.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    with _lock:
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        _families = None
        _registry = CollectorRegistry()


def multiproc_dir() -> Path | None:
    """The multiprocess folder this process writes to, or None (in memory)."""
    name = os.environ.get(MULTIPROC_ENV)
    return Path(name) if name else None


def families() -> Families:
    """This process's families (made at first use)."""
    global _families
    found = _families
    if found is None:
        with _lock:
            if _families is None:
                _families = Families(None if multiproc_dir() is not None else _registry)
            found = _families
    return found


def process_dead(pid: int) -> None:
    """A child with multiprocess files died: its live gauges (sessions) stop counting."""
    directory = multiproc_dir()
    if directory is not None:
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


# -- what the code calls -----------------------------------------------------------------


def _label(value: object, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else "other"


def _byte_count(value: object) -> int:
    return value if type(value) is int and 0 <= value < _MAX_BYTES else 0


def record_events(events: Iterable[Event]) -> None:
    """Count a batch of journal events (the writer's thread; once per batch, not per event).

    ~0.5 µs an event: the loop only tallies; labels are checked once per distinct value.
    """
    tally: dict[tuple[Op | None, str | None], int] = {}
    logins: collections.Counter[tuple[str, str]] = collections.Counter()
    uploads: collections.Counter[str] = collections.Counter()
    opened = ended = received = sent = 0
    for event in events:
        op: Op | None = getattr(event, "op", None)
        if type(op) is not Op:  # a malformed record (set aside by the writer): not counted
            op = None
        status = getattr(event, "status", None)
        key = (op, status if type(status) is str else None)
        tally[key] = tally.get(key, 0) + 1
        if op in _COUNTED:
            if op is Op.CLOSE:
                received += _byte_count(event.bytes_written)
                sent += _byte_count(event.bytes_read)
            elif op is Op.LOGOUT:
                ended += 1
            else:
                method = _label(getattr(event.session, "auth_method", None), AUTH_METHODS)
                ok = op is Op.LOGIN and status == "ok"
                logins[(method, "ok" if ok else "failed")] += 1
                opened += ok
        upload = getattr(event, "upload", None)
        if upload is not None and isinstance(upload, UploadState):
            uploads[upload.value] += 1
    ops: collections.Counter[tuple[str, str]] = collections.Counter()
    for (op, status), count in tally.items():
        if op is not None:
            ops[(op.value, _label(status, STATUSES))] += count
    f = families()
    for (op_name, status), count in ops.items():
        f.operations.labels(op_name, status).inc(count)
    for (method, result), count in logins.items():
        f.logins.labels(method, result).inc(count)
    for state, count in uploads.items():
        f.uploads.labels(state).inc(count)
    if opened:
        f.sessions.inc(opened)
    if opened != ended:
        f.sessions_active.inc(opened - ended)
    if received:
        f.received.inc(received)
    if sent:
        f.sent.inc(sent)


def record_commit(records: int, seconds: float) -> None:
    """A journal batch committed."""
    f = families()
    f.batch.observe(records)
    f.commit.observe(seconds)
    f.journal_writable.set(1)


def record_commit_failure() -> None:
    """A journal commit failed on the disk, the lock or the database (it is retried)."""
    f = families()
    f.commit_failures.inc()
    f.journal_writable.set(0)


def record_job(outcome: str) -> None:
    """A job attempt ended (one of :data:`JOB_OUTCOMES`)."""
    families().jobs.labels(_label(outcome, frozenset(JOB_OUTCOMES))).inc()


@contextlib.contextmanager
def step_timer(step: str) -> Iterator[None]:
    """Time one pipeline step; an exception out of it is an ``error`` (and goes on)."""
    start = time.monotonic()
    result = "error"
    try:
        yield
        result = "ok"
    except asyncio.CancelledError:  # released at shutdown: neither done nor failed
        result = ""
        raise
    finally:
        if result:
            families().steps.labels(_label(step, _STEP_SET), result).observe(
                time.monotonic() - start
            )


# -- SMTP's last result (for /readyz) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpResult:
    result: str  # one of EMAIL_RESULTS
    at: float

    @property
    def ok(self) -> bool:
        return self.result == "sent"


_smtp_last: SmtpResult | None = None


def record_email(result: str) -> None:
    """An email was handed to SMTP (one of :data:`EMAIL_RESULTS`); kept for readiness."""
    global _smtp_last
    label = _label(result, frozenset(EMAIL_RESULTS))
    families().emails.labels(label).inc()
    _smtp_last = SmtpResult(label, time.time())


def smtp_last() -> SmtpResult | None:
    """The last email's result in this process, or None before the first."""
    return _smtp_last


# -- the exposition --------------------------------------------------------------------------


class StorageCollector:
    """The queue and the bans, read from the database at scrape time (cluster-wide).

    ``jobs``/``bans`` open the ports (``open_backend(config).jobs`` ...); they are opened on
    the first scrape and used on the scrape's thread only. A read is reused for
    ``min_interval`` seconds, so a flood of scrapes is not a flood of queries. A failed read
    gives ``sftpgate_storage_up 0`` and no queue or ban numbers.
    """

    def __init__(
        self,
        jobs: Callable[[], Any] | None,
        bans: Callable[[], Any] | None,
        *,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._openers = {"jobs": jobs, "bans": bans}
        self._ports: dict[str, Any] = {}
        self._min_interval = min_interval
        self._clock = clock
        self._cached: tuple[float, list[Metric]] | None = None
        self._logged = 0.0

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self._min_interval:
            return self._cached[1]
        up = GaugeMetricFamily(
            "sftpgate_storage_up", "1 if the last scrape read the queue and bans from the database"
        )
        try:
            metrics = self._read()
            up.add_metric([], 1)
        except Exception as exc:  # the database is down: say so, keep serving the rest
            metrics = []
            up.add_metric([], 0)
            if now - self._logged > 60:
                self._logged = now
                log.warning("metrics: cannot read the queue and bans: %s", _short(exc))
            self.close()  # reopened at the next scrape
        result = [*metrics, up]
        self._cached = (now, result)
        return result

    def _port(self, name: str) -> Any:
        port = self._ports.get(name)
        if port is None:
            opener = self._openers[name]
            assert opener is not None
            port = self._ports[name] = opener()
        return port

    def _read(self) -> list[Metric]:
        metrics: list[Metric] = []
        wall = self._clock()
        if self._openers["jobs"] is not None:
            stats = self._port("jobs").queue_stats()
            queued = GaugeMetricFamily(
                "sftpgate_jobs_queued", "jobs waiting to run, every node (database-wide)"
            )
            queued.add_metric([], stats.queued)
            running = GaugeMetricFamily(
                "sftpgate_jobs_running", "jobs leased by a worker, every node (database-wide)"
            )
            running.add_metric([], stats.running)
            oldest = GaugeMetricFamily(
                "sftpgate_jobs_oldest_queued_age_seconds",
                "how long the oldest queued job has waited (0: none waits)",
            )
            age = 0.0 if stats.oldest_queued_at is None else max(0.0, wall - stats.oldest_queued_at)
            oldest.add_metric([], age)
            metrics += [queued, running, oldest]
        if self._openers["bans"] is not None:
            bans = GaugeMetricFamily(
                "sftpgate_bans_active", "addresses banned now, by every gateway (database-wide)"
            )
            bans.add_metric([], self._port("bans").active(wall))
            metrics.append(bans)
        return metrics

    def close(self) -> None:
        for port in self._ports.values():
            with contextlib.suppress(Exception):
                port.close()
        self._ports.clear()


class ChildProcesses:
    """CPU and memory of each process of the host, labelled by role (``gateway-0`` ...)."""

    def __init__(self, processes: Callable[[], dict[str, int | str]]) -> None:
        self._processes = processes

    def collect(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily(
            "sftpgate_process_cpu_seconds",
            "CPU time (user + system) of each sftpgate process",
            labels=["process"],
        )
        rss = GaugeMetricFamily(
            "sftpgate_process_resident_memory_bytes",
            "resident memory of each sftpgate process",
            labels=["process"],
        )
        for name, pid in self._processes().items():
            collector = ProcessCollector(registry=None, pid=lambda pid=pid: pid)  # type: ignore[misc]
            for family in collector.collect():
                for sample in family.samples:
                    if sample.name == "process_cpu_seconds_total":
                        cpu.add_metric([name], sample.value)
                    elif sample.name == "process_resident_memory_bytes":
                        rss.add_metric([name], sample.value)
        return [cpu, rss]


class Exposition:
    """What one listener serves: this process's (or, multiprocess, every process's) families,
    the standard ``process_*`` of this process, and ``extra`` collectors (storage, children).
    Blocking: call :meth:`render` and :meth:`gauge_min` off the event loop."""

    def __init__(self, extra: Iterable[Any] = ()) -> None:
        self._source = _SourceFamilies()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._source)
        ProcessCollector(registry=self.registry)
        for collector in extra:
            self.registry.register(collector)
        self._extra = list(extra)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def gauge_min(self, name: str) -> float | None:
        """The least sample of gauge ``name`` over every process, None if it has none."""
        found = [
            sample.value
            for family in self._source.collect()
            if family.name == name
            for sample in family.samples
        ]
        return min(found) if found else None

    def close(self) -> None:
        for collector in self._extra:
            close = getattr(collector, "close", None)
            if close is not None:
                close()


class _SourceFamilies:
    """This process's families (in memory), or every process's (multiprocess files)."""

    def collect(self) -> Iterable[Metric]:
        directory = multiproc_dir()
        if directory is not None:
            collector = multiprocess.MultiProcessCollector(None, str(directory))  # type: ignore[no-untyped-call]
            return list(collector.collect())  # type: ignore[no-untyped-call]
        families()  # every family exists, at 0, from the first scrape
        return list(_registry.collect())


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]
