"""Jobs survive a killed gateway and an SMTP outage, and never send an email twice."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session
from test_serve_process import kill_serve, start_serve, stop_serve

from conftest import free_port, start_gateway, write_config
from mediakit import make_clip
from pipeline_kit import Inbox, SmtpServer, pipeline_settings, settled, wait_jobs
from sftpgate.cli.main import main


def processes_with(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (e.g. a job's temporary output)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def serve_config(tmp: Path, keys: dict[str, Path], smtp_port: int, **pipeline: Any) -> Path:
    path = write_config(tmp, keys, pipeline_settings(smtp_port, **pipeline))
    data = yaml.safe_load(path.read_text())
    data["jobs"]["workers"] = 1
    path.write_text(yaml.safe_dump(data))
    return path


def upload_with_paramiko(port: int, local: Path, remote: str) -> None:
    import paramiko

    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.connect(username="alice", password="alice-secret")
        client = paramiko.SFTPClient.from_transport(t)
        assert client is not None
        client.put(str(local), remote)
    finally:
        t.close()


def test_gateway_killed_while_ffmpeg_runs_finishes_the_job_after_restart_with_one_email(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    smtp = SmtpServer().start()
    # -readrate 1 makes ffmpeg take as long as the clip plays, so the kill lands mid-run.
    config = serve_config(tmp_path, user_keys, smtp.port, input_args=["-readrate", "1"])
    port = free_port()
    env = {"SFTPGATE_SERVER__PORT": str(port)}
    journal = tmp_path / "state" / "journal.sqlite3"
    clip = make_clip(tmp_path / "long.mp4", "mp4", seconds=5)
    proc = start_serve(config, env)
    try:
        upload_with_paramiko(port, clip, "crash.mp4")
        (job,) = wait_jobs(journal, lambda rows: len(rows) == 1 and rows[0]["pid"] is not None)
        marker = job["pid_marker"]
        assert processes_with(marker), "ffmpeg should be running"
        # ffmpeg's -progress reaches the job row while it runs.
        (job,) = wait_jobs(journal, lambda rows: 0.1 < rows[0]["progress"] < 0.95)
        assert job["step"] == "transcode"
    finally:
        kill_serve(proc)
    try:
        running = wait_jobs(journal, lambda rows: rows[0]["state"] == "running", timeout=5)
        assert running[0]["attempts"] == 1
        proc = start_serve(config, env)
        try:
            (job,) = wait_jobs(journal, settled, timeout=90)
            assert (job["state"], job["outcome"], job["email_state"]) == (
                "succeeded",
                "converted",
                "sent",
            ), job
            assert job["attempts"] == 2
            assert processes_with(marker) == []
            out = tmp_path / "homes" / "alice" / "converted"
            assert (out / "crash.flv").exists()
            assert not [p for p in out.iterdir() if p.name.startswith(".part-")]
        finally:
            assert stop_serve(proc) == 0
        assert len(smtp.inbox.messages) == 1
    finally:
        smtp.stop()


def test_smtp_down_during_the_job_delivers_once_when_it_comes_back(
    tmp_path: Path, user_keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    smtp = SmtpServer()  # its port is reserved in the config, but nothing listens yet
    running = start_gateway(tmp_path, user_keys, extra=pipeline_settings(smtp.port))
    try:
        clip = make_clip(tmp_path / "c.mp4", "mp4")
        running.sftp("alice").put(str(clip), "holiday.mp4")
        (job,) = wait_jobs(
            running,
            lambda rows: (
                len(rows) == 1 and rows[0]["attempts"] >= 2 and rows[0]["state"] == "queued"
            ),
        )
        assert "email" in job["last_error"] and job["email_state"] == "none"
        steps = yaml.safe_load(job["steps"])
        transcoded_at = steps["transcode"]["finished"]

        # An admin cancels it while SMTP is down, then retries once SMTP is back.
        config = str(running.config.path)
        assert main(["jobs", "--config", config, "cancel", str(job["id"])]) == 0
        time.sleep(1)
        assert wait_jobs(running, lambda rows: True)[0]["state"] == "cancelled"
        smtp.start()
        assert main(["jobs", "--config", config, "retry", str(job["id"])]) == 0
        capsys.readouterr()
        (job,) = wait_jobs(running, settled)
        assert (job["state"], job["email_state"]) == ("succeeded", "sent"), job
        assert len(smtp.inbox.messages) == 1
        # The finished steps were not redone: same transcode marker, no suffixed outputs.
        assert yaml.safe_load(job["steps"])["transcode"]["finished"] == transcoded_at
        assert not (running.home("alice") / "converted" / "holiday-1.flv").exists()
    finally:
        running.stop()
        smtp.stop()


class StallingInbox(Inbox):
    """Takes the message, then never answers: the gateway dies while 'sending'."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(3600)
        return "250 OK"


def test_gateway_killed_while_sending_does_not_send_again_but_flags_the_job(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    smtp = SmtpServer(inbox=StallingInbox()).start()
    config = serve_config(tmp_path, user_keys, smtp.port)
    data = yaml.safe_load(config.read_text())
    data["smtp"]["timeout"] = 3600
    config.write_text(yaml.safe_dump(data))
    port = free_port()
    env = {"SFTPGATE_SERVER__PORT": str(port)}
    journal = tmp_path / "state" / "journal.sqlite3"
    proc = start_serve(config, env)
    try:
        upload_with_paramiko(port, make_clip(tmp_path / "c.mp4", "mp4"), "x.mp4")
        wait_jobs(journal, lambda rows: len(rows) == 1 and rows[0]["email_state"] == "sending")
        deadline = time.monotonic() + 10
        while not smtp.inbox.messages and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        kill_serve(proc)
    smtp.stop()
    smtp = SmtpServer(port=smtp.port).start()  # a healthy server now: nothing must reach it
    proc = start_serve(config, env)
    try:
        (job,) = wait_jobs(journal, settled)
        assert (job["state"], job["email_state"]) == ("succeeded", "uncertain"), job
        assert "not resent" in job["last_error"]
    finally:
        assert stop_serve(proc) == 0
        smtp.stop()
    assert smtp.inbox.messages == []
    conn = sqlite3.connect(journal)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    conn.close()
