"""Work limits, and steps that can never succeed: rejected by their work, no blind retries."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import PASSWORDS, RunningGateway, start_gateway
from hostile_kit import Bystander
from mediakit import tool
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.config import PipelineConfig
from sftpgate.media.facts import MediaFacts
from sftpgate.media.validate import validate, work_timeout
from sftpgate.pipeline import Pipeline

MIB = 1024 * 1024


def until_rounds(bystander: Bystander, count: int, timeout: float = 30) -> None:
    """Wait until the bystander has done ``count`` rounds (so the attack overlapped them)."""
    deadline = time.monotonic() + timeout
    while len(bystander.rounds) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def _facts(width: int, height: int, fps: float, seconds: float, size: int) -> MediaFacts:
    return MediaFacts(
        "mov,mp4,m4a,3gp,3g2,mj2",
        seconds,
        size,
        None,
        "h264",
        width,
        height,
        fps,
        None,
        True,
        False,
    )


# -- pure: the rule and the timeout -------------------------------------------------


def test_an_hour_of_black_4k_in_9_mib_is_rejected_by_its_work_with_the_defaults() -> None:
    cfg = PipelineConfig()
    reason = validate(_facts(3840, 2160, 25, 3600, 9 * MIB), cfg)
    assert reason is not None and reason.startswith("too much work for its size"), reason
    # The same hour at an ordinary bitrate (20 Mbit/s, ~9 GB) is real video: accepted.
    assert validate(_facts(3840, 2160, 25, 3600, 9 * 1024 * MIB), cfg) is None
    # Short and still (10 s of black 1080p in 20 KiB): too little work to matter.
    assert validate(_facts(1920, 1080, 25, 10, 20 * 1024), cfg) is None


def test_total_work_is_capped_whatever_the_size() -> None:
    cfg = replace(PipelineConfig(), max_pixels=10**9)
    reason = validate(_facts(1920, 1080, 30, 60, 500 * MIB), cfg)  # 3.7e9 pixels
    assert reason == "too much work: 3.7e+09 pixels to convert (max 1e+09)"
    assert validate(_facts(1920, 1080, 30, 10, 50 * MIB), cfg) is None  # 6.2e8 pixels


def test_a_declared_frame_count_above_rate_times_duration_counts() -> None:
    facts = replace(_facts(1920, 1080, 1, 60, 50 * MIB), frames=100_000)
    assert facts.pixels() == 1920 * 1080 * 100_000
    # An unknown frame rate counts as 60 fps.
    assert replace(facts, fps=None, frames=None).pixels() == 1920 * 1080 * 60 * 60


def test_ffmpegs_timeout_scales_with_the_work() -> None:
    cfg = PipelineConfig()
    tiny = work_timeout(_facts(320, 240, 25, 2, 100_000), cfg)
    hour = work_timeout(_facts(1280, 720, 25, 3600, 900 * MIB), cfg)
    assert 60 <= tiny < 61
    assert hour == pytest.approx(60 + 1280 * 720 * 25 * 3600 / cfg.work_rate)
    assert tiny < hour <= cfg.timeout
    assert work_timeout(_facts(3840, 2160, 60, 4 * 3600, 40 * 1024 * MIB), cfg) == cfg.timeout


# -- real media through a real gateway ----------------------------------------------


def _ffmpeg(*args: str) -> None:
    done = subprocess.run(
        [tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def make_black(path: Path, *, seconds: float, size: str) -> Path:
    """Black video at the lowest quality x264 has: many pixels to decode in few bytes."""
    _ffmpeg(
        *("-f", "lavfi", "-i", f"color=black:size={size}:rate=25"),
        *("-c:v", "libx264", "-preset", "ultrafast", "-crf", "51", "-pix_fmt", "yuv420p"),
        *("-t", str(seconds), "-f", "mp4", "file:" + str(path)),
    )
    return path


def make_short_video(path: Path, muxer: str, *, video: float, audio: float) -> Path:
    """A clip whose video ends long before its audio (and the file's duration)."""
    _ffmpeg(
        *("-f", "lavfi", "-t", str(video), "-i", "testsrc2=size=160x120:rate=25"),
        *("-f", "lavfi", "-t", str(audio), "-i", "sine=frequency=440:sample_rate=44100"),
        *("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac"),
        *("-f", muxer, "file:" + str(path)),
    )
    return path


@pytest.fixture
def limited(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> Iterator[RunningGateway]:
    # 2 M pixels: 320x240 at 25 fps for a second and a bit.
    extra = pipeline_settings(smtp.port, thumbnails=4, max_pixels=2_000_000)
    running = start_gateway(tmp_path, user_keys, extra=extra)
    try:
        yield running
    finally:
        running.stop()


def test_a_tiny_upload_of_much_work_is_rejected_by_the_work_limit_before_ffmpeg(
    limited: RunningGateway, smtp: SmtpServer, tmp_path: Path
) -> None:
    clip = make_black(tmp_path / "black.mp4", seconds=4, size="320x240")  # 7.7 M pixels
    assert clip.stat().st_size < 20_000
    with Bystander(limited.port, "carol", PASSWORDS["carol"]) as bystander:
        limited.sftp("alice").put(str(clip), "black.mp4")
        (job,) = wait_jobs(limited, settled)
        until_rounds(bystander, 3)
    assert (job["state"], job["outcome"], job["attempts"]) == ("succeeded", "rejected", 1)
    (message,) = smtp.inbox.messages
    assert "was not converted" in message["Subject"]
    text = message.get_body(preferencelist=("plain",))
    assert text is not None and "too much work" in text.get_content()
    (row,) = limited.rows("SELECT * FROM operations WHERE op = 'rejected'")
    assert row["message"].startswith("too much work: 7.7e+06 pixels")
    # ffmpeg never ran: nothing was made.
    assert not (limited.home("alice") / "converted").exists()
    bystander.check(most=3.0, at_least=3)


@pytest.mark.parametrize("muxer", ["mp4", "matroska"])
def test_a_clip_whose_video_ends_early_takes_its_thumbnails_from_the_video_and_finishes(
    limited: RunningGateway, smtp: SmtpServer, tmp_path: Path, muxer: str
) -> None:
    # 0.3 s of video, 3 s of audio: 7.5 frames of 160x120, well under the work limit.
    clip = make_short_video(tmp_path / "short.bin", muxer, video=0.3, audio=3)
    limited.sftp("alice").put(str(clip), "short.mkv" if muxer == "matroska" else "short.mp4")
    (job,) = wait_jobs(limited, settled)
    assert (job["state"], job["outcome"], job["attempts"]) == ("succeeded", "converted", 1), job
    out = limited.home("alice") / "converted"
    assert (out / "short.flv").stat().st_size > 0
    thumbs = sorted(out.glob("short-thumb-*.jpg"))
    # Times taken from the video's own 0.3 s: four different frames, not four
    # copies of the first (nor empty images and a retry).
    assert len(thumbs) == 4 and len({t.read_bytes() for t in thumbs}) == 4
    assert not list(out.glob(".part-*"))
    assert len(smtp.inbox.messages) == 1


def test_images_ffmpeg_left_empty_are_left_out_of_the_outputs() -> None:
    names = {
        "flv": "a.flv",
        "sidecar": "a.json",
        "poster": "a-poster.jpg",
        "thumbnails": ["a-thumb-01.jpg", "a-thumb-02.jpg", "a-thumb-03.jpg"],
    }
    kept = Pipeline._kept(names, ["a.flv", "a-thumb-01.jpg", "a-thumb-03.jpg"])
    assert kept == {**names, "poster": None, "thumbnails": ["a-thumb-01.jpg", "a-thumb-03.jpg"]}


def test_a_file_name_with_cr_lf_is_converted_with_exactly_one_email(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    running = start_gateway(tmp_path, user_keys, extra=pipeline_settings(smtp.port))
    try:
        clip = make_short_video(tmp_path / "clip.mp4", "mp4", video=1, audio=1)
        name = "line\r\nBcc: victim@example.org\r\n.mp4"
        running.sftp("alice").put(str(clip), name)
        (job,) = wait_jobs(running, settled)
    finally:
        running.stop()
    assert (job["state"], job["outcome"], job["attempts"]) == ("succeeded", "converted", 1), job
    assert job["email_state"] == "sent" and job["last_error"] is None
    (message,) = smtp.inbox.messages
    (envelope,) = smtp.inbox.envelopes
    assert envelope.rcpt_tos == ["alice@example.org"]
    assert "\r" not in message["Subject"] and "\n" not in message["Subject"]
    assert message["Bcc"] is None
    (poster,) = [p for p in message.walk() if p.get_content_type() == "image/jpeg"]
    filename = poster.get_filename()
    assert filename is not None and "\r" not in filename and "\n" not in filename
    assert filename.endswith("-poster.jpg")
