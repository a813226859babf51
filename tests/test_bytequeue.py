"""ByteQueue: the front door's receive buffers (SSH packets, SFTP requests)."""

from __future__ import annotations

import random
import struct

import pytest

from sftpgate.frontdoor.bytequeue import ByteQueue


def _frames(rng: random.Random, count: int) -> list[bytes]:
    sizes = [0, 1, 3, 4, 5, 255, 4096, 32 * 1024, 255 * 1024]
    return [rng.randbytes(rng.choice(sizes)) for _ in range(count)]


def _split(rng: random.Random, stream: bytes) -> list[bytes]:
    """The stream cut at random points, as reads and channel packets arrive."""
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, 300)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


@pytest.mark.parametrize("seed", range(8))
def test_frames_come_out_whole_and_in_order_however_the_stream_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    frames = _frames(rng, 60)
    stream = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    queue = ByteQueue()
    out: list[bytes] = []
    for piece in _split(rng, stream):
        queue.append(piece)
        while (frame := queue.take_frame(1 << 20)) is not None:
            out.append(frame)
    assert out == frames
    assert len(queue) == 0 and not queue


@pytest.mark.parametrize("seed", range(8))
def test_takes_and_skips_match_slicing_the_stream(seed: int) -> None:
    rng = random.Random(100 + seed)
    stream = rng.randbytes(200_000)
    queue = ByteQueue()
    for piece in _split(rng, stream):
        queue.append(piece)
    pos = 0
    while pos < len(stream):
        n = rng.choice([0, 1, 2, 7, 100, 5000, 40_000])
        n = min(n, len(stream) - pos)
        if rng.random() < 0.2:
            queue.skip(n)
        else:
            assert queue.take(n) == stream[pos : pos + n]
        pos += n
        assert len(queue) == len(stream) - pos
        if len(stream) - pos >= 4:
            assert queue.peek_u32() == struct.unpack_from(">I", stream, pos)[0]


def test_a_take_of_exactly_one_chunk_as_received_is_not_copied() -> None:
    queue = ByteQueue()
    first, second = b"a" * 40_000, b"b" * 40_000
    queue.append(first)
    queue.append(second)
    assert queue.take(40_000) is first
    framed = struct.pack(">I", 6) + b"abcdef"
    queue.append(framed)
    assert queue.take(40_000) is second
    assert queue.take_frame(100) == b"abcdef"
    assert len(queue) == 0


def test_a_length_field_split_over_chunks_is_read_whole() -> None:
    queue = ByteQueue()
    header = struct.pack(">I", 3)
    queue.append(header[:1])
    assert queue.take_frame(10) is None
    queue.append(header[1:3])
    assert queue.take_frame(10) is None
    queue.append(header[3:] + b"xy")
    assert queue.peek_u32() == 3
    assert queue.take_frame(10) is None  # 2 of its 3 bytes
    queue.append(b"z")
    assert queue.take_frame(10) == b"xyz"


def test_a_frame_over_the_limit_is_refused_and_left_in_place() -> None:
    queue = ByteQueue()
    queue.append(struct.pack(">I", 11) + b"x" * 11)
    with pytest.raises(ValueError, match="11 bytes, over the limit of 10"):
        queue.take_frame(10)
    assert len(queue) == 15
    assert queue.take_frame(11) == b"x" * 11


def test_taking_or_skipping_more_than_is_queued_is_an_error() -> None:
    queue = ByteQueue()
    queue.append(b"abc")
    with pytest.raises(ValueError):
        queue.take(4)
    with pytest.raises(ValueError):
        queue.skip(4)
    with pytest.raises(ValueError):
        queue.peek_u32()
    assert queue.take(3) == b"abc"
    queue.append(b"")
    assert len(queue) == 0
    queue.append(b"def")
    queue.clear()
    assert len(queue) == 0 and queue.take(0) == b""
