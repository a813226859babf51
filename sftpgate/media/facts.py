"""What a media file is, boiled down from ffprobe's report (pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import MediaError

# ffprobe dispositions of streams that are pictures, not video: album art in
# an mp3, cover art in an mp4. ffmpeg's own "V" stream specifier skips the
# same ones, so facts and plan agree on which stream is "the video".
_NOT_VIDEO_DISPOSITIONS = ("attached_pic", "timed_thumbnails")


@dataclass(frozen=True, slots=True)
class MediaFacts:
    """The facts the pipeline decides on and reports; None when ffprobe did not say."""

    container: str  # ffprobe format_name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    duration: float | None  # seconds
    size: int  # bytes
    bitrate: int | None  # bits per second, whole file
    video_codec: str | None
    width: int | None
    height: int | None
    fps: float | None
    audio_codec: str | None
    has_video: bool
    has_audio: bool
    # The video stream's own duration and frame count where the container says
    # (they can be far less than ``duration``: video that ends before the audio).
    video_duration: float | None = None
    frames: int | None = None

    @classmethod
    def from_probe(cls, data: Mapping[str, Any]) -> MediaFacts:
        """Build facts from a ``probe()`` report.

        The video stream is the first video stream that is not an attached
        picture; the audio stream is the first audio stream.

        Raises:
            MediaError: the report has no ``format`` section.
        """
        fmt = data.get("format")
        if not isinstance(fmt, Mapping):
            raise MediaError("not a readable media file: no container format found")
        streams = [s for s in data.get("streams") or () if isinstance(s, Mapping)]
        video = next((s for s in streams if _is_video(s)), None)
        audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
        duration = _positive_float(fmt.get("duration"))
        if duration is None and video is not None:
            duration = _positive_float(video.get("duration"))
        return cls(
            container=str(fmt.get("format_name") or "unknown"),
            duration=duration,
            size=_int(fmt.get("size")) or 0,
            bitrate=_int(fmt.get("bit_rate")),
            video_codec=_codec(video),
            width=_int(video.get("width")) if video else None,
            height=_int(video.get("height")) if video else None,
            fps=_fps(video),
            audio_codec=_codec(audio),
            has_video=video is not None,
            has_audio=audio is not None,
            video_duration=_stream_duration(video),
            frames=_int(video.get("nb_frames")) if video else None,
        )

    def pixels(self) -> float | None:
        """Decoded pixels the video costs: width x height x frames; None when unknown.

        Frames are the most of the declared count and frame rate x duration,
        so a file cannot claim little work and decode much. An unknown frame
        rate counts as 60 fps.
        """
        if not self.width or not self.height or not self.duration:
            return None
        frames = max(float(self.frames or 0), (self.fps or 60.0) * self.duration)
        return float(self.width) * self.height * frames

    def picture_duration(self) -> float | None:
        """How long the pictures last: the video stream's duration where shorter than the file's."""
        if self.duration is None:
            return self.video_duration
        if self.video_duration is None:
            return self.duration
        return min(self.duration, self.video_duration)

    def to_dict(self) -> dict[str, Any]:
        """The facts as a JSON-ready dict, one key per field."""
        return asdict(self)


def _is_video(stream: Mapping[str, Any]) -> bool:
    if stream.get("codec_type") != "video":
        return False
    disposition = stream.get("disposition")
    if not isinstance(disposition, Mapping):
        return True
    return not any(disposition.get(key) == 1 for key in _NOT_VIDEO_DISPOSITIONS)


def _stream_duration(stream: Mapping[str, Any] | None) -> float | None:
    """A stream's own duration: ffprobe's field, else Matroska's ``DURATION`` tag (h:mm:ss.f)."""
    if stream is None:
        return None
    seconds = _positive_float(stream.get("duration"))
    tags = stream.get("tags")
    if seconds is None and isinstance(tags, Mapping):
        text = tags.get("DURATION") or tags.get("duration")
        if isinstance(text, str) and text.count(":") == 2:
            hours, minutes, rest = text.split(":")
            try:
                total = int(hours) * 3600 + int(minutes) * 60 + float(rest)
            except ValueError:
                return None
            seconds = _positive_float(total)
    return seconds


def _codec(stream: Mapping[str, Any] | None) -> str | None:
    if stream is None:
        return None
    return str(stream.get("codec_name") or "unknown")


def _positive_float(value: Any) -> float | None:
    """ffprobe prints numbers as strings and "N/A" when unknown."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _int(value: Any) -> int | None:
    number = _positive_float(value)
    return int(number) if number is not None else None


def _rate(value: Any) -> float | None:
    """``"30000/1001"`` -> 29.97; ``"0/0"`` (ffprobe's "unknown") -> None."""
    if not isinstance(value, str):
        return None
    num, _, den = value.partition("/")
    top, bottom = _positive_float(num), _positive_float(den or "1")
    if top is None or bottom is None:
        return None
    return top / bottom


def _fps(video: Mapping[str, Any] | None) -> float | None:
    if video is None:
        return None
    rate = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
    return round(rate, 3) if rate is not None else None
