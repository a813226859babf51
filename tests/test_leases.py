"""Leases, not guesses: a job is taken over only when its lease expired (or its worker is
proven dead on this host), its leftover ffmpeg is killed where it ran, and a worker that lost
its lease can never commit a step, send an email or finish the job."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_pipeline_durability import processes_with, upload_with_paramiko
from test_serve_process import start_serve, stop_serve

from conftest import free_port, write_config
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from sftpgate.cli.main import main
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.jobs import registry
from sftpgate.jobs.model import EmailState, JobState
from sftpgate.jobs.store import JobStore, LeaseLost
from sftpgate.journal.store import connect, record_batch
from sftpgate.storage.ports import JobSpec

HOUR = 3600.0


class Clock:
    """The leases' time, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _upload(db: Path, n: int = 0) -> None:
    """Journal one completed upload with its job (a real journal transaction)."""
    conn = connect(db, synchronous="normal")
    event = Event(
        Op.CLOSE,
        SessionInfo(id=f"s{n}", remote_addr="127.0.0.1", remote_port=1, login="alice"),
        path=f"/clip{n}.mp4",
        bytes_written=10,
        upload=UploadState.COMPLETE,
    )
    record_batch(conn, [event], lambda path, ev: JobSpec(max_attempts=5, queue_cap=None))
    conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    connect(path).close()
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time() + 1)  # jobs are journaled with the real time, so due by then


@pytest.fixture
def opened(db: Path, clock: Clock) -> Iterator[Callable[..., JobStore]]:
    """Open JobStores on one journal (each a worker process's view); all closed at the end."""
    stores: list[JobStore] = []

    def open_store(node: str = "here") -> JobStore:
        store = JobStore(db, synchronous="normal", node=node, clock=clock)
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        store.close()


def exited_process() -> registry.Stamp:
    """The stamp of a real process that has exited (its pid now names nothing, or another)."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        found = registry.stamp(proc.pid, "here")
        assert found is not None
    finally:
        proc.kill()
        proc.wait()
    return found


# -- the ledger itself: a real SQLite journal, the leases' clock injected -----------------


def test_a_stale_registry_row_with_a_live_lease_is_not_stolen(
    db: Path, opened: Callable[..., JobStore], clock: Clock
) -> None:
    _upload(db)
    far = opened("far-away")  # another host: /proc here cannot tell whether it lives
    far.register_worker("far-away:77:cafe", 77, clock.now)
    job = far.lease("far-away:77:cafe/0", 60)
    assert job is not None
    clock.now += 50  # its registry row is silent for 50 s, but the lease holds for 10 more
    here = opened()
    here.register_worker("here:1:beef", os.getpid(), clock.now)
    assert here.reap_workers(clock.now, forget_after=HOUR) == {}
    assert here.lease("here:1:beef/0", 60) is None
    assert here.requeue_orphans() == []
    assert here.get(job.id).lease_owner == "far-away:77:cafe/0"
    # Once the lease expired, any worker takes the job over (and only then).
    clock.now += 11
    taken = here.lease("here:1:beef/0", 60)
    assert taken is not None and taken.id == job.id and taken.attempts == 2


def test_a_worker_proven_dead_on_this_host_has_its_jobs_taken_over_at_once(
    db: Path, opened: Callable[..., JobStore], clock: Clock
) -> None:
    _upload(db, 0)
    _upload(db, 1)
    gone = exited_process()
    old = opened()
    old.conn.execute(
        "INSERT INTO workers VALUES ('here:dead:1', 'here', ?, ?, ?, ?, ?)",
        (gone.pid, gone.boot, gone.start, clock.now, clock.now),
    )
    dead_job = old.lease("here:dead:1/0", 600)
    live = opened()
    live.register_worker("here:live:2", os.getpid(), clock.now)
    live_job = live.lease("here:live:2/0", 600)
    assert dead_job is not None and live_job is not None
    newcomer = opened()
    newcomer.register_worker("here:new:3", os.getpid(), clock.now)
    # The dead one's row goes and its lease expires; the live one (this very process) stays.
    assert newcomer.reap_workers(clock.now, forget_after=HOUR) == {"here:dead:1": [dead_job.id]}
    assert {w["id"] for w in newcomer.workers()} == {"here:live:2", "here:new:3"}
    clock.now += 0.001
    taken = newcomer.lease("here:new:3/0", 600)
    assert taken is not None and taken.id == dead_job.id
    assert newcomer.lease("here:new:3/1", 600) is None  # the live worker's job is not touched
    assert newcomer.get(live_job.id).lease_owner == "here:live:2/0"


def test_a_recycled_pid_does_not_keep_a_dead_worker_alive(
    db: Path, opened: Callable[..., JobStore], clock: Clock
) -> None:
    store = opened()
    # Our own pid, but with another start time: the process the row names is gone.
    own = registry.stamp(os.getpid(), "here")
    assert own is not None
    store.conn.execute(
        "INSERT INTO workers VALUES ('here:reused:1', 'here', ?, ?, ?, ?, ?)",
        (own.pid, own.boot, own.start + 1, clock.now, clock.now),
    )
    assert registry.alive(own) and not registry.alive(
        registry.Stamp("here", own.boot, own.pid, own.start + 1)
    )
    assert store.reap_workers(clock.now, forget_after=HOUR) == {"here:reused:1": []}


def test_a_row_of_an_earlier_boot_is_dead_one_of_another_pid_namespace_is_not_judged(
    db: Path, opened: Callable[..., JobStore], clock: Clock
) -> None:
    store = opened()
    gone = exited_process()
    boot, _, namespace = gone.boot.partition("/")
    rows = {
        # This host before a reboot: nothing of it runs any more.
        "here:rebooted:1": f"{'0' * len(boot)}/{namespace}",
        # Another container with this host name but its own pids: /proc here says nothing
        # about it, even though that pid is gone here.
        "here:container:2": f"{boot}/pid:[1]",
    }
    for worker_id, worker_boot in rows.items():
        store.conn.execute(
            "INSERT INTO workers VALUES (?, 'here', ?, ?, ?, ?, ?)",
            (worker_id, gone.pid, worker_boot, gone.start, clock.now, clock.now),
        )
    assert store.reap_workers(clock.now, forget_after=HOUR) == {"here:rebooted:1": []}
    assert [w["id"] for w in store.workers()] == ["here:container:2"]


def test_a_worker_whose_job_was_taken_over_can_commit_nothing(
    db: Path, opened: Callable[..., JobStore], clock: Clock
) -> None:
    _upload(db)
    zombie_store, store = opened("far-away"), opened()
    zombie = zombie_store.lease("far:1:aa/0", 10)
    assert zombie is not None
    clock.now += 11  # it stalled (or its host is cut off) past its lease
    holder = store.lease("here:2:bb/0", 10)
    assert holder is not None and holder.id == zombie.id
    owner = "far:1:aa/0"
    with pytest.raises(LeaseLost):
        zombie_store.mark_step(zombie.id, owner, "transcode", data={"placed": {}})
    with pytest.raises(LeaseLost):
        zombie_store.reserve_email(zombie, owner, 5, HOUR, clock.now)
    with pytest.raises(LeaseLost):
        zombie_store.claim_content(zombie, owner, "0" * 64, HOUR, clock.now)
    with pytest.raises(LeaseLost):
        zombie_store.set_email_state(zombie.id, owner, EmailState.SENT)
    with pytest.raises(LeaseLost):
        zombie_store.finish(
            zombie, owner, JobState.SUCCEEDED, journal=(Op.CONVERTED, "x.flv", "ok", None)
        )
    with pytest.raises(LeaseLost):
        zombie_store.retry_later(zombie, owner, "boom", 1)
    assert zombie_store.heartbeat(zombie.id, owner, 10) is False
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM email_log").fetchone()[0] == 0
        assert (
            conn.execute("SELECT count(*) FROM operations WHERE op = 'converted'").fetchone()[0]
            == 0
        )
    finally:
        conn.close()
    # The holder is untouched and finishes it.
    assert store.get(holder.id).lease_owner == "here:2:bb/0"
    assert store.get(holder.id).email_state is EmailState.NONE
    store.finish(holder, "here:2:bb/0", JobState.SUCCEEDED)


def test_a_digest_in_flight_is_flagged_only_once_its_sender_is_dead(
    db: Path, opened: Callable[..., JobStore], clock: Clock
) -> None:
    _upload(db)
    sender = opened()
    sender.register_worker("here:send:1", os.getpid(), clock.now)
    sender.worker_id = "here:send:1"
    job = sender.lease("here:send:1/0", 60)
    assert job is not None
    assert sender.reserve_email(job, "here:send:1/0", 0, HOUR, clock.now) is None  # digest
    sender.finish(job, "here:send:1/0", JobState.SUCCEEDED)
    claimed = sender.claim_digest("alice", 1, HOUR, clock.now)
    assert claimed is not None
    # Another worker starting now leaves the live sender's digest alone ...
    other = opened()
    other.register_worker("here:other:2", os.getpid(), clock.now)
    assert other.recover_emails(clock.now, 60) == []
    assert other.get(job.id).email_state is EmailState.SENDING
    # ... also while the sender's heartbeats are on time ...
    clock.now += 30
    sender.heartbeat_worker("here:send:1", clock.now)
    assert other.recover_emails(clock.now, 60) == []
    # ... and flags it once the sender fell silent for longer than a lease.
    clock.now += 61
    assert other.recover_emails(clock.now, 60) == [job.id]
    assert other.get(job.id).email_state is EmailState.UNCERTAIN
    assert other.get(job.id).lease_owner is None


def test_kill_leftover_refuses_a_pid_whose_start_time_differs(tmp_path: Path) -> None:
    from sftpgate.media.run import kill_leftover

    marker = f"sleep-marker-{os.getpid()}"
    proc = subprocess.Popen(
        ["sleep", "30"], executable="sleep", start_new_session=True
    )  # argv[0] is "sleep"; the marker test below uses a real one
    proc.kill()
    proc.wait()
    proc = subprocess.Popen([marker, "30"], executable="/bin/sleep", start_new_session=True)
    try:
        found = registry.stamp(proc.pid, "here")
        assert found is not None
        assert kill_leftover(proc.pid, marker, found.start + 1) is False  # someone else
        assert proc.poll() is None
        assert kill_leftover(proc.pid, marker, found.start) is True
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- real processes: `sftpgate serve`, `sftpgate worker`, real ffmpeg and SMTP ------------


class WorkerProcess:
    """`sftpgate worker` as a process; waits for its start line, keeps its stderr lines."""

    def __init__(self, config: Path, node: str | None = None) -> None:
        env = {**os.environ}
        if node is not None:
            env["SFTPGATE_SERVER__NODE"] = node
        self.lines: list[str] = []
        self.id = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sftpgate", "worker", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        started = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if "workers (" in line and not started.is_set():
                    self.id = line.split("(", 1)[1].split(")", 1)[0]
                    started.set()

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        if not started.wait(60):
            self.kill()
            pytest.fail("worker did not start: " + "".join(self.lines))

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.reader.is_alive():
            self.reader.join(10)  # it reads to the end of the dead process's stderr
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def lease_config(
    tmp: Path, keys: dict[str, Path], smtp_port: int, workers: int, lease: float
) -> Path:
    # -readrate 1: ffmpeg takes as long as the clip plays, so it is caught mid-run.
    path = write_config(tmp, keys, pipeline_settings(smtp_port, input_args=["-readrate", "1"]))
    data = yaml.safe_load(path.read_text())
    data["jobs"].update({"workers": workers, "lease_seconds": lease, "max_attempts": 3})
    path.write_text(yaml.safe_dump(data))
    return path


def one_row(journal: Path, sql: str, params: tuple[Any, ...] = ()) -> Any:
    conn = sqlite3.connect(journal)
    try:
        return conn.execute(sql, params).fetchone()
    finally:
        conn.close()


def transcoding(past: float) -> Callable[[list[dict[str, Any]]], bool]:
    """The one job's ffmpeg is recorded and its progress past ``past``."""
    return lambda r: len(r) == 1 and r[0]["pid"] is not None and r[0]["progress"] > past


def held_by(worker_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    """The one job is leased by a slot of worker ``worker_id``."""
    return lambda r: len(r) == 1 and (r[0]["lease_owner"] or "").startswith(worker_id + "/")


def converted_rows(journal: Path) -> int:
    return int(one_row(journal, "SELECT count(*) FROM operations WHERE op = 'converted'")[0])


def test_worker_started_beside_serve_leaves_serves_transcode_alone(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    smtp = SmtpServer().start()
    config = lease_config(tmp_path, user_keys, smtp.port, workers=1, lease=10)
    port = free_port()
    env = {"SFTPGATE_SERVER__PORT": str(port)}
    journal = tmp_path / "state" / "journal.sqlite3"
    clip = make_clip(tmp_path / "slow.mp4", "mp4", seconds=6)
    serve = start_serve(config, env)
    worker: WorkerProcess | None = None
    try:
        upload_with_paramiko(port, clip, "beside.mp4")
        (job,) = wait_jobs(journal, lambda rows: len(rows) == 1 and rows[0]["pid"] is not None)
        owner, marker = job["lease_owner"], job["pid_marker"]
        worker = WorkerProcess(config)
        capsys.readouterr()
        assert main(["jobs", "--config", str(config), "workers", "--json"]) == 0
        registered = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert worker.id in {row["id"] for row in registered} and len(registered) == 2
        assert {row["node"] for row in registered} == {socket.gethostname()}
        # Serve's job is never taken, requeued or killed while the worker runs beside it.
        seen: list[tuple[str, str | None, int]] = []

        def watch(rows: list[dict[str, Any]]) -> bool:
            seen.append((rows[0]["state"], rows[0]["lease_owner"], rows[0]["attempts"]))
            return settled(rows)

        (job,) = wait_jobs(journal, watch, timeout=90)
        assert {s for s in seen if s[0] == "running"} == {("running", owner, 1)}
        assert (job["state"], job["email_state"], job["attempts"]) == ("succeeded", "sent", 1)
        assert processes_with(marker) == []
        assert converted_rows(journal) == 1
        assert len(smtp.inbox.messages) == 1
        assert "taken over" not in worker.log() and "killed leftover" not in worker.log()
    finally:
        if worker is not None:
            assert worker.stop() == 0
        assert stop_serve(serve) == 0
        smtp.stop()
    # Both left the registry on their clean exits.
    assert one_row(journal, "SELECT count(*) FROM workers")[0] == 0


def _upload_to_workers_only(
    tmp: Path, keys: dict[str, Path], smtp: SmtpServer, lease: float, seconds: float
) -> tuple[Path, Path, subprocess.Popen[str], int]:
    """A serve without workers (it only journals) and a journaled upload of a slow clip."""
    config = lease_config(tmp, keys, smtp.port, workers=1, lease=lease)
    serve_config = tmp / "serve.yaml"
    data = yaml.safe_load(config.read_text())
    data["jobs"]["workers"] = 0
    serve_config.write_text(yaml.safe_dump(data))
    port = free_port()
    serve = start_serve(serve_config, {"SFTPGATE_SERVER__PORT": str(port)})
    clip = make_clip(tmp / "slow.mp4", "mp4", seconds=seconds)
    upload_with_paramiko(port, clip, "taken.mp4")
    return config, tmp / "state" / "journal.sqlite3", serve, port


def test_worker_sigkilled_mid_transcode_is_taken_over_after_its_lease_with_one_email(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    smtp = SmtpServer().start()
    lease = 4.0
    config, journal, serve, _ = _upload_to_workers_only(tmp_path, user_keys, smtp, lease, 6)
    first = second = None
    try:
        # The first worker "runs on another host": nothing here can prove it dead, so
        # only its lease's expiry lets the job go.
        first = WorkerProcess(config, node="host-a")
        (job,) = wait_jobs(journal, transcoding(0.1))
        marker = job["pid_marker"]
        first.kill()  # SIGKILL mid-transcode
        (job,) = wait_jobs(journal, lambda rows: True)
        expired_at = job["lease_expires_at"]
        assert job["state"] == "running" and job["lease_owner"].startswith(first.id + "/")
        second = WorkerProcess(config, node="host-b")
        (job,) = wait_jobs(journal, held_by(second.id), timeout=60)
        assert job["lease_expires_at"] - lease >= expired_at - 0.01  # taken only after it
        (job,) = wait_jobs(journal, settled, timeout=90)
        assert (job["state"], job["outcome"], job["email_state"], job["attempts"]) == (
            "succeeded",
            "converted",
            "sent",
            2,
        ), job
        assert processes_with(marker) == []  # the dead worker's ffmpeg is gone
        assert converted_rows(journal) == 1
        assert len(smtp.inbox.messages) == 1
        out = tmp_path / "homes" / "alice" / "converted"
        assert (out / "taken.flv").exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".part-")]
        # The dead worker's row stays (only its lease let the job go) until forgotten.
        assert one_row(journal, "SELECT count(*) FROM workers WHERE id = ?", (first.id,))[0] == 1
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
        stop_serve(serve)
        smtp.stop()


def test_a_stalled_worker_loses_its_job_its_ffmpeg_is_killed_and_it_commits_nothing(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    smtp = SmtpServer().start()
    lease = 4.0
    config, journal, serve, _ = _upload_to_workers_only(tmp_path, user_keys, smtp, lease, 8)
    stalled = taker = None
    try:
        stalled = WorkerProcess(config)
        (job,) = wait_jobs(journal, transcoding(0.05))
        marker, leftover = job["pid_marker"], job["pid"]
        stalled.proc.send_signal(signal.SIGSTOP)  # alive (so not provably dead), but silent
        assert processes_with(marker) == [leftover]  # its ffmpeg runs on
        taker = WorkerProcess(config)
        # After the lease, the job is taken over here and the stalled worker's ffmpeg killed
        # (the same pid and start time; its process group) while that worker still sleeps.
        (job,) = wait_jobs(journal, held_by(taker.id), timeout=60)
        deadline = time.monotonic() + 20
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(marker) == []
        assert stalled.proc.poll() is None  # the worker itself is left alone
        assert "killed leftover ffmpeg" in taker.log()
        stalled.proc.send_signal(signal.SIGCONT)  # it wakes up, a zombie holding nothing
        (job,) = wait_jobs(journal, settled, timeout=90)
        assert (job["state"], job["email_state"], job["attempts"]) == ("succeeded", "sent", 2)
        assert converted_rows(journal) == 1
        assert len(smtp.inbox.messages) == 1
        assert stalled.stop() == 0
        assert "lease lost" in stalled.log()
    finally:
        for w in (stalled, taker):
            if w is not None:
                w.stop()
        stop_serve(serve)
        smtp.stop()
