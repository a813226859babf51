"""The media steps with real ffmpeg and real files: probe, validate, one-pass convert, limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mediakit import (
    ffprobe_json,
    make_clip,
    make_corrupt,
    make_fake,
    make_mp3_with_cover,
    tool,
)
from sftpgate import __version__
from sftpgate.config import PipelineConfig
from sftpgate.media import MediaError
from sftpgate.media.facts import MediaFacts
from sftpgate.media.flv import keyframe_count, read_on_metadata
from sftpgate.media.plan import plan_convert
from sftpgate.media.probe import probe
from sftpgate.media.run import kill_leftover, run_ffmpeg
from sftpgate.media.sidecar import build_sidecar, sha256_file
from sftpgate.media.validate import format_duration, validate

MakeClip = Callable[..., Path]


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return replace(
        PipelineConfig(),
        ffmpeg=tool("ffmpeg"),
        ffprobe=tool("ffprobe"),
        thumbnails=3,
        thumbnail_width=160,
        poster_width=480,
        preset="ultrafast",
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> MakeClip:
    """``clip("avi")``: a 2 s 320x240 clip, made once per module and shared."""
    folder = tmp_path_factory.mktemp("clips")
    made: dict[tuple[str, bool, bool], Path] = {}

    def get(container: str, *, audio: bool = True, video: bool = True) -> Path:
        key = (container, audio, video)
        if key not in made:
            name = f"clip-{int(audio)}{int(video)}.{container}"
            made[key] = make_clip(folder / name, container, audio=audio, video=video)
        return made[key]

    return get


def facts_of(path: Path, cfg: PipelineConfig) -> MediaFacts:
    return MediaFacts.from_probe(probe(path, cfg.ffprobe, timeout=30))


def check(path: Path, cfg: PipelineConfig) -> str | None:
    """What the pipeline tells the uploader: None (accepted) or the reason."""
    try:
        return validate(facts_of(path, cfg), cfg)
    except MediaError as exc:
        return exc.reason


def width_of(path: Path) -> int:
    stream = ffprobe_json(path)["streams"][0]
    return int(stream["width"])


@pytest.mark.parametrize(
    ("container", "format_part", "video_codec", "audio_codec"),
    [
        ("avi", "avi", "mpeg4", "mp3"),
        ("mov", "mov", "h264", "aac"),
        ("mp4", "mp4", "h264", "aac"),
        ("mpg", "mpeg", "mpeg2video", "mp2"),
        ("wmv", "asf", "wmv2", "wmav2"),
        ("mkv", "matroska", "h264", "aac"),
        ("webm", "webm", "vp8", "vorbis"),
        ("flv", "flv", "flv1", "mp3"),
    ],
)
def test_probe_reports_facts_of_each_container_and_validate_accepts_it(
    clip: MakeClip,
    cfg: PipelineConfig,
    container: str,
    format_part: str,
    video_codec: str,
    audio_codec: str,
) -> None:
    path = clip(container)
    facts = facts_of(path, cfg)
    assert format_part in facts.container.split(",")
    assert (facts.video_codec, facts.audio_codec) == (video_codec, audio_codec)
    assert (facts.width, facts.height, facts.fps) == (320, 240, 25.0)
    assert facts.duration == pytest.approx(2.0, abs=0.15)
    assert facts.size == path.stat().st_size
    assert facts.bitrate is not None and facts.bitrate > 0
    assert facts.has_video and facts.has_audio
    assert MediaFacts(**facts.to_dict()) == facts
    assert validate(facts, cfg) is None


@pytest.mark.parametrize("container", ["m4a", "mp3"])
def test_audio_only_file_is_rejected_as_not_a_video(
    clip: MakeClip, cfg: PipelineConfig, container: str
) -> None:
    facts = facts_of(clip(container, video=False), cfg)
    assert not facts.has_video and facts.has_audio
    assert validate(facts, cfg) == "not a video: no video stream (audio only)"


def test_album_art_in_an_mp3_does_not_count_as_video(tmp_path: Path, cfg: PipelineConfig) -> None:
    path = make_mp3_with_cover(tmp_path / "song.mp3")
    assert any(s["codec_type"] == "video" for s in ffprobe_json(path)["streams"])
    facts = facts_of(path, cfg)
    assert (facts.has_video, facts.video_codec, facts.width) == (False, None, None)
    assert check(path, cfg) == "not a video: no video stream (audio only)"


def test_text_file_named_mp4_is_not_a_readable_media_file(
    tmp_path: Path, cfg: PipelineConfig
) -> None:
    path = make_fake(tmp_path / "movie.mp4")
    with pytest.raises(MediaError) as caught:
        probe(path, cfg.ffprobe)
    assert caught.value.reason.startswith("not a readable media file: ")
    assert str(tmp_path) not in caught.value.reason  # the gateway's paths stay private
    assert " @ 0x" not in caught.value.reason


def test_corrupt_file_is_not_a_readable_media_file(tmp_path: Path, cfg: PipelineConfig) -> None:
    reason = check(make_corrupt(tmp_path / "broken.mp4"), cfg)
    assert reason is not None and reason.startswith("not a readable media file: ")


def test_clip_longer_than_max_duration_is_rejected(clip: MakeClip, cfg: PipelineConfig) -> None:
    reason = check(clip("mp4"), replace(cfg, max_duration=1))
    assert reason == "too long: 0:00:02 (max 0:00:01)"


def test_container_is_allowed_when_any_part_of_ffprobes_name_is_allowed(
    clip: MakeClip, cfg: PipelineConfig
) -> None:
    only_mp4 = replace(cfg, allowed_containers=("mp4",))
    assert check(clip("mp4"), only_mp4) is None  # "mov,mp4,m4a,3gp,3g2,mj2"
    assert check(clip("avi"), only_mp4) == "container 'avi' is not allowed"


def test_disallowed_video_codec_is_rejected(clip: MakeClip, cfg: PipelineConfig) -> None:
    only_h264 = replace(cfg, allowed_video_codecs=("h264",))
    assert check(clip("avi"), only_h264) == "video codec 'mpeg4' is not allowed"
    assert check(clip("mkv"), only_h264) is None


def test_file_larger_than_max_size_is_rejected(clip: MakeClip, cfg: PipelineConfig) -> None:
    reason = check(clip("mp4"), replace(cfg, max_size=1000))
    assert reason is not None
    assert reason.startswith("file too large: ") and reason.endswith("KiB (max 1000 B)")


def test_resolution_beyond_limits_is_rejected(clip: MakeClip, cfg: PipelineConfig) -> None:
    reason = check(clip("mp4"), replace(cfg, max_width=300))
    assert reason == "resolution 320x240 exceeds 300x4320"


def test_unknown_duration_is_rejected(clip: MakeClip, cfg: PipelineConfig) -> None:
    facts = replace(facts_of(clip("mp4"), cfg), duration=None)
    assert validate(facts, cfg) == "duration unknown"
    assert format_duration(7205) == "2:00:05"


def test_facts_read_ntsc_frame_rate_and_fall_back_to_r_frame_rate() -> None:
    def report(avg: str, real: str) -> dict[str, Any]:
        video = {"codec_type": "video", "codec_name": "h264", "width": 640, "height": 480}
        video |= {"avg_frame_rate": avg, "r_frame_rate": real}
        return {"format": {"format_name": "mpegts", "duration": "N/A"}, "streams": [video]}

    assert MediaFacts.from_probe(report("30000/1001", "60/1")).fps == 29.97
    fallback = MediaFacts.from_probe(report("0/0", "25/1"))
    assert (fallback.fps, fallback.duration, fallback.size, fallback.has_audio) == (
        25.0,
        None,
        0,
        False,
    )


def test_plan_is_one_safe_argv_with_input_args_before_the_input(
    tmp_path: Path, cfg: PipelineConfig
) -> None:
    facts = MediaFacts("avi", 10.0, 1000, None, "mpeg4", 320, 240, 25.0, None, True, False)
    plan_cfg = replace(cfg, input_args=("-readrate", "1"), threads=2)
    src = Path("-x.avi")  # relative and dash-first: must still be a file, not an option
    thumbs = [tmp_path / "t-1.jpg", tmp_path / "t-2.jpg"]
    argv = plan_convert(src, tmp_path / "o.flv", tmp_path / "p.jpg", thumbs, facts, plan_cfg)
    assert argv[0] == cfg.ffmpeg
    assert argv[argv.index("-i") + 1] == "file:" + str(Path.cwd() / "-x.avi")
    assert argv.index("-readrate") < argv.index("-i")
    assert argv.count("-i") == 1 and argv.count("-filter_complex") == 1
    # The input is boxed: the file protocol only, the allowed containers' demuxers only.
    at = argv.index("-protocol_whitelist")
    assert argv[at + 1] == "file" and at < argv.index("-i")
    allowed = argv[argv.index("-format_whitelist") + 1].split(",")
    assert "mp4" in allowed and "matroska" in allowed and "hls" not in allowed
    assert argv.index("-format_whitelist") < argv.index("-i")
    for out in ("o.flv", "p.jpg", "t-1.jpg", "t-2.jpg"):
        assert "file:" + str(tmp_path / out) in argv
    # Each image is one file of its own, never a numbered image2 sequence.
    assert argv.count("-update") == 3 and "%" not in " ".join(argv)
    assert argv[argv.index("-flvflags") :][:2] == ["-flvflags", "add_keyframe_index"]
    assert argv[argv.index("-threads") :][:2] == ["-threads", "2"]
    assert "-an" in argv and "0:a:0?" not in argv  # the source has no audio
    assert {"-nostdin", "-nostats", "-y"} <= set(argv)


def test_plan_refuses_media_without_duration_or_video(tmp_path: Path, cfg: PipelineConfig) -> None:
    facts = MediaFacts("avi", None, 1000, None, "mpeg4", 320, 240, 25.0, None, True, False)
    outs = (tmp_path / "o.flv", tmp_path / "p.jpg", [tmp_path / "t-01.jpg"])
    with pytest.raises(MediaError, match="duration unknown"):
        plan_convert(tmp_path / "a.avi", *outs, facts, cfg)
    with pytest.raises(MediaError, match="not a video"):
        plan_convert(tmp_path / "a.avi", *outs, replace(facts, has_video=False), cfg)


def convert(
    src: Path, out_dir: Path, stem: str, cfg: PipelineConfig
) -> tuple[Path, Path, list[Path], list[float]]:
    """Probe, plan and run ffmpeg; return the FLV, poster, thumbnails, progress reports."""
    facts = facts_of(src, cfg)
    flv, poster = out_dir / f"{stem}.flv", out_dir / f"{stem}.jpg"
    thumbs = [out_dir / f"{stem}-{n:02d}.jpg" for n in range(1, cfg.thumbnails + 1)]
    argv = plan_convert(src, flv, poster, thumbs, facts, cfg)
    progress: list[float] = []
    asyncio.run(
        run_ffmpeg(
            argv,
            timeout=60,
            nice=cfg.nice,
            memory_limit=cfg.memory_limit,
            duration=facts.duration,
            on_progress=progress.append,
        )
    )
    return flv, poster, thumbs, progress


def assert_playable_flv(flv: Path, *, audio: bool = True) -> None:
    report = ffprobe_json(flv)
    assert report["format"]["format_name"] == "flv"
    codecs = sorted(s["codec_name"] for s in report["streams"])
    assert codecs == (["aac", "h264"] if audio else ["h264"])
    index = read_on_metadata(flv.read_bytes())["keyframes"]
    assert len(index["times"]) == len(index["filepositions"]) > 0
    assert keyframe_count(flv) == len(index["times"])


@pytest.mark.parametrize("container", ["avi", "mov", "mp4", "mpg", "wmv", "mkv", "webm", "flv"])
def test_one_ffmpeg_run_makes_seekable_flv_poster_and_thumbnails(
    clip: MakeClip, cfg: PipelineConfig, tmp_path: Path, container: str
) -> None:
    flv, poster, thumbs, progress = convert(clip(container), tmp_path, "out", cfg)
    assert_playable_flv(flv)
    assert width_of(poster) == cfg.poster_width
    assert [t.exists() for t in thumbs] == [True] * cfg.thumbnails
    assert [width_of(t) for t in thumbs] == [cfg.thumbnail_width] * cfg.thumbnails
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.flv", "out.jpg", *(t.name for t in thumbs)]
    )
    assert progress and max(progress) >= 0.9 and progress[-1] == 1.0
    assert progress == sorted(progress)


def test_video_without_audio_converts_to_flv_without_audio(
    clip: MakeClip, cfg: PipelineConfig, tmp_path: Path
) -> None:
    flv, poster, _, _ = convert(clip("mp4", audio=False), tmp_path, "silent", cfg)
    assert_playable_flv(flv, audio=False)
    assert poster.exists()


def test_zero_thumbnails_writes_only_flv_and_poster(
    clip: MakeClip, cfg: PipelineConfig, tmp_path: Path
) -> None:
    flv, _, thumbs, _ = convert(clip("mov"), tmp_path, "bare", replace(cfg, thumbnails=0))
    assert thumbs == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.flv", "bare.jpg"]
    assert_playable_flv(flv)


@pytest.mark.parametrize(
    "name",
    ["-x 'q' \"d\"\nline é.mp4", "100% -%02d ?x=1 http:é.mp4"],
    ids=["dash-quotes-newline-unicode", "percent-and-protocol-lookalike"],
)
def test_hostile_file_names_are_converted_as_plain_files(
    cfg: PipelineConfig, tmp_path: Path, name: str
) -> None:
    src = make_clip(tmp_path / name, "mp4")
    out_dir = tmp_path / "converted"
    out_dir.mkdir()
    stem = Path(name).stem
    flv, poster, thumbs, _ = convert(src, out_dir, stem, cfg)
    assert_playable_flv(flv)
    assert poster.exists() and all(t.exists() for t in thumbs)
    assert len(list(out_dir.iterdir())) == 2 + cfg.thumbnails


def slow_argv(cfg: PipelineConfig, clip_path: Path, out: Path) -> list[str]:
    """A conversion that takes ~2 s of wall time: the input is read in real time."""
    facts = facts_of(clip_path, cfg)
    slow = replace(cfg, input_args=("-readrate", "1"))
    return plan_convert(clip_path, out / "o.flv", out / "p.jpg", [out / "t-01.jpg"], facts, slow)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # dead, only waiting to be reaped by init


def test_timeout_kills_ffmpeg_and_raises(
    clip: MakeClip, cfg: PipelineConfig, tmp_path: Path
) -> None:
    pids: list[int] = []
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"^ffmpeg timed out after \d+ s$"):
        asyncio.run(
            run_ffmpeg(
                slow_argv(cfg, clip("mp4"), tmp_path),
                timeout=0.5,
                nice=cfg.nice,
                memory_limit=cfg.memory_limit,
                duration=2.0,
                on_start=pids.append,
            )
        )
    assert time.monotonic() - started < 1.8  # the run itself would take 2 s
    assert len(pids) == 1 and gone(pids[0])


def test_cancelled_run_kills_ffmpeg_and_reraises(
    clip: MakeClip, cfg: PipelineConfig, tmp_path: Path
) -> None:
    pids: list[int] = []
    seen: dict[str, Any] = {}

    def started(pid: int) -> None:
        pids.append(pid)
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        seen["nice"] = int(status[16])  # field 19 of stat: nice
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        seen["memory"] = next(line for line in limits if line.startswith("Max address space"))

    async def cancel_soon() -> None:
        run = asyncio.create_task(
            run_ffmpeg(
                slow_argv(cfg, clip("mp4"), tmp_path),
                timeout=60,
                nice=7,
                memory_limit=3 * 1024**3,
                duration=2.0,
                on_start=started,
            )
        )
        await asyncio.sleep(0.3)
        run.cancel()
        await run

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancel_soon())
    assert len(pids) == 1 and gone(pids[0])
    assert seen["nice"] == min(19, os.nice(0) + 7)
    assert seen["memory"].split()[3:5] == [str(3 * 1024**3)] * 2  # soft and hard


def test_failed_ffmpeg_run_raises_with_its_error_lines(cfg: PipelineConfig, tmp_path: Path) -> None:
    src = make_fake(tmp_path / "fake.mp4")
    facts = MediaFacts("mp4", 2.0, 1000, None, "h264", 320, 240, 25.0, None, True, False)
    argv = plan_convert(
        src, tmp_path / "o.flv", tmp_path / "p.jpg", [tmp_path / "t.jpg"], facts, cfg
    )
    with pytest.raises(MediaError, match=r"^ffmpeg failed \(exit status 1\): ") as caught:
        asyncio.run(run_ffmpeg(argv, timeout=30, nice=0, memory_limit=cfg.memory_limit, duration=2))
    assert "Invalid data found when processing input" in caught.value.reason


def test_failing_progress_callback_is_logged_and_does_not_stop_ffmpeg(
    cfg: PipelineConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "tiny.nut"
    argv = [cfg.ffmpeg, "-nostdin", "-loglevel", "error", "-progress", "pipe:1", "-nostats"]
    argv += ["-f", "lavfi", "-i", "testsrc2=size=64x48:duration=0.2", "file:" + str(out)]

    def broken(fraction: float) -> None:
        raise RuntimeError("listener bug")

    asyncio.run(
        run_ffmpeg(
            argv,
            timeout=30,
            nice=0,
            memory_limit=cfg.memory_limit,
            duration=0.2,
            on_progress=broken,
        )
    )
    assert out.stat().st_size > 0
    assert "listener bug" in caplog.text


def test_ffmpeg_dies_with_the_process_that_started_it(
    clip: MakeClip, cfg: PipelineConfig, tmp_path: Path
) -> None:
    argv = slow_argv(cfg, clip("mp4"), tmp_path)
    script = (
        "import asyncio, json, sys\n"
        "from sftpgate.media.run import run_ffmpeg\n"
        "argv = json.loads(sys.argv[1])\n"
        "started = lambda pid: print(pid, flush=True)\n"
        "asyncio.run(run_ffmpeg(argv, timeout=60, nice=0, memory_limit=2**32,\n"
        "                       duration=None, on_start=started))\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(argv)], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            pid = int(parent.stdout.readline())
            assert not gone(pid)
        finally:
            parent.kill()
    deadline = time.monotonic() + 5
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid)


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A process leading its own group, with an output path in its command line."""
    marker = str(tmp_path / "out dir" / "job-7.flv")
    script = "import time; print('ready', flush=True); time.sleep(30)"
    with subprocess.Popen(
        [sys.executable, "-c", script, marker], stdout=subprocess.PIPE, start_new_session=True
    ) as proc:
        try:
            # Popen returns as soon as exec starts; /proc/<pid>/cmdline is
            # empty until the new program is set up, so wait for it to talk.
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            yield proc, marker
        finally:
            if proc.poll() is None:
                proc.kill()


def test_kill_leftover_kills_process_group_whose_command_line_has_the_marker(
    sleeper: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, marker = sleeper
    assert kill_leftover(proc.pid, marker) is True
    assert proc.wait(5) == -signal.SIGKILL


def test_kill_leftover_refuses_a_process_without_the_marker(
    sleeper: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    proc, _ = sleeper
    assert kill_leftover(proc.pid, str(tmp_path / "other.flv")) is False
    assert kill_leftover(proc.pid, "") is False
    assert kill_leftover(os.getpid(), "pytest") is False
    assert proc.poll() is None  # still running


def amf0(value: Any) -> bytes:
    """Encode a value as AMF0 (just enough for the tests)."""
    if isinstance(value, bool):
        return b"\x01" + bytes([value])
    if isinstance(value, float):
        return b"\x00" + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode()
        return b"\x02" + len(raw).to_bytes(2, "big") + raw
    if value is None:
        return b"\x05"
    if isinstance(value, list):
        return b"\x0a" + len(value).to_bytes(4, "big") + b"".join(amf0(v) for v in value)
    if isinstance(value, dict):
        return b"\x03" + amf0_props(value)
    raise TypeError(value)


def amf0_props(mapping: dict[str, Any]) -> bytes:
    body = b"".join(len(k).to_bytes(2, "big") + k.encode() + amf0(v) for k, v in mapping.items())
    return body + b"\x00\x00\x09"


def flv_with_script(data: bytes) -> bytes:
    header = b"FLV\x01\x05" + (9).to_bytes(4, "big") + (0).to_bytes(4, "big")
    tag = b"\x12" + len(data).to_bytes(3, "big") + bytes(7) + data
    return header + tag + (len(tag)).to_bytes(4, "big")


def test_read_on_metadata_decodes_every_amf0_type() -> None:
    props = {
        "duration": 2.5,
        "stereo": True,
        "encoder": "Lavf",
        "keyframes": {"times": [0.0, 2.0], "filepositions": [13.0, 999.0]},
        "nothing": None,
    }
    extra = (
        (b"\x00\x03odd\x06")  # undefined
        + (b"\x00\x04when\x0b" + struct.pack(">d", 86_400_000.0) + b"\x00\x00")  # date
        + (b"\x00\x04long\x0c" + (3).to_bytes(4, "big") + b"abc")  # long string
    )
    body = amf0_props(props)
    ecma = b"\x08" + (6).to_bytes(4, "big") + body[:-3] + extra + body[-3:]
    meta = read_on_metadata(flv_with_script(amf0("onMetaData") + ecma))
    assert meta["keyframes"] == {"times": [0.0, 2.0], "filepositions": [13.0, 999.0]}
    assert (meta["duration"], meta["stereo"], meta["encoder"]) == (2.5, True, "Lavf")
    assert meta["nothing"] is None and meta["odd"] is None and meta["long"] == "abc"
    assert meta["when"].isoformat() == "1970-01-02T00:00:00+00:00"


def test_read_on_metadata_rejects_non_flv_and_cut_off_data(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="not an FLV file"):
        read_on_metadata(b"RIFF....AVI LIST")
    whole = flv_with_script(amf0("onMetaData") + amf0({"duration": 1.0}))
    with pytest.raises(MediaError, match="cut off"):
        read_on_metadata(whole[:30])
    path = make_fake(tmp_path / "fake.flv")
    with pytest.raises(MediaError, match="not an FLV file"):
        keyframe_count(path)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sidecar_holds_source_output_uploader_and_generator() -> None:
    source = MediaFacts("avi", 2.04, 1234, 5000, "mpeg4", 320, 240, 25.0, "mp3", True, True)
    output = MediaFacts("flv", 2.1, 999, 4000, "h264", 320, 240, 25.0, "aac", True, True)
    uploader = {"login": "alice", "name": "Alice", "surname": "Liddell", "email": "a@x.org"}
    doc = build_sidecar(
        source, "clip.avi", "ab" * 32, uploader, 1714564800.0, output, "clip.flv", 1,
        "clip.jpg", ["clip-01.jpg"],
    )  # fmt: skip
    assert doc["source"]["file"] == "clip.avi"
    assert doc["source"]["video_codec"] == "mpeg4" and doc["source"]["sha256"] == "ab" * 32
    assert doc["source"]["uploader"] == uploader
    assert doc["source"]["uploaded_at"] == "2024-05-01T12:00:00Z"
    assert doc["output"] == {
        "file": "clip.flv",
        "container": "flv",
        "video_codec": "h264",
        "audio_codec": "aac",
        "duration": 2.1,
        "size": 999,
        "bitrate": 4000,
        "width": 320,
        "height": 240,
        "fps": 25.0,
        "keyframes": 1,
        "poster": "clip.jpg",
        "thumbnails": ["clip-01.jpg"],
    }
    assert doc["generator"] == f"sftpgate {__version__}"
    assert json.loads(json.dumps(doc)) == doc
