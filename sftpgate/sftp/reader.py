"""A streaming reader: one direction of an SFTP byte stream, chunk by chunk, into packets. Pure.

The subsystem tap relays bytes between sshd and OpenSSH's ``sftp-server``
unchanged and feeds a COPY of each direction to a :class:`PacketReader`. The
reader turns bytes into :class:`~.packets.Request` (client → server) or
:class:`~.packets.Reply` (server → client) objects. It never raises, never
keeps a WRITE or DATA payload (only its length) and gives up on a stream it
cannot frame, saying so once with a :class:`~.packets.ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable

from .constants import FXP_DATA, FXP_WRITE, MAX_PACKET, Direction
from .decode import U32, U64, Cursor, decode_reply, decode_request
from .packets import DecodeError, Packet, ProtocolError, Reply, Request

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
        length: int = U32.unpack_from(data, i)[0]
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
        ident, size = U32.unpack_from(data, i + 5)[0], U32.unpack_from(data, i + 9)[0]
        if self._streamed == FXP_WRITE:
            header_end = 25 + size
            if header_end > 4 + length:
                return None
            data_len = U32.unpack_from(data, i + 21 + size)[0]
            if data_len > 4 + length - header_end:
                return None
            return Request(
                FXP_WRITE,
                ident,
                handle=bytes(data[i + 13 : i + 13 + size]),
                offset=U64.unpack_from(data, i + 13 + size)[0],
                data_len=data_len,
            )
        if size > length - 9:
            return None
        return Reply(FXP_DATA, ident, data_len=size)

    def _advance(self, out: list[Packet | ProtocolError]) -> None:
        """The buffer holds ``_need`` bytes: act on them."""
        buf = self._buf
        if self._state == _LENGTH:
            length = U32.unpack_from(buf, 0)[0]
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
        size = U32.unpack_from(buf, 9)[0]
        if self._streamed == FXP_WRITE and self._need == 13:
            # now the handle, the offset and the data length
            self._need = 13 + size + 12
            self._check_header_fits()
            return
        header_end = len(buf)
        c = Cursor(memoryview(buf), 5)
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
