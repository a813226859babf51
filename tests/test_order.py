"""Which requests of one session may run together (frontdoor/order.py), as a table."""

from __future__ import annotations

import struct

import pytest

from sftpgate.frontdoor.order import ALONE, Footprint, InFlight, Kind, footprint
from sftpgate.sftp.constants import MAX_IO


def _req(kind: int, *fields: bytes) -> bytes:
    return bytes((kind,)) + struct.pack(">I", 7) + b"".join(fields)


def _s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def read(h: bytes, size: int = 1000) -> bytes:
    return _req(5, _s(h), struct.pack(">QI", 0, size))


def write(h: bytes) -> bytes:
    return _req(6, _s(h), struct.pack(">Q", 0), _s(b"data"))


def stat(path: bytes = b"/x") -> bytes:
    return _req(17, _s(path))


def fstat(h: bytes) -> bytes:
    return _req(8, _s(h))


def readdir(h: bytes) -> bytes:
    return _req(12, _s(h))


def close(h: bytes) -> bytes:
    return _req(4, _s(h))


def test_footprints() -> None:
    assert footprint(read(b"A", 10)) == Footprint(Kind.READ, b"A", 10)
    assert footprint(read(b"A", 2**32 - 1)).cost == MAX_IO  # what it is answered, at most
    assert footprint(write(b"A")) == Footprint(Kind.WRITE, b"A")
    assert footprint(stat()).kind is Kind.LOOK
    assert footprint(_req(7, _s(b"/x"))).kind is Kind.LOOK  # LSTAT
    assert footprint(fstat(b"A")) == Footprint(Kind.HANDLE_LOOK, b"A")
    assert footprint(readdir(b"D")) == Footprint(Kind.HANDLE_LOOK, b"D")
    assert footprint(close(b"A")) is ALONE
    assert footprint(_req(3, _s(b"/x"), b"\0" * 8)) is ALONE  # OPEN
    # Malformed: too short, a handle longer than the packet, a READ without its fields.
    assert footprint(b"\x05\0\0") is ALONE
    assert footprint(_req(5, struct.pack(">I", 999), b"A")) is ALONE
    assert footprint(_req(5, _s(b"A"))) is ALONE


# (running, next, may start beside it)
TABLE = [
    (read(b"A"), read(b"A"), True),
    (read(b"A"), read(b"B"), True),
    (read(b"A"), stat(), True),
    (read(b"A"), write(b"B"), True),
    (read(b"A"), write(b"A"), False),
    (read(b"A"), fstat(b"A"), True),
    (read(b"A"), close(b"B"), False),
    (write(b"A"), write(b"B"), True),
    (write(b"A"), write(b"A"), False),
    (write(b"A"), read(b"A"), False),
    (write(b"A"), stat(), False),
    (write(b"A"), fstat(b"A"), False),
    (write(b"A"), fstat(b"B"), True),
    (stat(), stat(b"/y"), True),
    (stat(), write(b"A"), False),
    (stat(), readdir(b"D"), True),
    (readdir(b"D"), readdir(b"D"), False),
    (readdir(b"D"), readdir(b"E"), True),
    (close(b"A"), read(b"B"), False),
    (close(b"A"), stat(), False),
]


@pytest.mark.parametrize(("running", "nxt", "together"), TABLE)
def test_what_runs_together(running: bytes, nxt: bytes, together: bool) -> None:
    flight = InFlight(most=8, most_bytes=8 * MAX_IO)
    assert flight.may_start(footprint(running))  # anything starts when nothing runs
    flight.started(footprint(running))
    assert flight.may_start(footprint(nxt)) is together
    # The rule is symmetric: the other way round too.
    other = InFlight(most=8, most_bytes=8 * MAX_IO)
    other.started(footprint(nxt))
    assert other.may_start(footprint(running)) is together


def test_caps_on_count_and_read_bytes() -> None:
    flight = InFlight(most=2, most_bytes=300)
    flight.started(footprint(read(b"A", 200)))
    assert not flight.may_start(footprint(read(b"A", 200)))  # 400 bytes asked > 300
    assert flight.may_start(footprint(read(b"A", 100)))
    assert flight.may_start(footprint(stat()))  # a look costs no bytes
    flight.started(footprint(stat()))
    assert not flight.may_start(footprint(stat(b"/y")))  # two in flight already
    flight.finished(footprint(stat()))
    flight.finished(footprint(read(b"A", 200)))
    assert len(flight) == 0
    assert flight.may_start(footprint(close(b"A")))
    with pytest.raises(ValueError, match="at least 1"):
        InFlight(most=0, most_bytes=0)
