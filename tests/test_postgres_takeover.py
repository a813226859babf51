"""A cluster's worker hosts, on one machine: `sftpgate serve` (no workers) and two `sftpgate
worker` processes on one real PostgreSQL. The worker running ffmpeg is SIGKILLed mid-transcode:
the other takes the job over through Procrastinate's stalled-job sweep once the dead worker's
lease has expired, kills the leftover ffmpeg, and the uploader gets exactly one email."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import pg_kit
from conftest import start_gateway
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.jobs import registry
from sftpgate.storage.postgres.backend import PostgresBackend


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_kit.PgServer]:
    with pg_kit.shared_server() as server:
        yield server


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _worker(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sftpgate", "worker", "-c", str(config)],
        stderr=subprocess.DEVNULL,
    )


def test_a_worker_sigkilled_mid_transcode_has_its_job_finished_by_the_other_with_one_email(
    pg: pg_kit.PgServer, tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    with pg.database() as url:
        b = PostgresBackend(url, size=2)
        b.migrate()
        # -readrate 1: ffmpeg takes as long as the clip plays, so the kill lands mid-run.
        settings = pipeline_settings(smtp.port, input_args=["-readrate", "1"])
        jobs = {**settings["jobs"], "workers": 0, "lease_seconds": 3}
        running = start_gateway(
            tmp_path, user_keys, extra={**settings, "database": {"url": url}, "jobs": jobs}
        )
        cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
        cfg["jobs"]["workers"] = 1
        (tmp_path / "worker.yaml").write_text(yaml.safe_dump(cfg))
        first = _worker(tmp_path / "worker.yaml")
        second: subprocess.Popen[bytes] | None = None
        try:
            clip = make_clip(tmp_path / "long.mp4", "mp4", seconds=8)
            running.sftp("alice").put(str(clip), "/long.mp4")
            deadline = time.monotonic() + 60
            while not (job := b.jobs().list()[0]).pid_marker:
                assert time.monotonic() < deadline, job
                time.sleep(0.05)  # polling for ffmpeg to start, bounded by the deadline
            marker = job.pid_marker
            assert job.lease_owner is not None
            assert registry.worker_of(job.lease_owner).split(":")[1] == str(first.pid)
            assert _processes_with(marker), "ffmpeg should be running"
            first.kill()
            first.wait(30)
            second = _worker(tmp_path / "worker.yaml")
            deadline = time.monotonic() + 120
            while (job := b.jobs().get(job.id)).state.value in ("queued", "running"):
                assert time.monotonic() < deadline, job
                time.sleep(0.1)  # polling the job's state, bounded by the deadline
            assert (job.state.value, job.outcome, job.email_state.value) == (
                "succeeded",
                "converted",
                "sent",
            ), job
            assert job.attempts == 2
            assert _processes_with(marker) == []  # the leftover ffmpeg was killed
            assert (running.home("alice") / "converted" / "long.flv").stat().st_size > 0
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
            running.stop()
            b.close()
    assert len(smtp.inbox.to("alice@example.org")) == 1
