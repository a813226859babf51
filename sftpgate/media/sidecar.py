"""The JSON sidecar written next to the FLV: what came in, what went out."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from .facts import MediaFacts

CHUNK = 1024 * 1024
UPLOADER_KEYS = ("login", "name", "surname", "email")
_FACT_KEYS = (
    "container",
    "video_codec",
    "audio_codec",
    "duration",
    "size",
    "bitrate",
    "width",
    "height",
    "fps",
)


def sha256_file(source: Path | int) -> str:
    """Hex SHA-256 of the file's contents, read in 1 MiB chunks. Blocking.

    ``source`` is a path or a descriptor open for reading (read from offset
    0 with ``pread``, its own offset left alone).

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    if isinstance(source, int):
        offset = 0
        while chunk := os.pread(source, CHUNK, offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest()
    with source.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_sidecar(
    source: MediaFacts,
    source_name: str,
    sha256: str,
    uploader: Mapping[str, Any],
    uploaded_at: float,
    output: MediaFacts,
    flv_name: str,
    keyframes: int,
    poster: str | None,
    thumbnails: list[str],
) -> dict[str, Any]:
    """The sidecar document: ``{"source": ..., "output": ..., "generator": ...}``.

    ``source`` holds the upload's file name, facts, sha256, the uploader
    (login, name, surname, email; missing ones as None) and ``uploaded_at``
    (a Unix time) as ISO 8601 UTC, e.g. ``"2024-05-01T12:00:00Z"``. ``output``
    holds the FLV's file name, facts, keyframe count, poster and thumbnail
    file names (the poster None when ffmpeg could not make it). Pure; never raises
    for well-typed input.
    """
    stamp = datetime.fromtimestamp(uploaded_at, tz=UTC).isoformat(timespec="seconds")
    return {
        "source": {
            "file": source_name,
            **_facts(source),
            "sha256": sha256,
            "uploader": {key: uploader.get(key) for key in UPLOADER_KEYS},
            "uploaded_at": stamp.replace("+00:00", "Z"),
        },
        "output": {
            "file": flv_name,
            **_facts(output),
            "keyframes": keyframes,
            "poster": poster,
            "thumbnails": list(thumbnails),
        },
        "generator": f"sftpgate {__version__}",
    }


def _facts(facts: MediaFacts) -> dict[str, Any]:
    values = facts.to_dict()
    return {key: values[key] for key in _FACT_KEYS}
