"""Test helper (not a test module): tiny real media files made with ffmpeg's lavfi sources."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# container -> (video codec args, audio codec args, ffmpeg muxer)
CONTAINERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "avi": (("-c:v", "mpeg4"), ("-c:a", "libmp3lame"), "avi"),
    "mov": (("-c:v", "libx264", "-preset", "ultrafast"), ("-c:a", "aac"), "mov"),
    "mp4": (("-c:v", "libx264", "-preset", "ultrafast"), ("-c:a", "aac"), "mp4"),
    "mpg": (("-c:v", "mpeg2video"), ("-c:a", "mp2"), "mpeg"),
    "wmv": (("-c:v", "wmv2"), ("-c:a", "wmav2"), "asf"),
    "mkv": (("-c:v", "libx264", "-preset", "ultrafast"), ("-c:a", "aac"), "matroska"),
    "webm": (("-c:v", "libvpx", "-deadline", "realtime"), ("-c:a", "libvorbis"), "webm"),
    "flv": (("-c:v", "flv"), ("-c:a", "libmp3lame"), "flv"),
    # audio only (make them with video=False)
    "m4a": ((), ("-c:a", "aac"), "mp4"),
    "mp3": ((), ("-c:a", "libmp3lame"), "mp3"),
    "wav": ((), ("-c:a", "pcm_s16le"), "wav"),
}


def tool(name: str) -> str:
    """Path of ffmpeg or ffprobe, or fail the test saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `apt-get install ffmpeg`")
    return path


def make_clip(
    path: Path,
    container: str,
    *,
    seconds: float = 2,
    size: str = "320x240",
    audio: bool = True,
    video: bool = True,
) -> Path:
    """Write a real ``seconds``-long clip (test pattern + 440 Hz tone) to ``path``."""
    video_args, audio_args, muxer = CONTAINERS[container]
    video = video and bool(video_args)
    audio = audio and bool(audio_args)
    assert video or audio, f"{container}: a clip needs a video or an audio stream"
    args = [tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25"]
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
    if video:
        args += [*video_args, "-pix_fmt", "yuv420p"]
    if audio:
        args += [*audio_args]
    args += ["-t", str(seconds), "-f", muxer, "file:" + str(path.absolute())]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, f"ffmpeg could not make {path.name}: {done.stderr}"
    return path


def make_mp3_with_cover(path: Path, *, seconds: float = 1) -> Path:
    """An mp3 with album art: a video stream that is an attached picture."""
    args = [tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
    args += ["-f", "lavfi", "-i", "testsrc2=size=160x160:rate=1"]
    args += ["-map", "0:a", "-map", "1:v", "-frames:v", "1", "-c:a", "libmp3lame"]
    args += ["-c:v", "mjpeg", "-disposition:v", "attached_pic", "-id3v2_version", "3"]
    args += ["-t", str(seconds), "-f", "mp3", "file:" + str(path.absolute())]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, f"ffmpeg could not make {path.name}: {done.stderr}"
    return path


def make_corrupt(path: Path) -> Path:
    """An MP4 that starts like one (an ``ftyp`` box, an ``mdat`` box) and then is noise."""
    noise = random.Random(7).randbytes(64 * 1024)
    ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    mdat = (8 + len(noise)).to_bytes(4, "big") + b"mdat"
    path.write_bytes(ftyp + mdat + noise)
    return path


def make_fake(path: Path) -> Path:
    """A text file with a video's name."""
    path.write_text("This is not a video, just a text file named like one.\n" * 20)
    return path


def ffprobe_json(path: Path) -> dict[str, Any]:
    """ffprobe's report, run directly (independent of the code under test)."""
    args = [tool("ffprobe"), "-v", "error", "-show_format", "-show_streams", "-of", "json"]
    done = subprocess.run(
        [*args, "file:" + str(path.absolute())], capture_output=True, check=True, timeout=60
    )
    data: dict[str, Any] = json.loads(done.stdout)
    return data
