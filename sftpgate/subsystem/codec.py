"""SFTP version 3 as OpenSSH speaks it: packets, an encoder and a streaming reader. Pure.

The subsystem tap relays bytes between sshd and OpenSSH's ``sftp-server``
unchanged and feeds a COPY of each direction to a :class:`PacketReader`. The
reader turns bytes into :class:`Request` (client → server) or :class:`Reply`
(server → client) objects. It never raises, never keeps a WRITE or DATA
payload (only its length) and gives up on a stream it cannot frame, saying so
once with a :class:`ProtocolError`.

Wire details follow OpenSSH rather than the draft where they differ: SYMLINK
carries ``(targetpath, linkpath)`` and the extensions are those listed in
OpenSSH's PROTOCOL file. Like ``sftp-server``, the reader ignores bytes left
over at the end of a packet and frames (but does not interpret) unknown types.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

# -- packet types -------------------------------------------------------------

FXP_INIT: Final = 1
FXP_VERSION: Final = 2
FXP_OPEN: Final = 3
FXP_CLOSE: Final = 4
FXP_READ: Final = 5
FXP_WRITE: Final = 6
FXP_LSTAT: Final = 7
FXP_FSTAT: Final = 8
FXP_SETSTAT: Final = 9
FXP_FSETSTAT: Final = 10
FXP_OPENDIR: Final = 11
FXP_READDIR: Final = 12
FXP_REMOVE: Final = 13
FXP_MKDIR: Final = 14
FXP_RMDIR: Final = 15
FXP_REALPATH: Final = 16
FXP_STAT: Final = 17
FXP_RENAME: Final = 18
FXP_READLINK: Final = 19
FXP_SYMLINK: Final = 20
FXP_STATUS: Final = 101
FXP_HANDLE: Final = 102
FXP_DATA: Final = 103
FXP_NAME: Final = 104
FXP_ATTRS: Final = 105
FXP_EXTENDED: Final = 200
FXP_EXTENDED_REPLY: Final = 201

# -- status codes (0-8 are v3; the rest are later drafts, named for completeness) ---

FX_OK: Final = 0
FX_EOF: Final = 1
FX_NO_SUCH_FILE: Final = 2
FX_PERMISSION_DENIED: Final = 3
FX_FAILURE: Final = 4
FX_BAD_MESSAGE: Final = 5
FX_NO_CONNECTION: Final = 6
FX_CONNECTION_LOST: Final = 7
FX_OP_UNSUPPORTED: Final = 8

# fmt: off
_STATUS_NAMES: Final = (
    "ok", "eof", "no_such_file", "permission_denied", "failure", "bad_message", "no_connection",
    "connection_lost", "op_unsupported", "invalid_handle", "no_such_path",
    "file_already_exists", "write_protect", "no_media", "no_space_on_filesystem",
    "quota_exceeded", "unknown_principal", "lock_conflict", "dir_not_empty", "not_a_directory",
    "invalid_filename", "link_loop", "cannot_delete", "invalid_parameter",
    "file_is_a_directory", "byte_range_lock_conflict", "byte_range_lock_refused",
    "delete_pending", "file_corrupt", "owner_invalid", "group_invalid",
    "no_matching_byte_range_lock",
)
# fmt: on


def status_name(code: int) -> str:
    """The journal's name for an SFTP status code: ``0`` → ``"ok"``, ``2`` → ``"no_such_file"``."""
    if 0 <= code < len(_STATUS_NAMES):
        return _STATUS_NAMES[code]
    return f"status_{code}"


# -- attribute flags and open flags ---------------------------------------------

ATTR_SIZE: Final = 0x00000001
ATTR_UIDGID: Final = 0x00000002
ATTR_PERMISSIONS: Final = 0x00000004
ATTR_ACMODTIME: Final = 0x00000008
ATTR_EXTENDED: Final = 0x80000000

FXF_READ: Final = 0x01
FXF_WRITE: Final = 0x02
FXF_APPEND: Final = 0x04
FXF_CREAT: Final = 0x08
FXF_TRUNC: Final = 0x10
FXF_EXCL: Final = 0x20

# -- extended requests OpenSSH's sftp-server answers --------------------------------

EXT_POSIX_RENAME: Final = "posix-rename@openssh.com"
EXT_HARDLINK: Final = "hardlink@openssh.com"
EXT_FSYNC: Final = "fsync@openssh.com"
EXT_STATVFS: Final = "statvfs@openssh.com"
EXT_FSTATVFS: Final = "fstatvfs@openssh.com"
EXT_LSETSTAT: Final = "lsetstat@openssh.com"
EXT_LIMITS: Final = "limits@openssh.com"
EXT_EXPAND_PATH: Final = "expand-path@openssh.com"
EXT_COPY_DATA: Final = "copy-data"
EXT_HOME_DIRECTORY: Final = "home-directory"
EXT_USERS_GROUPS_BY_ID: Final = "users-groups-by-id@openssh.com"

# OpenSSH's SFTP_MAX_MSG_LENGTH is 256 KiB; a little slack for other clients' headers.
MAX_PACKET: Final = 256 * 1024 + 1024

Direction = Literal["client", "server"]


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


# -- decoding -----------------------------------------------------------------------

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class _Cursor:
    """Reads SSH wire types from a packet body, raising DecodeError past its end."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def _take(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.end - start:
            raise DecodeError(f"{what} runs past the end of the packet")
        self.pos = start + n
        return start

    def u8(self) -> int:
        return int(self.buf[self._take(1, "byte")])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.buf, self._take(4, "uint32"))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.buf, self._take(8, "uint64"))[0])

    def string(self) -> bytes:
        n = self.u32()
        start = self._take(n, "string")
        return bytes(self.buf[start : start + n])

    def more(self) -> bool:
        return self.pos < self.end

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & ATTR_SIZE else None
        uid = gid = None
        if flags & ATTR_UIDGID:
            uid, gid = self.u32(), self.u32()
        permissions = self.u32() if flags & ATTR_PERMISSIONS else None
        atime = mtime = None
        if flags & ATTR_ACMODTIME:
            atime, mtime = self.u32(), self.u32()
        extended: tuple[tuple[bytes, bytes], ...] = ()
        if flags & ATTR_EXTENDED:
            count = self.u32()
            # Each pair needs at least 8 bytes: refuse a count the packet cannot hold.
            if count > (self.end - self.pos) // 8:
                raise DecodeError("attribute extension count runs past the end of the packet")
            extended = tuple((self.string(), self.string()) for _ in range(count))
        return Attrs(size, uid, gid, permissions, atime, mtime, extended)

    def pairs(self) -> tuple[tuple[bytes, bytes], ...]:
        out: list[tuple[bytes, bytes]] = []
        while self.more():
            out.append((self.string(), self.string()))
        return tuple(out)


def _u32_list(raw: bytes) -> tuple[int, ...]:
    if len(raw) % 4:
        raise DecodeError("id list is not a whole number of uint32")
    return tuple(v for (v,) in _U32.iter_unpack(raw))


def _path_req(t: int, i: int, c: _Cursor) -> Request:
    return Request(t, i, path=c.string())


def _handle_req(t: int, i: int, c: _Cursor) -> Request:
    return Request(t, i, handle=c.string())


def _two_path_req(t: int, i: int, c: _Cursor) -> Request:
    return Request(t, i, path=c.string(), path2=c.string())


def _path_attrs_req(t: int, i: int, c: _Cursor) -> Request:
    return Request(t, i, path=c.string(), attrs=c.attrs())


def _dec_open(t: int, i: int, c: _Cursor) -> Request:
    return Request(t, i, path=c.string(), pflags=c.u32(), attrs=c.attrs())


def _dec_read(t: int, i: int, c: _Cursor) -> Request:
    return Request(t, i, handle=c.string(), offset=c.u64(), length=c.u32())


def _dec_write(t: int, i: int, c: _Cursor) -> Request:
    handle, offset, n = c.string(), c.u64(), c.u32()
    c._take(n, "WRITE data")
    return Request(t, i, handle=handle, offset=offset, data_len=n)


def _dec_fsetstat(t: int, i: int, c: _Cursor) -> Request:
    return Request(t, i, handle=c.string(), attrs=c.attrs())


def _ext_none(name: str, i: int, c: _Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name)


def _ext_path(name: str, i: int, c: _Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, path=c.string())


def _ext_two_paths(name: str, i: int, c: _Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, path=c.string(), path2=c.string())


def _ext_handle(name: str, i: int, c: _Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, handle=c.string())


def _ext_lsetstat(name: str, i: int, c: _Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, path=c.string(), attrs=c.attrs())


def _ext_copy_data(name: str, i: int, c: _Cursor) -> Request:
    handle, offset, length = c.string(), c.u64(), c.u64()
    return Request(
        FXP_EXTENDED,
        i,
        extension=name,
        handle=handle,
        offset=offset,
        length=length,
        handle2=c.string(),
        offset2=c.u64(),
    )


def _ext_home(name: str, i: int, c: _Cursor) -> Request:
    return Request(FXP_EXTENDED, i, extension=name, username=c.string())


def _ext_ids(name: str, i: int, c: _Cursor) -> Request:
    uids, gids = _u32_list(c.string()), _u32_list(c.string())
    return Request(FXP_EXTENDED, i, extension=name, uids=uids, gids=gids)


_EXT_DECODERS: dict[str, Callable[[str, int, _Cursor], Request]] = {
    EXT_POSIX_RENAME: _ext_two_paths,
    EXT_HARDLINK: _ext_two_paths,
    EXT_FSYNC: _ext_handle,
    EXT_STATVFS: _ext_path,
    EXT_FSTATVFS: _ext_handle,
    EXT_LSETSTAT: _ext_lsetstat,
    EXT_LIMITS: _ext_none,
    EXT_EXPAND_PATH: _ext_path,
    EXT_COPY_DATA: _ext_copy_data,
    EXT_HOME_DIRECTORY: _ext_home,
    EXT_USERS_GROUPS_BY_ID: _ext_ids,
}


def _dec_extended(t: int, i: int, c: _Cursor) -> Request:
    # surrogateescape: any name round-trips, and known names are plain ASCII.
    name = c.string().decode("utf-8", "surrogateescape")
    decoder = _EXT_DECODERS.get(name)
    if decoder is None:
        return Request(FXP_EXTENDED, i, extension=name, data_len=c.end - c.pos)
    return decoder(name, i, c)


_REQUEST_DECODERS: dict[int, Callable[[int, int, _Cursor], Request]] = {
    FXP_OPEN: _dec_open,
    FXP_CLOSE: _handle_req,
    FXP_READ: _dec_read,
    FXP_WRITE: _dec_write,
    FXP_LSTAT: _path_req,
    FXP_FSTAT: _handle_req,
    FXP_SETSTAT: _path_attrs_req,
    FXP_FSETSTAT: _dec_fsetstat,
    FXP_OPENDIR: _path_req,
    FXP_READDIR: _handle_req,
    FXP_REMOVE: _path_req,
    FXP_MKDIR: _path_attrs_req,
    FXP_RMDIR: _path_req,
    FXP_REALPATH: _path_req,
    FXP_STAT: _path_req,
    FXP_RENAME: _two_path_req,
    FXP_READLINK: _path_req,
    FXP_SYMLINK: _two_path_req,
    FXP_EXTENDED: _dec_extended,
}


def _dec_status(t: int, i: int, c: _Cursor) -> Reply:
    code = c.u32()
    # Pre-v3 servers send no message; OpenSSH always sends message and language tag.
    message = c.string() if c.more() else None
    lang = c.string() if c.more() else None
    return Reply(t, i, code=code, message=message, lang=lang)


def _dec_handle(t: int, i: int, c: _Cursor) -> Reply:
    return Reply(t, i, handle=c.string())


def _dec_data(t: int, i: int, c: _Cursor) -> Reply:
    n = c.u32()
    c._take(n, "DATA data")
    return Reply(t, i, data_len=n)


def _dec_name(t: int, i: int, c: _Cursor) -> Reply:
    count = c.u32()
    # An entry is at least 12 bytes: refuse a count the packet cannot hold.
    if count > (c.end - c.pos) // 12:
        raise DecodeError("NAME count runs past the end of the packet")
    names = tuple(NameEntry(c.string(), c.string(), c.attrs()) for _ in range(count))
    return Reply(t, i, names=names)


def _dec_attrs(t: int, i: int, c: _Cursor) -> Reply:
    return Reply(t, i, attrs=c.attrs())


def _dec_extended_reply(t: int, i: int, c: _Cursor) -> Reply:
    return Reply(t, i, ext_data=bytes(c.buf[c.pos : c.end]))


_REPLY_DECODERS: dict[int, Callable[[int, int, _Cursor], Reply]] = {
    FXP_STATUS: _dec_status,
    FXP_HANDLE: _dec_handle,
    FXP_DATA: _dec_data,
    FXP_NAME: _dec_name,
    FXP_ATTRS: _dec_attrs,
    FXP_EXTENDED_REPLY: _dec_extended_reply,
}


def decode_request(body: bytes | bytearray | memoryview) -> Request:
    """Decode one client packet body (type byte onwards, no length prefix).

    Unknown types decode to a bare ``Request(type, id)``: sftp-server skips them
    too. Raises :class:`DecodeError` if the body is too short for its fields.
    """
    c = _Cursor(body)
    t = c.u8()
    if t == FXP_INIT:
        return Request(t, 0, version=c.u32(), extensions=c.pairs())
    i = c.u32()
    decoder = _REQUEST_DECODERS.get(t)
    return Request(t, i) if decoder is None else decoder(t, i, c)


def decode_reply(body: bytes | bytearray | memoryview) -> Reply:
    """Decode one server packet body (type byte onwards, no length prefix).

    Unknown types decode to a bare ``Reply(type, id)``. Raises :class:`DecodeError`
    if the body is too short for its fields.
    """
    c = _Cursor(body)
    t = c.u8()
    if t == FXP_VERSION:
        return Reply(t, 0, version=c.u32(), extensions=c.pairs())
    i = c.u32()
    decoder = _REPLY_DECODERS.get(t)
    return Reply(t, i) if decoder is None else decoder(t, i, c)


# -- streaming --------------------------------------------------------------------------

# Reader states.
_LENGTH, _TYPE, _HEADER, _BODY, _SKIP = range(5)


class PacketReader:
    """Turns one direction of an SFTP byte stream into packets, chunk by chunk.

    ``direction="client"`` yields :class:`Request` objects, ``"server"``
    :class:`Reply` objects. Packets may be split at any byte. WRITE (client) and
    DATA (server) payloads are never buffered: once their header is read the
    payload is skipped as it streams past, so :attr:`buffered` stays at a few
    dozen bytes however large the transfer. Any other packet is buffered whole
    (at most :data:`MAX_PACKET` bytes).

    A length above :data:`MAX_PACKET` or a packet that does not decode yields
    one :class:`ProtocolError` and marks the reader :attr:`broken`; it then
    ignores everything fed to it. :meth:`feed` never raises.
    """

    def __init__(self, direction: Direction) -> None:
        if direction not in ("client", "server"):
            raise ValueError(f"direction must be 'client' or 'server', not {direction!r}")
        self.direction: Direction = direction
        self._streamed = FXP_WRITE if direction == "client" else FXP_DATA
        self._decode: Callable[[bytes | bytearray | memoryview], Packet] = (
            decode_request if direction == "client" else decode_reply
        )
        self._buf = bytearray()
        self._state = _LENGTH
        self._need = 4  # bytes of the current packet (from its length field) to collect
        self._length = 0
        self._skip = 0
        self._held: Packet | None = None
        self._start = 0  # stream offset of the current packet
        self._offset = 0  # stream bytes consumed so far
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes held in the reader's buffer right now."""
        return len(self._buf)

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far."""
        return self._offset

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Packet | ProtocolError]:
        """Consume ``chunk``; return the packets it completed, in stream order."""
        out: list[Packet | ProtocolError] = []
        if self.broken or not chunk:
            return out
        try:
            self._consume(memoryview(chunk).cast("B"), out)
        except DecodeError as exc:
            self._fail(str(exc), out)
        except Exception as exc:  # the tap must never break a transfer
            self._fail(f"parser error: {type(exc).__name__}: {exc}", out)
        return out

    def _fail(self, reason: str, out: list[Packet | ProtocolError]) -> None:
        out.append(ProtocolError(reason, self._start))
        self.broken = True
        self._buf = bytearray()
        self._held = None

    def _consume(self, data: memoryview, out: list[Packet | ProtocolError]) -> None:
        i, n = 0, len(data)
        while True:
            if self._state == _LENGTH and not self._buf:
                # Most chunks hold whole packets: decode them where they lie.
                end = self._whole(data, i, n, out)
                if end:
                    i = end
                    continue
            if self._state == _SKIP:
                take = min(self._skip, n - i)
                i += take
                self._offset += take
                self._skip -= take
                if self._skip:
                    return
                self._emit(out)
                continue
            missing = self._need - len(self._buf)
            if missing > 0:
                if i == n:
                    return
                take = min(missing, n - i)
                self._buf += data[i : i + take]
                i += take
                self._offset += take
                if take < missing:
                    return
            self._advance(out)

    def _whole(self, data: memoryview, i: int, n: int, out: list[Packet | ProtocolError]) -> int:
        """Decode the packet at ``data[i:]`` if it is all there; return where it ends (0: not
        done, the state machine below takes it, and says why if it does not decode).

        The same result as the state machine, without its copies and steps: a
        packet the machine would refuse is left to it, so errors read the same.
        """
        if n - i < 9:
            return 0
        length: int = _U32.unpack_from(data, i)[0]
        end = i + 4 + length
        if end > n or length > MAX_PACKET or length < 5:
            return 0
        if data[i + 4] == self._streamed:
            streamed = self._streamed_header(data, i, length)
            if streamed is None:
                return 0
            self._offset += end - i
            out.append(streamed)
        else:
            self._offset += end - i  # before decoding, as the machine: an error keeps _start
            out.append(self._decode(data[i + 4 : end]))
        self._start = self._offset
        return end

    def _streamed_header(self, data: memoryview, i: int, length: int) -> Packet | None:
        """WRITE or DATA at ``data[i:]``, decoded like :meth:`_header`; None if it fails."""
        # offsets from the packet's start: 4 type, 5 id, 9 handle or data length
        if length < 9:
            return None
        ident, size = _U32.unpack_from(data, i + 5)[0], _U32.unpack_from(data, i + 9)[0]
        if self._streamed == FXP_WRITE:
            header_end = 25 + size
            if header_end > 4 + length:
                return None
            data_len = _U32.unpack_from(data, i + 21 + size)[0]
            if data_len > 4 + length - header_end:
                return None
            return Request(
                FXP_WRITE,
                ident,
                handle=bytes(data[i + 13 : i + 13 + size]),
                offset=_U64.unpack_from(data, i + 13 + size)[0],
                data_len=data_len,
            )
        if size > length - 9:
            return None
        return Reply(FXP_DATA, ident, data_len=size)

    def _advance(self, out: list[Packet | ProtocolError]) -> None:
        """The buffer holds ``_need`` bytes: act on them."""
        buf = self._buf
        if self._state == _LENGTH:
            length = _U32.unpack_from(buf, 0)[0]
            if length > MAX_PACKET:
                raise DecodeError(f"packet length {length} exceeds {MAX_PACKET}")
            if length < 5:
                raise DecodeError(f"packet length {length} is too short for any SFTP packet")
            self._length = length
            self._state, self._need = _TYPE, 5
        elif self._state == _TYPE:
            if buf[4] == self._streamed:
                # type, id and the handle length (WRITE) or data length (DATA)
                self._state, self._need = _HEADER, 13
                self._check_header_fits()
            else:
                self._state, self._need = _BODY, 4 + self._length
        elif self._state == _HEADER:
            self._header(out)
        else:
            packet = self._decode(memoryview(buf)[4:])
            self._held = packet
            self._emit(out)

    def _check_header_fits(self) -> None:
        if self._need > 4 + self._length:
            raise DecodeError("packet too short for its header")

    def _header(self, out: list[Packet | ProtocolError]) -> None:
        buf = self._buf
        size = _U32.unpack_from(buf, 9)[0]
        if self._streamed == FXP_WRITE and self._need == 13:
            # now the handle, the offset and the data length
            self._need = 13 + size + 12
            self._check_header_fits()
            return
        header_end = len(buf)
        c = _Cursor(memoryview(buf), 5)
        ident = c.u32()
        if self._streamed == FXP_WRITE:
            handle, offset, data_len = c.string(), c.u64(), c.u32()
            self._held = Request(FXP_WRITE, ident, handle=handle, offset=offset, data_len=data_len)
        else:
            data_len = c.u32()
            self._held = Reply(FXP_DATA, ident, data_len=data_len)
        remaining = 4 + self._length - header_end
        if data_len > remaining:
            raise DecodeError(f"data length {data_len} runs past the end of the packet")
        self._buf = bytearray()
        self._state, self._skip = _SKIP, remaining
        if not remaining:
            self._emit(out)

    def _emit(self, out: list[Packet | ProtocolError]) -> None:
        assert self._held is not None
        out.append(self._held)
        self._held = None
        self._buf = bytearray()
        self._start = self._offset
        self._state, self._need, self._skip = _LENGTH, 4, 0
