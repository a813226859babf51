"""Decide whether probed media is an allowed video (pure)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import PipelineConfig
from .facts import MediaFacts


def validate(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    """Return None when ``facts`` describe an allowed video, else a short reason.

    The reason is meant for the uploader, e.g. ``"container 'wav' is not
    allowed"`` or ``"too long: 2:00:05 (max 1:00:00)"``. Checks run in a fixed
    order and the first failing one wins. Never raises.
    """
    for check in _CHECKS:
        reason = check(facts, cfg)
        if reason is not None:
            return reason
    return None


def _video(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    if facts.has_video:
        return None
    if facts.has_audio:
        return "not a video: no video stream (audio only)"
    return "not a video: no video stream"


def _container(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    # ffprobe names one demuxer by all its formats ("mov,mp4,m4a,3gp,3g2,mj2"),
    # and config entries may be written the same way: any shared part allows.
    allowed = {p.strip().lower() for entry in cfg.allowed_containers for p in entry.split(",")}
    parts = {p.strip().lower() for p in facts.container.split(",")}
    if parts & allowed:
        return None
    return f"container '{facts.container}' is not allowed"


def _codec(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    codec = (facts.video_codec or "unknown").lower()
    if codec in {c.lower() for c in cfg.allowed_video_codecs}:
        return None
    return f"video codec '{codec}' is not allowed"


def _duration(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    if facts.duration is None or facts.duration <= 0:
        return "duration unknown"
    if facts.duration > cfg.max_duration:
        # Round the clip up and the limit down, so "too long" never shows
        # two equal times.
        shown = format_duration(math.ceil(facts.duration))
        return f"too long: {shown} (max {format_duration(math.floor(cfg.max_duration))})"
    return None


def _resolution(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    if facts.width is None or facts.height is None:
        return "video size unknown"
    if facts.width > cfg.max_width or facts.height > cfg.max_height:
        return f"resolution {facts.width}x{facts.height} exceeds {cfg.max_width}x{cfg.max_height}"
    return None


def _size(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    if facts.size > cfg.max_size:
        return f"file too large: {format_size(facts.size)} (max {format_size(cfg.max_size)})"
    return None


# Below this much work (a few minutes of 1080p) the work-per-byte rule does not
# apply: a short, very still clip is legitimately small.
WORK_PER_BYTE_FLOOR = 1e10


def _work(facts: MediaFacts, cfg: PipelineConfig) -> str | None:
    # What ffmpeg will decode, not what the upload weighs: an hour of black
    # 4K fits in 9 MiB and costs hours of CPU.
    pixels = facts.pixels()
    if pixels is None:
        return "video size unknown"
    if pixels > cfg.max_pixels:
        return (
            f"too much work: {format_pixels(pixels)} pixels to convert "
            f"(max {format_pixels(cfg.max_pixels)})"
        )
    if pixels > WORK_PER_BYTE_FLOOR and pixels > cfg.max_pixels_per_byte * max(1, facts.size):
        return (
            f"too much work for its size: {format_pixels(pixels)} pixels to convert from "
            f"{format_size(facts.size)} (max {cfg.max_pixels_per_byte:,} a byte)"
        )
    return None


def work_timeout(facts: MediaFacts, cfg: PipelineConfig) -> float:
    """ffmpeg's timeout for ``facts``: 60 s + pixels / ``cfg.work_rate``, at most ``cfg.timeout``.

    Unknown work gets ``cfg.timeout``. Pure.
    """
    pixels = facts.pixels()
    if pixels is None:
        return cfg.timeout
    return min(cfg.timeout, 60.0 + pixels / cfg.work_rate)


_CHECKS: tuple[Callable[[MediaFacts, PipelineConfig], str | None], ...] = (
    _video,
    _container,
    _codec,
    _duration,
    _resolution,
    _size,
    _work,
)


def format_pixels(value: float) -> str:
    """``7.5e11`` -> ``"7.5e+11"``; below a million, whole: ``"76,800"``."""
    if value < 1e6:
        return f"{int(value):,}"
    return f"{value:.2g}"


def format_duration(seconds: float) -> str:
    """``7205`` -> ``"2:00:05"`` (hours are not padded, fractions are dropped)."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_size(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below 1 KiB."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
