"""The one ffmpeg command that makes the FLV, the poster and the thumbnails (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ffmpeg  # type: ignore[import-untyped]  # ffmpeg-python ships no types

from ..config import PipelineConfig
from . import MediaError
from .facts import MediaFacts
from .probe import file_url

GLOBAL_ARGS = ("-nostdin", "-hide_banner", "-loglevel", "error", "-y")
# Progress as key=value lines on stdout; -nostats drops the human status line
# that would otherwise fill stderr, which we keep for error messages.
PROGRESS_ARGS = ("-progress", "pipe:1", "-nostats")
POSTER_AT = 0.10  # fraction of the duration where the poster frame is taken
JPEG_QUALITY = 3  # mjpeg -q:v, 2 (best) .. 31


def thumbnail_pattern(folder: Path, stem: str) -> Path:
    """``folder/<stem>-%02d.jpg`` with any ``%`` in ``stem`` doubled for ffmpeg's image2."""
    return folder / f"{stem.replace('%', '%%')}-%02d.jpg"


def thumbnail_files(folder: Path, stem: str, count: int) -> list[Path]:
    """The files ffmpeg writes for ``thumbnail_pattern(folder, stem)``: numbered from 1."""
    return [folder / f"{stem}-{n:02d}.jpg" for n in range(1, count + 1)]


def plan_convert(
    src: Path,
    flv_out: Path,
    poster_out: Path,
    thumbs_pattern: Path,
    facts: MediaFacts,
    cfg: PipelineConfig,
) -> list[str]:
    """Return the argv of ONE ffmpeg run that decodes ``src`` once and writes three outputs.

    1. ``flv_out``: H.264 (libx264, ``cfg.preset``/``cfg.crf``, yuv420p, even
       size, square pixels) + AAC at ``cfg.audio_bitrate`` when the source has
       audio, muxed as FLV with a keyframe index in onMetaData.
    2. ``poster_out``: one JPEG from 10 % into the clip, ``cfg.poster_width`` wide.
    3. ``thumbs_pattern`` (an image2 pattern such as ``/d/name-%02d.jpg``, see
       ``thumbnail_pattern``): ``cfg.thumbnails`` JPEGs, one from the middle of
       each of as many equal slices of the clip, ``cfg.thumbnail_width`` wide.
       Left out when ``cfg.thumbnails`` is 0.

    The times come from ``facts.duration`` (the container's): should the
    video stream end much earlier, ffmpeg still succeeds but writes fewer
    thumbnails, or no poster, so callers check which files exist.

    ``argv[0]`` is ``cfg.ffmpeg``; ``cfg.input_args`` come right before ``-i``;
    every file is given as ``file:`` + absolute path. Progress goes to stdout
    (``-progress pipe:1``), errors to stderr.

    Raises:
        MediaError: ``facts`` have no video stream or no duration.
    """
    if not facts.has_video:
        raise MediaError("not a video: no video stream")
    if facts.duration is None or facts.duration <= 0:
        raise MediaError("duration unknown")
    duration = facts.duration
    source = ffmpeg.input(file_url(src))
    # "V" rather than "v": skips attached pictures (cover art), as facts do.
    # Square pixels and even sizes first: Flash players ignore the sample
    # aspect ratio and yuv420p needs even dimensions.
    video = (
        source["V:0"]
        .filter("scale", "trunc(iw*sar/2)*2", "trunc(ih/2)*2")
        .filter("setsar", 1)
        .split()
    )
    outputs = [
        _flv(video[0], source, flv_out, facts, cfg),
        _poster(video[1], poster_out, duration, cfg),
    ]
    if cfg.thumbnails > 0:
        outputs.append(_thumbnails(video[2], thumbs_pattern, duration, cfg))
    args: list[str] = ffmpeg.merge_outputs(*outputs).get_args()
    # ffmpeg-python takes input options only as keyword arguments; ours are a
    # free-form list, so they go in by hand, right before the one "-i".
    at = args.index("-i")
    return [
        cfg.ffmpeg,
        *GLOBAL_ARGS,
        *PROGRESS_ARGS,
        *args[:at],
        *cfg.input_args,
        *args[at:],
    ]


def _flv(video: Any, source: Any, out: Path, facts: MediaFacts, cfg: PipelineConfig) -> Any:
    streams = [video]
    options: dict[str, Any] = {
        "c:v": "libx264",
        "preset": cfg.preset,
        "crf": cfg.crf,
        "pix_fmt": "yuv420p",
        "f": "flv",
        # Written at the end into onMetaData ("keyframes": times and
        # filepositions), which is what lets Flash players seek.
        "flvflags": "add_keyframe_index",
    }
    if cfg.threads > 0:
        options["threads"] = cfg.threads
    if facts.has_audio:
        # "?" keeps ffmpeg going should the probe have seen audio that the
        # decoder then cannot find.
        streams.append(source["a:0?"])
        options.update({"c:a": "aac", "b:a": cfg.audio_bitrate})
    else:
        options["an"] = None
    return ffmpeg.output(*streams, file_url(out), **options)


def _poster(video: Any, out: Path, duration: float, cfg: PipelineConfig) -> Any:
    # The second trim lets exactly one frame through: without it the branch
    # stays open and scales (then drops) every later frame, ~15% of the run.
    frame = (
        video.trim(start=_seconds(duration * POSTER_AT))
        .trim(end_frame=1)
        .filter("scale", cfg.poster_width, -2)
    )
    # update=1: a single image whose name is used as is, so a "%" in it is
    # not taken for an image2 sequence pattern.
    return ffmpeg.output(
        frame,
        file_url(out),
        **{"frames:v": 1, "update": 1, "f": "image2", "c:v": "mjpeg", "q:v": JPEG_QUALITY},
    )


def _thumbnails(video: Any, pattern: Path, duration: float, cfg: PipelineConfig) -> Any:
    count = cfg.thumbnails
    step = duration / count
    first = step / 2
    # Keep the first frame at or after first + k*step, for each k. Not
    # fps=count/duration: at end of stream the fps filter rounds the last
    # slot away and writes one thumbnail too few.
    slot = f"floor((t-{_seconds(first)})/{_seconds(step)})"
    last = f"floor((prev_selected_t-{_seconds(first)})/{_seconds(step)})"
    expr = f"gte(t,{_seconds(first)})*(isnan(prev_selected_t)+gt({slot},{last}))"
    frames = video.filter("select", expr).filter("scale", cfg.thumbnail_width, -2)
    return ffmpeg.output(
        frames,
        file_url(pattern),
        **{
            "frames:v": count,
            "f": "image2",
            "c:v": "mjpeg",
            "q:v": JPEG_QUALITY,
            # One file per selected frame: no duplicates to fill the gaps.
            "fps_mode": "passthrough",
        },
    )


def _seconds(value: float) -> str:
    return f"{value:.6f}"
