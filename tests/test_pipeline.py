"""Upload real media over SFTP; the pipeline converts it and emails the uploader once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from conftest import RunningGateway, need_tool, start_gateway
from mediakit import make_clip, make_corrupt, make_fake
from pipeline_kit import Inbox, SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.cli.main import main
from sftpgate.media.flv import read_on_metadata
from sshd_kit import shared_dir as shared_dir


@pytest.fixture
def piped(tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer) -> Iterator[RunningGateway]:
    running = start_gateway(tmp_path, user_keys, extra=pipeline_settings(smtp.port))
    try:
        yield running
    finally:
        running.stop()


def ffprobe(path: Path) -> dict:
    tool = need_tool("ffprobe", "apt-get install ffmpeg")
    out = subprocess.run(
        [tool, "-v", "error", "-show_format", "-show_streams", "-of", "json", "file:" + str(path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def upload(client: paramiko.SFTPClient, local: Path, remote: str) -> None:
    client.put(str(local), remote)


@pytest.mark.parametrize("container", ["avi", "mov", "mp4", "mpg", "wmv", "mkv"])
def test_uploaded_video_becomes_flv_with_keyframe_index_thumbnails_sidecar_and_one_email(
    piped: RunningGateway, smtp: SmtpServer, tmp_path: Path, container: str
) -> None:
    clip = make_clip(tmp_path / f"clip.{container}", container, seconds=2)
    upload(piped.sftp("alice"), clip, f"holiday.{container}")
    # No waiting: the CLOSE reply came only after the upload and its job committed.
    assert len(piped.rows("SELECT * FROM jobs")) == 1
    (job,) = wait_jobs(piped, settled)
    assert (job["state"], job["outcome"], job["email_state"]) == (
        "succeeded",
        "converted",
        "sent",
    ), job
    out = piped.home("alice") / "converted"

    flv = out / "holiday.flv"
    info = ffprobe(flv)
    assert info["format"]["format_name"] == "flv"
    codecs = {s["codec_type"]: s["codec_name"] for s in info["streams"]}
    assert codecs == {"video": "h264", "audio": "aac"}
    meta = read_on_metadata(flv.read_bytes()[: 1 << 20])
    keyframes = meta["keyframes"]
    assert len(keyframes["times"]) == len(keyframes["filepositions"]) >= 1

    poster = ffprobe(out / "holiday-poster.jpg")["streams"][0]
    assert poster["width"] == 320
    thumbs = sorted(out.glob("holiday-thumb-*.jpg"))
    assert [t.name for t in thumbs] == [f"holiday-thumb-0{i}.jpg" for i in (1, 2, 3)]
    assert all(ffprobe(t)["streams"][0]["width"] == 160 for t in thumbs)

    sidecar = json.loads((out / "holiday.json").read_text())
    source = sidecar["source"]
    assert source["file"] == f"/holiday.{container}"
    assert source["width"] == 320 and source["height"] == 240
    assert 1.5 < source["duration"] < 2.5
    assert source["size"] == clip.stat().st_size
    assert len(source["sha256"]) == 64
    assert source["uploader"]["login"] == "alice"
    assert sidecar["output"]["video_codec"] == "h264"
    assert sidecar["output"]["keyframes"] >= 1
    assert len(sidecar["output"]["thumbnails"]) == 3

    (message,) = smtp.inbox.messages
    assert message["To"] == "alice@example.org"
    assert message["From"] == "gateway@example.org"
    assert f"holiday.{container}" in message["Subject"]
    images = [p for p in message.walk() if p.get_content_type() == "image/jpeg"]
    assert len(images) == 1 and images[0]["Content-ID"]
    html = next(p for p in message.walk() if p.get_content_type() == "text/html")
    assert images[0]["Content-ID"].strip("<>") in html.get_content()

    # The user sees the outputs over SFTP and can download them.
    client = piped.sftp("alice")
    assert "holiday.flv" in client.listdir("converted")
    assert client.open("converted/holiday.flv").read()[:3] == b"FLV"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("fake", "not a readable media file"),
        ("corrupt", "not a readable media file"),
        ("audio", "no video stream"),
        ("long", "too long"),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason_and_one_email(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer, kind: str, reason: str
) -> None:
    extra = pipeline_settings(smtp.port, max_duration=2)
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        local = tmp_path / "in.mp4"
        if kind == "fake":
            make_fake(local)
        elif kind == "corrupt":
            make_corrupt(local)
        elif kind == "audio":
            local = make_clip(tmp_path / "in.m4a", "m4a", video=False)
        else:
            local = make_clip(tmp_path / "in.mp4", "mp4", seconds=4)
        client = running.sftp("alice")
        client.put(str(local), "upload.mp4")
        (job,) = wait_jobs(running, settled)
        assert (job["state"], job["outcome"]) == ("succeeded", "rejected"), job
        data = json.loads(job["data"])
        assert reason in data["rejected"]
        (message,) = smtp.inbox.messages
        assert message["To"] == "alice@example.org"
        assert reason in message.get_body(("plain",)).get_content()
        # The original is untouched, nothing was made, and the gateway still serves.
        assert (running.home("alice") / "upload.mp4").read_bytes() == local.read_bytes()
        assert not (running.home("alice") / "converted").exists()
        assert "upload.mp4" in running.sftp("alice").listdir(".")
        rows = running.op_rows("rejected")
        assert rows[0]["path"] == "/upload.mp4" and reason in rows[0]["message"]
    finally:
        running.stop()


def test_zero_byte_and_non_video_uploads_start_nothing(
    piped: RunningGateway, smtp: SmtpServer
) -> None:
    client = piped.sftp("alice")
    client.putfo(io.BytesIO(b""), "empty.mp4")
    client.putfo(io.BytesIO(b"hello"), "notes.txt")
    piped.wait_rows(lambda rs: sum(r["op"] == "close" for r in rs) >= 2)
    assert piped.rows("SELECT * FROM jobs") == []
    assert smtp.inbox.messages == []


def test_filepart_renamed_at_the_end_fires_exactly_one_job_for_the_final_name(
    piped: RunningGateway, smtp: SmtpServer, tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "c.mp4", "mp4")
    client = piped.sftp("alice")
    client.put(str(clip), "movie.mp4.filepart")
    piped.op_rows("close")
    assert piped.rows("SELECT * FROM uploads") == []
    client.rename("movie.mp4.filepart", "movie.mp4")
    # No waiting: the RENAME reply came only after the upload and its job committed.
    assert [j["path"] for j in piped.rows("SELECT path FROM jobs")] == ["/movie.mp4"]
    (job,) = wait_jobs(piped, settled)
    assert job["path"] == "/movie.mp4" and job["state"] == "succeeded"
    uploads = piped.rows("SELECT path, state, bytes FROM uploads")
    assert uploads == [{"path": "/movie.mp4", "state": "complete", "bytes": clip.stat().st_size}]
    assert len(smtp.inbox.messages) == 1
    assert (piped.home("alice") / "converted" / "movie.flv").exists()


def test_a_second_upload_of_the_same_name_gets_suffixed_outputs(
    piped: RunningGateway, smtp: SmtpServer, tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "c.mp4", "mp4")
    client = piped.sftp("alice")
    client.put(str(clip), "same.mp4")
    wait_jobs(piped, settled)
    # Other content (the same bytes again would be a duplicate: jobs.dedupe_window).
    client.put(str(make_clip(tmp_path / "d.mp4", "mp4", seconds=1)), "same.mp4")
    wait_jobs(piped, lambda rows: settled(rows, 2))
    out = piped.home("alice") / "converted"
    assert (out / "same.flv").exists() and (out / "same-1.flv").exists()
    assert json.loads((out / "same-1.json").read_text())["output"]["file"] == "same-1.flv"
    assert len(smtp.inbox.messages) == 2


def test_awkward_names_go_through_the_pipeline(
    piped: RunningGateway, smtp: SmtpServer, tmp_path: Path
) -> None:
    name = "-rf 'q' \"d\" vidéo\nx.mp4"
    clip = make_clip(tmp_path / "c.mp4", "mp4")
    piped.sftp("alice").put(str(clip), name)
    (job,) = wait_jobs(piped, settled)
    assert job["state"] == "succeeded", job
    stem = name[: -len(".mp4")]
    assert (piped.home("alice") / "converted" / f"{stem}.flv").exists()
    (message,) = smtp.inbox.messages
    assert "\n" not in message["Subject"]


def test_jobs_cli_lists_shows_retries_and_cancels_real_jobs(
    piped: RunningGateway, smtp: SmtpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = make_clip(tmp_path / "c.mp4", "mp4")
    piped.sftp("alice").put(str(clip), "a.mp4")
    make_fake(tmp_path / "fake.mp4")
    piped.sftp("bob", key=True).put(str(tmp_path / "fake.mp4"), "b.mp4")
    wait_jobs(piped, lambda rows: settled(rows, 2))
    config = str(piped.config.path)

    assert main(["jobs", "--config", config, "list"]) == 0
    table = capsys.readouterr().out
    assert "succeeded" in table and "/a.mp4" in table and "/b.mp4" in table

    assert main(["jobs", "--config", config, "list", "--json", "--user", "bob"]) == 0
    (bob_job,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert bob_job["outcome"] == "rejected"

    assert main(["jobs", "--config", config, "show", "1"]) == 0
    shown = capsys.readouterr().out
    for word in ("probe", "transcode", "sidecar", "done", "email     sent", "a.flv"):
        assert word in shown

    assert main(["jobs", "--config", config, "retry", "1"]) == 1  # succeeded: refused
    assert "only failed, dead or cancelled" in capsys.readouterr().err
    assert main(["jobs", "--config", config, "cancel", "1"]) == 1
    capsys.readouterr()
    assert main(["jobs", "--config", config, "show", "99"]) == 1
    assert "no job 99" in capsys.readouterr().err


def test_uploads_and_outputs_belong_to_the_user_when_the_gateway_is_root(
    tmp_path: Path, shared_dir: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    if os.geteuid() != 0:
        pytest.fail("run as root (CI does): only root gives files to another owner")
    # The pipeline acts as uid 4242, which must reach the home: not under
    # pytest's 0700 tmp_path. Nothing chowns: the user made the outputs.
    running = start_gateway(
        shared_dir,
        user_keys,
        extra=pipeline_settings(smtp.port),
        users={"alice": {"uid": 4242, "gid": 4343}},
    )
    try:
        clip = make_clip(tmp_path / "c.mp4", "mp4")
        running.sftp("alice").put(str(clip), "mine.mp4")
        (job,) = wait_jobs(running, settled)
        assert job["state"] == "succeeded", job
        home = running.home("alice")
        made = [home / "mine.mp4", home / "converted", *(home / "converted").iterdir()]
        assert len(made) == 2 + 1 + 1 + 1 + 3  # flv, json, poster, 3 thumbnails
        assert {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(4242, 4343)}
    finally:
        running.stop()


class _RefusesAlice(Inbox):
    """Alice's mailbox is 'temporarily' unavailable; the admin's works."""

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address == "alice@example.org":
            return "451 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_a_job_out_of_attempts_goes_dead_and_the_admin_is_told(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    smtp = SmtpServer(inbox=_RefusesAlice()).start()
    extra = pipeline_settings(smtp.port)
    extra["jobs"].update({"max_attempts": 2, "backoff_base": 0.2})
    extra["email"] = {"admin": "admin@example.org"}
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        running.sftp("alice").put(str(make_clip(tmp_path / "c.mp4", "mp4")), "v.mp4")
        (job,) = wait_jobs(running, settled)
        assert (job["state"], job["attempts"]) == ("dead", 2), job
        assert "451" in job["last_error"]
        deadline = time.monotonic() + 10
        while not smtp.inbox.messages and time.monotonic() < deadline:
            time.sleep(0.1)
        (message,) = smtp.inbox.messages
        assert message["To"] == "admin@example.org"
        assert "/v.mp4" in message.get_body(("plain",)).get_content()
    finally:
        running.stop()
        smtp.stop()
