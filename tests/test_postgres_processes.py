"""`server.processes: 2` on PostgreSQL: a real `sftpgate serve` (a supervisor, two gateway
processes on one port) and a `sftpgate worker` beside it, on one real PostgreSQL, driven by
parallel paramiko sessions: every upload journaled once, every job run once, by Procrastinate."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_leases import WorkerProcess
from test_processes import upload_session, wait_for
from test_serve_process import ServeProcess

import pg_kit
from conftest import free_port, write_config
from pipeline_kit import SmtpServer, pipeline_settings
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.journal.query import JournalFilter
from sftpgate.storage.postgres.backend import PostgresBackend

SESSIONS = 8  # of test_processes.UPLOADS_PER_SESSION (10) uploads each


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


def test_two_gateway_processes_and_a_worker_on_postgresql_journal_and_run_each_upload_once(
    pg: pg_kit.PgServer, tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    with pg.database() as url:
        b = PostgresBackend(url, size=2)
        b.migrate()
        extra = pipeline_settings(smtp.port)
        extra["server"] = {"processes": 2}
        extra["database"] = {"url": url}
        extra["jobs"].update(dedupe_window=0, per_user_queue=1000, per_user_running=2)
        extra["email"] = {"enabled": False}
        config = write_config(tmp_path, user_keys, extra)
        (tmp_path / "homes" / "alice" / "in").mkdir(parents=True)
        port = free_port()
        serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
        worker: WorkerProcess | None = None
        try:
            wait_for(serve.lines, re.compile(r"sftpgate: listening on .*\(2 processes\)"), 0, 60)
            worker = WorkerProcess(config)
            with ThreadPoolExecutor(SESSIONS) as pool:
                list(pool.map(lambda i: upload_session(port, i), range(SESSIONS)))
            total = SESSIONS * 10
            store = b.jobs()
            deadline = time.monotonic() + 240
            while True:
                jobs = store.list(limit=total + 10)
                if len(jobs) == total and all(
                    j.state.value not in ("queued", "running") for j in jobs
                ):
                    break
                assert time.monotonic() < deadline, jobs[:3]
                time.sleep(0.2)  # polling the jobs, bounded by the deadline
            assert len({j.path for j in jobs}) == total
            assert all(j.state.value == "succeeded" and j.outcome == "rejected" for j in jobs)
            assert all(j.attempts == 1 for j in jobs), [j for j in jobs if j.attempts != 1]
            rows: list[dict[str, object]] = []
            b.reader().scan(JournalFilter(ops=("close",)), rows.append)
            assert len(rows) == total  # each upload journaled once
            for log in ("".join(serve.lines), worker.log()):
                assert "taken over" not in log and "killed leftover" not in log
            with b._pool.connection() as conn:
                runs = conn.execute(
                    "SELECT status, count(*) AS n FROM procrastinate_jobs"
                    " WHERE task_name = 'sftpgate.run_job' GROUP BY status"
                ).fetchall()
            assert runs == [{"status": "succeeded", "n": total}]  # one run each
        finally:
            if worker is not None:
                worker.stop()
            assert serve.stop() == 0
            b.close()
