"""Read an FLV file's onMetaData (AMF0), e.g. to check its keyframe index (pure + one reader).

FLV layout: a 9-byte header (``FLV``, version, flags, header size), then
tags, each preceded by the 4-byte size of the previous tag. A tag is 11
bytes (type, 24-bit data size, timestamp, stream id) then its data. Script
tags (type 18) hold two AMF0 values: the name ``onMetaData`` and a mapping.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import MediaError

SCRIPT_TAG = 18
_TAG_HEADER = 11
_MAX_DEPTH = 64  # nesting allowed in AMF0 values; ffmpeg writes 3 levels
READ_LIMIT = 8 * 1024 * 1024


def read_on_metadata(data: bytes) -> dict[str, Any]:
    """Parse the FLV header and the first script tag; return its onMetaData mapping.

    AMF0 numbers become floats, booleans bools, strings str, objects and ECMA
    arrays dicts, strict arrays lists, null/undefined None, dates aware UTC
    datetimes. With ffmpeg's ``-flvflags add_keyframe_index`` the result has
    ``["keyframes"]["times"]`` and ``["keyframes"]["filepositions"]``.

    Raises:
        MediaError: ``data`` is not FLV, has no script tag, the first script
            tag is not onMetaData, or it is cut off or malformed.
    """
    if len(data) < 9 or data[:3] != b"FLV":
        raise MediaError("not an FLV file")
    pos = struct.unpack_from(">I", data, 5)[0] + 4  # header, then PreviousTagSize0
    while pos + _TAG_HEADER <= len(data):
        kind = data[pos] & 0x1F  # the upper bits are "reserved" and "filter"
        size = int.from_bytes(data[pos + 1 : pos + 4], "big")
        body = pos + _TAG_HEADER
        if kind == SCRIPT_TAG:
            if body + size > len(data):
                raise MediaError("FLV onMetaData is cut off")
            reader = _Amf0(data[body : body + size])
            name = reader.value()
            if name != "onMetaData":
                raise MediaError(f"FLV script tag is {name!r}, not onMetaData")
            meta = reader.value()
            if not isinstance(meta, dict):
                raise MediaError("FLV onMetaData is not a mapping")
            return meta
        pos = body + size + 4
    raise MediaError("FLV has no onMetaData tag")


def keyframe_count(source: Path | int, limit: int = READ_LIMIT) -> int:
    """Number of entries in the FLV's onMetaData keyframe index; 0 when there is none.

    ``source`` is a path or a descriptor open for reading (read with
    ``pread``, its offset left alone). Reads at most ``limit`` bytes from the
    start of the file (the metadata tag comes first; 8 MiB holds an index of
    ~400,000 keyframes).

    Raises:
        MediaError: not FLV, metadata unreadable within ``limit``, or the
            index's ``times`` and ``filepositions`` differ in length.
        OSError: the file cannot be read.
    """
    if isinstance(source, int):
        meta = read_on_metadata(os.pread(source, limit, 0))
    else:
        with source.open("rb") as f:
            meta = read_on_metadata(f.read(limit))
    index = meta.get("keyframes")
    if not isinstance(index, dict):
        return 0
    times, positions = index.get("times"), index.get("filepositions")
    if not isinstance(times, list) or not isinstance(positions, list):
        return 0
    if len(times) != len(positions):
        raise MediaError(
            f"FLV keyframe index is inconsistent: {len(times)} times, "
            f"{len(positions)} file positions"
        )
    return len(times)


class _Amf0:
    """A cursor over AMF0-encoded bytes; one method per type marker."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.depth = 0
        self.complex: list[Any] = []  # objects and arrays, for reference markers
        self.readers: dict[int, Callable[[], Any]] = {
            0x00: self.number,
            0x01: self.boolean,
            0x02: self.string,
            0x03: self.object,
            0x05: lambda: None,  # null
            0x06: lambda: None,  # undefined
            0x07: self.reference,
            0x08: self.ecma_array,
            0x0A: self.strict_array,
            0x0B: self.date,
            0x0C: self.long_string,
            0x0D: lambda: None,  # unsupported
            0x0F: self.long_string,  # XML document
            0x10: self.typed_object,
        }

    def take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise MediaError("FLV onMetaData is cut off")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self) -> Any:
        marker = self.unpack(">B")
        reader = self.readers.get(marker)
        if reader is None:
            raise MediaError(f"FLV onMetaData has unknown AMF0 type {marker}")
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise MediaError("FLV onMetaData is nested too deeply")
        try:
            return reader()
        finally:
            self.depth -= 1

    def number(self) -> float:
        return float(self.unpack(">d"))

    def boolean(self) -> bool:
        return bool(self.unpack(">B"))

    def string(self) -> str:
        return self.take(self.unpack(">H")).decode("utf-8", errors="replace")

    def long_string(self) -> str:
        return self.take(self.unpack(">I")).decode("utf-8", errors="replace")

    def date(self) -> datetime:
        millis = self.number()
        self.take(2)  # time zone: "reserved, not supported, should be 0"
        try:
            return datetime.fromtimestamp(millis / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise MediaError("FLV onMetaData has an impossible date") from None

    def properties(self, into: dict[str, Any]) -> dict[str, Any]:
        """Key/value pairs up to the object-end marker (empty key, then 0x09)."""
        while True:
            key = self.string()
            if not key and self.data[self.pos : self.pos + 1] == b"\x09":
                self.pos += 1
                return into
            into[key] = self.value()

    def object(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        self.complex.append(result)
        return self.properties(result)

    def typed_object(self) -> dict[str, Any]:
        self.string()  # class name
        return self.object()

    def ecma_array(self) -> dict[str, Any]:
        self.take(4)  # approximate count; the end marker is what counts
        return self.object()

    def strict_array(self) -> list[Any]:
        count = self.unpack(">I")
        if count > len(self.data) - self.pos:  # every value takes at least one byte
            raise MediaError("FLV onMetaData is cut off")
        result: list[Any] = []
        self.complex.append(result)
        result.extend(self.value() for _ in range(count))
        return result

    def reference(self) -> Any:
        index = self.unpack(">H")
        if index >= len(self.complex):
            raise MediaError("FLV onMetaData has a dangling AMF0 reference")
        return self.complex[index]
