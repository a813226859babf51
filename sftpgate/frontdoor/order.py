"""Which requests of one session may run at the same time (pure).

SFTP lets a client send many requests before the first reply, and the
server answer them in any order, but requests about the same file must be
served in the order they came (draft-ietf-secsh-filexfer-02, "Requests
From the Client to the Server").
Most requests here finish inside the data callback and never overlap
anything; this decides what happens when one has to wait (a read in the
thread pool, a WRITE waiting for write-behind room, a stat on NFS):

- **READ** of a handle runs beside other READs and looks, and beside WRITEs
  and handle looks of *other* handles.
- **WRITE** of a handle runs beside requests about other handles (their
  reads and writes); never beside a path look (that path may be this file)
  or another request about the same handle. Two WRITEs of one handle keep
  their order, so a write-behind queue receives them as sent.
- **look** by path (STAT, LSTAT, REALPATH, READLINK) runs beside READs and
  other looks, never beside a WRITE.
- **handle look** (FSTAT, READDIR) runs beside requests about other handles
  and READs of its own; never beside a WRITE of its handle, or another
  handle look of it (a listing is read in order).
- **everything else** (OPEN, CLOSE, changes by path, extensions) runs alone:
  it starts when nothing is in flight, and nothing starts beside it.

The caller takes requests in order and stops at the first that may not
start yet (it waits for a finish), so requests about the same thing keep
their order and nothing is overtaken twice. At most ``most`` requests are
in flight, and READs in flight ask for at most ``most_bytes`` together.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..sftp.constants import (
    FXP_FSTAT,
    FXP_LSTAT,
    FXP_READ,
    FXP_READDIR,
    FXP_READLINK,
    FXP_REALPATH,
    FXP_STAT,
    FXP_WRITE,
    MAX_IO,
)

_U32 = struct.Struct(">I")
_U64_U32 = struct.Struct(">QI")


class Kind(enum.Enum):
    READ = "read"
    WRITE = "write"
    LOOK = "look"
    HANDLE_LOOK = "handle look"
    ALONE = "alone"


@dataclass(frozen=True, slots=True)
class Footprint:
    """What one request touches: its kind, its handle (if any), what a READ asks for."""

    kind: Kind
    handle: bytes = b""
    cost: int = 0


ALONE = Footprint(Kind.ALONE)
_LOOK = Footprint(Kind.LOOK)
_BY_HANDLE = {FXP_READ: Kind.READ, FXP_WRITE: Kind.WRITE}
_HANDLE_LOOKS = frozenset((FXP_FSTAT, FXP_READDIR))
_LOOKS = frozenset((FXP_STAT, FXP_LSTAT, FXP_REALPATH, FXP_READLINK))


def footprint(payload: bytes) -> Footprint:
    """The footprint of a request (type, id, fields); a malformed one runs alone."""
    if len(payload) < 9:
        return ALONE
    pkttype = payload[0]
    if pkttype in _LOOKS:
        return _LOOK
    by_handle = _BY_HANDLE.get(pkttype)
    if by_handle is None and pkttype not in _HANDLE_LOOKS:
        return ALONE
    (length,) = _U32.unpack_from(payload, 5)
    end = 9 + length
    if end > len(payload):
        return ALONE  # answered with an error, alone
    handle = payload[9:end]
    if by_handle is None:
        return Footprint(Kind.HANDLE_LOOK, handle)
    if by_handle is Kind.WRITE:
        return Footprint(Kind.WRITE, handle)
    if len(payload) < end + _U64_U32.size:
        return ALONE
    _, size = _U64_U32.unpack_from(payload, end)
    return Footprint(Kind.READ, handle, min(size, MAX_IO))


def _conflict(a: Footprint, b: Footprint) -> bool:
    """Whether ``a`` and ``b`` must not run at the same time (symmetric)."""
    if a.kind is Kind.ALONE or b.kind is Kind.ALONE:
        return True
    kinds = {a.kind, b.kind}
    if Kind.WRITE in kinds and Kind.LOOK in kinds:
        return True
    if Kind.LOOK in kinds:
        return False  # a look beside a READ, a look or a handle look
    if a.handle != b.handle:
        return False
    # The same handle: a WRITE with anything; two listings (or FSTATs) in order.
    return Kind.WRITE in kinds or kinds == {Kind.HANDLE_LOOK}


class InFlight:
    """The requests of one session that are running (waiting on something)."""

    __slots__ = ("_bytes", "_running", "most", "most_bytes")

    def __init__(self, most: int, most_bytes: int) -> None:
        if most < 1:
            raise ValueError("most must be at least 1")
        self.most = most
        self.most_bytes = most_bytes
        self._running: list[Footprint] = []
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._running)

    def may_start(self, fp: Footprint) -> bool:
        running = self._running
        if not running:
            return True
        if len(running) >= self.most:
            return False
        if fp.kind is Kind.READ and self._bytes + fp.cost > self.most_bytes:
            return False
        return not any(_conflict(fp, other) for other in running)

    def started(self, fp: Footprint) -> None:
        self._running.append(fp)
        self._bytes += fp.cost

    def finished(self, fp: Footprint) -> None:
        self._running.remove(fp)
        self._bytes -= fp.cost
