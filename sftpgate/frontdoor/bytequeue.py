"""A FIFO of received bytes that never moves what it holds.

The front door buffers a stream twice: the SSH connection's received bytes
until a whole packet is there, and an SFTP channel's data until a whole
request is. Both were bytearrays filled at the back and consumed from the
front. A bytearray with a consumed front copies everything it holds into a
new allocation whenever it grows past its allocation or shrinks below half of
it, so during a big upload (an SFTP buffer holding a few MiB while a WRITE
waits for the disk) the event loop kept copying megabytes into freshly
allocated memory: the heap grew and was trimmed back over and over, tens of
thousands of page faults per GiB, each byte copied once more just to be
appended. Here appending keeps the chunk as it came, and taking copies only
the bytes taken (none when a take is exactly one chunk as received).
"""

from __future__ import annotations

import struct
from collections import deque

_U32 = struct.Struct(">I")


class ByteQueue:
    """Bytes appended as they arrive, taken from the front by count."""

    __slots__ = ("_chunks", "_head", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._head = 0  # bytes of the first chunk already taken
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._size += len(data)

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0
        self._size = 0

    def peek_u32(self) -> int:
        """The big-endian uint32 at the front, left in place (needs 4 bytes)."""
        if self._size < 4:
            raise ValueError("fewer than 4 bytes queued")
        first = self._chunks[0]
        if len(first) - self._head >= 4:
            return int(_U32.unpack_from(first, self._head)[0])
        front = bytearray()  # the 4 bytes span chunks (rare: a split length field)
        head = self._head
        for chunk in self._chunks:
            front += chunk[head : head + 4 - len(front)]
            head = 0
            if len(front) == 4:
                break
        return int(_U32.unpack(front)[0])

    def take_frame(self, limit: int) -> bytes | None:
        """The body of the frame at the front (a uint32 length, then that many
        bytes), removed; None until all of it is here. ValueError (nothing
        removed) if the length is over ``limit``.
        """
        if self._size < 4:
            return None
        first = self._chunks[0]
        head = self._head
        left = len(first) - head
        size = int(_U32.unpack_from(first, head)[0]) if left >= 4 else self.peek_u32()
        if size > limit:
            raise ValueError(f"a frame of {size} bytes, over the limit of {limit}")
        if self._size < 4 + size:
            return None
        if left < 4 + size:  # spread over chunks
            self.skip(4)
            return self.take(size)
        end = head + 4 + size  # all in the first chunk: the usual case, one copy
        if end == len(first):
            self._chunks.popleft()
            self._head = 0
        else:
            self._head = end
        self._size -= 4 + size
        return first[head + 4 : end]

    def take(self, n: int) -> bytes:
        """Remove the first ``n`` bytes and return them (``0 <= n <= len(self)``)."""
        if n < 0 or n > self._size:
            raise ValueError(f"cannot take {n} of {self._size} bytes")
        if n == 0:
            return b""
        first = self._chunks[0]
        head = self._head
        left = len(first) - head
        if n < left:
            self._head = head + n
            self._size -= n
            return first[head : head + n]
        if n == left:
            self._chunks.popleft()
            self._head = 0
            self._size -= n
            return first if head == 0 else first[head:]
        return self._join(n)

    def skip(self, n: int) -> None:
        """Drop the first ``n`` bytes."""
        if n < 0 or n > self._size:
            raise ValueError(f"cannot skip {n} of {self._size} bytes")
        while n:
            first = self._chunks[0]
            left = len(first) - self._head
            if n < left:
                self._head += n
                self._size -= n
                return
            self._chunks.popleft()
            self._head = 0
            self._size -= left
            n -= left

    def _join(self, n: int) -> bytes:
        parts = self._front(n)
        self._size -= n
        return b"".join(parts)

    def _front(self, n: int) -> list[memoryview]:
        """Views of the first ``n`` bytes, removed from the queue (the caller fixes _size)."""
        parts: list[memoryview] = []
        chunks = self._chunks
        while n:
            first = chunks[0]
            view = memoryview(first)[self._head :]
            if n < len(view):
                parts.append(view[:n])
                self._head += n
                return parts
            parts.append(view)
            chunks.popleft()
            self._head = 0
            n -= len(view)
        return parts
