"""The one ffmpeg command that makes the FLV, the poster and the thumbnails (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ffmpeg  # type: ignore[import-untyped]  # ffmpeg-python ships no types

from ..config import PipelineConfig
from . import MediaError
from .facts import MediaFacts
from .probe import file_url
from .sandbox import input_args

GLOBAL_ARGS = ("-nostdin", "-hide_banner", "-loglevel", "error", "-y")
# Progress as key=value lines on stdout; -nostats drops the human status line
# that would otherwise fill stderr, which we keep for error messages.
PROGRESS_ARGS = ("-progress", "pipe:1", "-nostats")
POSTER_AT = 0.10  # fraction of the duration where the poster frame is taken
JPEG_QUALITY = 3  # mjpeg -q:v, 2 (best) .. 31


def plan_convert(
    src: Path,
    flv_out: Path,
    poster_out: Path,
    thumbs_out: Sequence[Path],
    facts: MediaFacts,
    cfg: PipelineConfig,
) -> list[str]:
    """Return the argv of ONE ffmpeg run that decodes ``src`` once and writes three outputs.

    1. ``flv_out``: H.264 (libx264, ``cfg.preset``/``cfg.crf``, yuv420p, even
       size, square pixels) + AAC at ``cfg.audio_bitrate`` when the source has
       audio, muxed as FLV with a keyframe index in onMetaData.
    2. ``poster_out``: one JPEG from 10 % into the clip, ``cfg.poster_width`` wide.
    3. ``thumbs_out``: one JPEG each, from the middle of each of as many
       equal slices of the clip, ``cfg.thumbnail_width`` wide (none when the
       list is empty).

    Every output is one file ffmpeg opens by the name given, never a
    numbered sequence: callers pass ``/proc/self/fd/N`` of files they made
    themselves. The times come from ``facts.picture_duration()``: the
    video stream's own duration where it ends before the file does (video
    shorter than its audio), so every image has a frame to show. Should a
    stream end earlier still than it says, ffmpeg succeeds but leaves some
    images empty: callers keep what was written.

    ``argv[0]`` is ``cfg.ffmpeg``; the input is boxed (``-protocol_whitelist
    file``, ``-format_whitelist`` of ``cfg.allowed_containers``), then
    ``cfg.input_args``, right before ``-i``; every file is given as
    ``file:`` + absolute path. Progress goes to stdout (``-progress
    pipe:1``), errors to stderr.

    Raises:
        MediaError: ``facts`` have no video stream or no duration.
    """
    if not facts.has_video:
        raise MediaError("not a video: no video stream")
    if facts.duration is None or facts.duration <= 0:
        raise MediaError("duration unknown")
    duration = facts.picture_duration() or facts.duration
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
        _still(video[1], poster_out, duration * POSTER_AT, cfg.poster_width),
    ]
    # The middle of each of len(thumbs_out) equal slices.
    step = duration / max(1, len(thumbs_out))
    for index, out in enumerate(thumbs_out):
        outputs.append(_still(video[2 + index], out, step / 2 + index * step, cfg.thumbnail_width))
    args: list[str] = ffmpeg.merge_outputs(*outputs).get_args()
    # ffmpeg-python takes input options only as keyword arguments; ours are a
    # free-form list, so they go in by hand, right before the one "-i".
    at = args.index("-i")
    return [
        cfg.ffmpeg,
        *GLOBAL_ARGS,
        *PROGRESS_ARGS,
        *args[:at],
        *input_args(cfg.allowed_containers),
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


def _still(video: Any, out: Path, at: float, width: int) -> Any:
    # Two frames: the first one at once, then the first at or after ``at``,
    # each written over the last (update=1), so the file ends as the frame
    # at ``at`` (or the first frame, should the video end earlier). The
    # early frame matters: ffmpeg reports no progress until every output
    # has started, and an output that waits for a late frame holds it back.
    # Scaling comes after the select, so only those two frames are scaled.
    when = _seconds(at)
    frame = video.filter("select", f"eq(n,0)+gte(t,{when})*lt(prev_selected_t,{when})").filter(
        "scale", width, -2
    )
    # update=1: a single image whose name is used as is, so a "%" in it is
    # not taken for an image2 sequence pattern. passthrough: no copies of
    # the first frame to fill the time up to the second.
    return ffmpeg.output(
        frame,
        file_url(out),
        **{
            "frames:v": 2,
            "update": 1,
            "f": "image2",
            "c:v": "mjpeg",
            "q:v": JPEG_QUALITY,
            "fps_mode": "passthrough",
        },
    )


def _seconds(value: float) -> str:
    return f"{value:.6f}"
