"""SFTP version 3 spoken by hand, for tests that send what clients won't."""

from __future__ import annotations

import struct

import paramiko


class RawSFTP:
    """SFTP version 3 spoken by hand over a paramiko channel, to send what clients won't."""

    def __init__(self, t: paramiko.Transport) -> None:
        self.chan = t.open_session()
        self.chan.invoke_subsystem("sftp")
        self.next_id = 0
        self._send(struct.pack(">BI", 1, 3))  # INIT, version 3
        kind, body = self.recv()
        assert kind == 2 and struct.unpack_from(">I", body)[0] == 3  # VERSION 3

    def _send(self, payload: bytes) -> None:
        self.chan.sendall(frame(payload))

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.chan.recv(n - len(data))
            assert chunk, "the gateway closed the channel"
            data += chunk
        return data

    def recv(self) -> tuple[int, bytes]:
        (size,) = struct.unpack(">I", self._exactly(4))
        payload = self._exactly(size)
        return payload[0], payload[1:]

    def request(self, kind: int, *fields: bytes) -> tuple[int, bytes]:
        """Send one request; return the reply's type and body after the request id."""
        self.next_id += 1
        self._send(struct.pack(">BI", kind, self.next_id) + b"".join(fields))
        reply, body = self.recv()
        assert struct.unpack_from(">I", body)[0] == self.next_id
        return reply, body[4:]

    def framed(self, kind: int, *fields: bytes) -> tuple[int, bytes]:
        """A request with the next id, framed but not sent: (id, bytes)."""
        self.next_id += 1
        return self.next_id, frame(struct.pack(">BI", kind, self.next_id) + b"".join(fields))

    def reply(self) -> tuple[int, int, bytes]:
        """The next reply: (type, request id, body after the id)."""
        kind, body = self.recv()
        return kind, struct.unpack_from(">I", body)[0], body[4:]

    def status(self, kind: int, *fields: bytes) -> tuple[int, str]:
        reply, body = self.request(kind, *fields)
        assert reply == 101, f"expected a STATUS reply, got type {reply}"
        (code,) = struct.unpack_from(">I", body)
        (size,) = struct.unpack_from(">I", body, 4)
        return code, body[8 : 8 + size].decode()


def s(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, MKDIR, STAT = 3, 4, 5, 6, 7, 8, 14, 17
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_FAILURE, FX_BAD_MESSAGE, FX_OP_UNSUPPORTED = 0, 1, 2, 4, 5, 8
WRITE_CREATE_TRUNC = 0x02 | 0x08 | 0x10


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload
