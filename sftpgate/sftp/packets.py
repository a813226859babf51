"""Decoded SFTP packets: plain, frozen data. Pure."""

from __future__ import annotations

from dataclasses import dataclass

# -- decoded packets -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attrs:
    """SFTP v3 ATTRS; ``None`` = not sent. ``uid`` and ``gid`` travel together."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    permissions: int | None = None
    atime: int | None = None
    mtime: int | None = None
    extended: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class NameEntry:
    """One entry of a NAME reply."""

    filename: bytes
    longname: bytes = b""
    attrs: Attrs = Attrs()


@dataclass(frozen=True, slots=True)
class Request:
    """A client packet. Fields a type does not carry stay ``None``.

    ``path``/``path2`` are in wire order: for SYMLINK (OpenSSH order) ``path``
    is the target and ``path2`` the link; for RENAME, posix-rename and
    hardlink ``path`` is the old path. WRITE keeps only ``data_len``. EXTENDED
    sets ``extension`` and its parsed arguments (copy-data: ``handle``,
    ``offset``, ``length``, ``handle2``, ``offset2``); an unknown extension
    keeps its name and ``data_len`` = the length of its payload. INIT sets
    ``version`` and ``extensions`` (its ``id`` is 0: INIT has none on the wire).
    """

    type: int
    id: int = 0
    path: bytes | None = None
    path2: bytes | None = None
    handle: bytes | None = None
    handle2: bytes | None = None
    pflags: int | None = None
    attrs: Attrs | None = None
    offset: int | None = None
    offset2: int | None = None
    length: int | None = None
    data_len: int | None = None
    extension: str | None = None
    username: bytes | None = None
    uids: tuple[int, ...] | None = None
    gids: tuple[int, ...] | None = None
    version: int | None = None
    extensions: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """A server packet. DATA keeps only ``data_len``; EXTENDED_REPLY keeps its raw payload
    in ``ext_data`` (its layout depends on the request, which this side cannot see).
    STATUS from a non-OpenSSH server may omit ``message``/``lang`` (then ``None``).
    VERSION sets ``version`` and ``extensions`` (``id`` 0).
    """

    type: int
    id: int = 0
    code: int | None = None
    message: bytes | None = None
    lang: bytes | None = None
    handle: bytes | None = None
    data_len: int | None = None
    names: tuple[NameEntry, ...] = ()
    attrs: Attrs | None = None
    ext_data: bytes | None = None
    version: int | None = None
    extensions: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def count(self) -> int:
        """Number of names in a NAME reply."""
        return len(self.names)


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The stream stopped making sense at byte ``offset`` (start of the packet)."""

    reason: str
    offset: int


Packet = Request | Reply


class DecodeError(ValueError):
    """A packet body does not decode. Internal: the reader turns it into a ProtocolError."""
