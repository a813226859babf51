"""The SFTP codec (sftpgate.sftp), the streaming reader and the OpenSSH tap's tracker. Pure.

No sockets, no processes: streams are synthesised with the codec's own
encoders and fed to the readers in chunks, the way the relay will.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.sftp import constants as codec
from sftpgate.sftp.constants import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    MAX_PACKET,
)
from sftpgate.sftp.decode import decode_reply, decode_request
from sftpgate.sftp.encode import encode_reply, encode_request
from sftpgate.sftp.packets import Attrs, NameEntry, ProtocolError, Reply, Request
from sftpgate.sftp.reader import PacketReader
from sftpgate.subsystem.tracker import Tracker

FAST = settings(deadline=None, max_examples=200, database=None)
SOME = settings(deadline=None, max_examples=60, database=None)

HOME = "/home/alice"
TEMP = ("*.filepart", "*.part", "*.tmp")
SESSION = SessionInfo(id="s-1", remote_addr="192.0.2.7", remote_port=50022, login="alice")
UPLOAD_FLAGS = FXF_WRITE | FXF_CREAT | FXF_TRUNC

# -- strategies ------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
paths = st.one_of(
    st.binary(max_size=48),
    st.text(max_size=24).map(lambda s: s.encode()),
    st.sampled_from(
        [b"", b"-rf", b"--help", b"a\nb", b"line\r\nbreak", "vidéo ☃.mp4".encode(), b"/abs/x"]
    ),
)
handles = st.binary(max_size=16)
small_bytes = st.binary(max_size=24)
pairs = st.lists(st.tuples(small_bytes, small_bytes), max_size=3).map(tuple)
opt_u32 = st.none() | u32
attrs_st = st.builds(
    lambda size, ids, perm, times, ext: Attrs(
        size=size,
        uid=ids[0] if ids else None,
        gid=ids[1] if ids else None,
        permissions=perm,
        atime=times[0] if times else None,
        mtime=times[1] if times else None,
        extended=ext,
    ),
    st.none() | u64,
    st.none() | st.tuples(u32, u32),
    opt_u32,
    st.none() | st.tuples(u32, u32),
    pairs,
)
data_lens = st.integers(0, 4096)
_KNOWN_EXT = {
    codec.EXT_POSIX_RENAME,
    codec.EXT_HARDLINK,
    codec.EXT_FSYNC,
    codec.EXT_STATVFS,
    codec.EXT_FSTATVFS,
    codec.EXT_LSETSTAT,
    codec.EXT_LIMITS,
    codec.EXT_EXPAND_PATH,
    codec.EXT_COPY_DATA,
    codec.EXT_RANGES,
    codec.EXT_HOME_DIRECTORY,
    codec.EXT_USERS_GROUPS_BY_ID,
}
KNOWN_REQUESTS = {1, *range(3, 21), 200}
KNOWN_REPLIES = {2, 101, 102, 103, 104, 105, 201}


def _req(t: int, **fields: st.SearchStrategy[object]) -> st.SearchStrategy[Request]:
    return st.builds(Request, st.just(t), u32, **fields)


def _ext(name: str, **fields: st.SearchStrategy[object]) -> st.SearchStrategy[Request]:
    return _req(codec.FXP_EXTENDED, extension=st.just(name), **fields)


requests = st.one_of(
    st.builds(Request, st.just(codec.FXP_INIT), st.just(0), version=u32, extensions=pairs),
    _req(codec.FXP_OPEN, path=paths, pflags=u32, attrs=attrs_st),
    _req(codec.FXP_CLOSE, handle=handles),
    _req(codec.FXP_READ, handle=handles, offset=u64, length=u32),
    _req(codec.FXP_WRITE, handle=handles, offset=u64, data_len=data_lens),
    *(
        _req(t, path=paths)
        for t in (
            codec.FXP_LSTAT,
            codec.FXP_STAT,
            codec.FXP_OPENDIR,
            codec.FXP_REMOVE,
            codec.FXP_RMDIR,
            codec.FXP_REALPATH,
            codec.FXP_READLINK,
        )
    ),
    *(_req(t, handle=handles) for t in (codec.FXP_FSTAT, codec.FXP_READDIR)),
    _req(codec.FXP_SETSTAT, path=paths, attrs=attrs_st),
    _req(codec.FXP_MKDIR, path=paths, attrs=attrs_st),
    _req(codec.FXP_FSETSTAT, handle=handles, attrs=attrs_st),
    _req(codec.FXP_RENAME, path=paths, path2=paths),
    _req(codec.FXP_SYMLINK, path=paths, path2=paths),
    _ext(codec.EXT_POSIX_RENAME, path=paths, path2=paths),
    _ext(codec.EXT_HARDLINK, path=paths, path2=paths),
    _ext(codec.EXT_FSYNC, handle=handles),
    _ext(codec.EXT_FSTATVFS, handle=handles),
    _ext(codec.EXT_STATVFS, path=paths),
    _ext(codec.EXT_EXPAND_PATH, path=paths),
    _ext(codec.EXT_LSETSTAT, path=paths, attrs=attrs_st),
    _ext(codec.EXT_LIMITS),
    _ext(
        codec.EXT_COPY_DATA,
        handle=handles,
        offset=u64,
        length=u64,
        handle2=handles,
        offset2=u64,
    ),
    _ext(codec.EXT_RANGES, handle=handles, offset=u64, length=u64),
    _ext(codec.EXT_HOME_DIRECTORY, username=small_bytes),
    _ext(
        codec.EXT_USERS_GROUPS_BY_ID,
        uids=st.lists(u32, max_size=5).map(tuple),
        gids=st.lists(u32, max_size=5).map(tuple),
    ),
    _req(
        codec.FXP_EXTENDED,
        extension=st.text(min_size=1, max_size=30).filter(lambda s: s not in _KNOWN_EXT),
        data_len=st.integers(0, 64),
    ),
    # Types sftp-server does not know: framed, kept bare, skipped.
    st.builds(Request, st.sampled_from(sorted(set(range(256)) - KNOWN_REQUESTS)), u32),
)


def _rep(t: int, **fields: st.SearchStrategy[object]) -> st.SearchStrategy[Reply]:
    return st.builds(Reply, st.just(t), u32, **fields)


names_st = st.lists(st.builds(NameEntry, paths, small_bytes, attrs_st), max_size=4).map(tuple)
replies = st.one_of(
    st.builds(Reply, st.just(codec.FXP_VERSION), st.just(0), version=u32, extensions=pairs),
    _rep(codec.FXP_STATUS, code=u32, message=small_bytes, lang=small_bytes),
    _rep(codec.FXP_STATUS, code=u32, message=small_bytes),
    _rep(codec.FXP_STATUS, code=u32),  # very old servers send neither
    _rep(codec.FXP_HANDLE, handle=handles),
    _rep(codec.FXP_DATA, data_len=data_lens),
    _rep(codec.FXP_NAME, names=names_st),
    _rep(codec.FXP_ATTRS, attrs=attrs_st),
    _rep(codec.FXP_EXTENDED_REPLY, ext_data=st.binary(max_size=40)),
    st.builds(Reply, st.sampled_from(sorted(set(range(256)) - KNOWN_REPLIES)), u32),
)


def feed_split(reader: PacketReader, stream: bytes, cuts: Sequence[int]) -> list[object]:
    out: list[object] = []
    start = 0
    for cut in sorted(set(cuts)):
        out += reader.feed(stream[start:cut])
        start = cut
    out += reader.feed(stream[start:])
    return out


# -- codec: round trips ------------------------------------------------------------------


@FAST
@given(requests)
def test_every_request_round_trips_through_encode_and_decode(req: Request) -> None:
    packet = encode_request(req)
    assert struct.unpack(">I", packet[:4])[0] == len(packet) - 4
    assert decode_request(packet[4:]) == req
    assert PacketReader("client").feed(packet) == [req]


@FAST
@given(replies)
def test_every_reply_round_trips_through_encode_and_decode(reply: Reply) -> None:
    packet = encode_reply(reply)
    assert decode_reply(packet[4:]) == reply
    assert PacketReader("server").feed(packet) == [reply]


@pytest.mark.parametrize("name", sorted(_KNOWN_EXT))
def test_each_openssh_extension_decodes_to_its_arguments(name: str) -> None:
    req = Request(
        codec.FXP_EXTENDED,
        9,
        extension=name,
        path=b"old",
        path2=b"new",
        handle=b"\0\0\0\1",
        handle2=b"\0\0\0\2",
        offset=5,
        offset2=6,
        length=7,
        attrs=Attrs(permissions=0o600),
        username=b"bob",
        uids=(0, 1000),
        gids=(100,),
    )
    decoded = decode_request(encode_request(req)[4:])
    assert decoded.extension == name
    expected = {
        codec.EXT_POSIX_RENAME: {"path": b"old", "path2": b"new"},
        codec.EXT_HARDLINK: {"path": b"old", "path2": b"new"},
        codec.EXT_FSYNC: {"handle": b"\0\0\0\1"},
        codec.EXT_FSTATVFS: {"handle": b"\0\0\0\1"},
        codec.EXT_STATVFS: {"path": b"old"},
        codec.EXT_EXPAND_PATH: {"path": b"old"},
        codec.EXT_LSETSTAT: {"path": b"old", "attrs": Attrs(permissions=0o600)},
        codec.EXT_LIMITS: {},
        codec.EXT_COPY_DATA: {
            "handle": b"\0\0\0\1",
            "offset": 5,
            "length": 7,
            "handle2": b"\0\0\0\2",
            "offset2": 6,
        },
        codec.EXT_RANGES: {"handle": b"\0\0\0\1", "offset": 5, "length": 7},
        codec.EXT_HOME_DIRECTORY: {"username": b"bob"},
        codec.EXT_USERS_GROUPS_BY_ID: {"uids": (0, 1000), "gids": (100,)},
    }[name]
    assert decoded == Request(codec.FXP_EXTENDED, 9, extension=name, **expected)  # type: ignore[arg-type]


def test_symlink_keeps_openssh_wire_order_target_then_link() -> None:
    # What OpenSSH's client puts on the wire for `ln -s target.mp4 link.mp4`.
    body = b"\x14" + struct.pack(">I", 3)
    body += struct.pack(">I", 10) + b"target.mp4" + struct.pack(">I", 8) + b"link.mp4"
    req = decode_request(body)
    assert (req.path, req.path2) == (b"target.mp4", b"link.mp4")


def test_unknown_extension_keeps_its_name_and_payload_length_only() -> None:
    body = b"\xc8" + struct.pack(">I", 4) + struct.pack(">I", 11) + b"foo@example" + b"xyz!"
    assert decode_request(body) == Request(
        codec.FXP_EXTENDED, 4, extension="foo@example", data_len=4
    )


def test_trailing_bytes_in_a_packet_are_ignored_like_sftp_server_does() -> None:
    packet = encode_request(Request(codec.FXP_REMOVE, 3, path=b"x"))
    padded = struct.pack(">I", len(packet) - 4 + 5) + packet[4:] + b"\0" * 5
    reader = PacketReader("client")
    assert reader.feed(padded + packet) == [Request(codec.FXP_REMOVE, 3, path=b"x")] * 2


def test_status_names_match_the_journal_vocabulary() -> None:
    assert [codec.status_name(c) for c in range(9)] == [
        "ok",
        "eof",
        "no_such_file",
        "permission_denied",
        "failure",
        "bad_message",
        "no_connection",
        "connection_lost",
        "op_unsupported",
    ]
    assert codec.status_name(11) == "file_already_exists"
    assert codec.status_name(9999) == "status_9999"


def test_encoders_refuse_packets_missing_a_field() -> None:
    with pytest.raises(ValueError, match="path"):
        encode_request(Request(codec.FXP_OPEN, 1, pflags=1))
    with pytest.raises(ValueError, match="uid and gid"):
        encode_request(Request(codec.FXP_SETSTAT, 1, path=b"x", attrs=Attrs(uid=1)))
    with pytest.raises(ValueError, match="does not match"):
        encode_reply(Reply(codec.FXP_DATA, 1, data_len=3), data=b"ab")


def test_encoders_send_explicit_data() -> None:
    packet = encode_request(Request(codec.FXP_WRITE, 1, handle=b"h", offset=0), data=b"payload")
    assert packet.endswith(struct.pack(">I", 7) + b"payload")
    assert decode_reply(encode_reply(Reply(codec.FXP_DATA, 2), data=b"abc")[4:]).data_len == 3


# -- codec: streaming ----------------------------------------------------------------------


@SOME
@given(st.lists(requests, min_size=1, max_size=30), st.data())
def test_request_stream_split_anywhere_decodes_like_unsplit(
    reqs: list[Request], data: st.DataObject
) -> None:
    stream = b"".join(encode_request(r) for r in reqs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    whole = PacketReader("client").feed(stream)
    reader = PacketReader("client")
    assert feed_split(reader, stream, cuts) == whole == reqs
    assert reader.buffered == 0
    assert reader.offset == len(stream)


@SOME
@given(st.lists(replies, min_size=1, max_size=30), st.data())
def test_reply_stream_split_anywhere_decodes_like_unsplit(
    reps: list[Reply], data: st.DataObject
) -> None:
    stream = b"".join(encode_reply(r) for r in reps)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    assert feed_split(PacketReader("server"), stream, cuts) == reps


@SOME
@given(st.lists(requests, min_size=1, max_size=10), st.data())
def test_truncated_stream_yields_whole_packets_and_waits(
    reqs: list[Request], data: st.DataObject
) -> None:
    packets = [encode_request(r) for r in reqs]
    stream = b"".join(packets)
    cut = data.draw(st.integers(0, len(stream) - 1))
    reader = PacketReader("client")
    got = reader.feed(stream[:cut])
    complete = 0
    while complete < len(packets) and sum(map(len, packets[: complete + 1])) <= cut:
        complete += 1
    assert got == reqs[:complete]
    assert not reader.broken
    assert reader.feed(stream[cut:]) == reqs[complete:]


@FAST
@given(
    st.lists(requests, min_size=1, max_size=6),
    st.lists(replies, min_size=1, max_size=6),
    # (packet, byte of its header, new value): the header is where framing can go wrong
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), st.integers(0, 255)), max_size=3),
    st.integers(0, 10_000),
)
def test_a_stream_fed_whole_or_byte_by_byte_gives_the_same_packets_and_errors(
    reqs: list[Request],
    reps: list[Reply],
    flips: list[tuple[int, int, int]],
    cut: int,
) -> None:
    # Whole packets in one chunk are decoded where they lie (no copy, no state
    # machine); split ones go through the machine. Valid or damaged (flipped
    # bytes, truncated), both ways must yield the same packets, errors and offsets.
    for direction, packets in (
        ("client", [encode_request(r) for r in reqs]),
        ("server", [encode_reply(r) for r in reps]),
    ):
        starts = [sum(map(len, packets[:i])) for i in range(len(packets))]
        damaged = bytearray(b"".join(packets))
        for packet, at, value in flips:
            damaged[(starts[packet % len(starts)] + at) % len(damaged)] = value
        damaged = damaged[: max(1, len(damaged) - cut % 8)]
        whole, bytewise = PacketReader(direction), PacketReader(direction)  # type: ignore[arg-type]
        got_whole = whole.feed(bytes(damaged))
        got_bytewise = feed_split(bytewise, bytes(damaged), range(len(damaged)))
        assert got_whole == got_bytewise
        assert (whole.offset, whole.broken) == (bytewise.offset, bytewise.broken)


@pytest.mark.parametrize(
    ("direction", "packet"),
    [
        (
            "client",
            encode_request(Request(codec.FXP_WRITE, 3, handle=b"hh", offset=7, data_len=40)),
        ),
        ("server", encode_reply(Reply(codec.FXP_DATA, 3, data_len=40))),
    ],
)
def test_damaged_write_and_data_headers_fail_the_same_whole_or_split(
    direction: codec.Direction, packet: bytes
) -> None:
    for at in range(30):
        for value in (0, 1, 2, 0x30, 0x7F, 0xFF):
            damaged = bytearray(packet + packet)
            damaged[at] = value
            whole, bytewise = PacketReader(direction), PacketReader(direction)
            got = whole.feed(bytes(damaged))
            assert got == feed_split(bytewise, bytes(damaged), range(len(damaged))), (at, value)
            assert (whole.offset, whole.broken) == (bytewise.offset, bytewise.broken)


def test_whole_write_and_data_packets_in_one_chunk_keep_headers_only() -> None:
    write = Request(codec.FXP_WRITE, 9, handle=b"h1", offset=4096, data_len=4096)
    stream = encode_request(write) * 3
    reader = PacketReader("client")
    assert reader.feed(stream) == [write] * 3
    assert reader.buffered == 0 and reader.offset == len(stream)
    data = Reply(codec.FXP_DATA, 4, data_len=32768)
    assert PacketReader("server").feed(encode_reply(data) * 2) == [data] * 2


@pytest.mark.parametrize("chunk", [1, 3, 1000, 4096, 65536])
def test_256k_write_streams_past_without_being_buffered(chunk: int) -> None:
    size = 256 * 1024
    req = Request(codec.FXP_WRITE, 77, handle=b"\0\0\0\7", offset=1 << 40, data_len=size)
    stream = (
        encode_request(Request(codec.FXP_OPEN, 76, path=b"big", pflags=2, attrs=Attrs()))
        + encode_request(req)
        + encode_request(Request(codec.FXP_CLOSE, 78, handle=b"\0\0\0\7"))
    )
    reader = PacketReader("client")
    got: list[object] = []
    most = 0
    for i in range(0, len(stream), chunk):
        got += reader.feed(stream[i : i + chunk])
        most = max(most, reader.buffered)
    assert [getattr(p, "type", None) for p in got] == [
        codec.FXP_OPEN,
        codec.FXP_WRITE,
        codec.FXP_CLOSE,
    ]
    assert got[1] == req
    assert most <= 64, f"reader held {most} bytes"


def test_256k_data_reply_streams_past_without_being_buffered() -> None:
    stream = encode_reply(Reply(codec.FXP_DATA, 5, data_len=256 * 1024))
    reader = PacketReader("server")
    got: list[object] = []
    most = 0
    for i in range(0, len(stream), 8192):
        got += reader.feed(stream[i : i + 8192])
        most = max(most, reader.buffered)
    assert got == [Reply(codec.FXP_DATA, 5, data_len=256 * 1024)]
    assert most <= 16


def test_oversized_length_breaks_the_stream_once() -> None:
    first = encode_request(Request(codec.FXP_REMOVE, 1, path=b"a"))
    huge = struct.pack(">I", MAX_PACKET + 1) + b"\x03"
    reader = PacketReader("client")
    got = reader.feed(first + huge)
    assert got[0] == Request(codec.FXP_REMOVE, 1, path=b"a")
    assert isinstance(got[1], ProtocolError)
    assert got[1].offset == len(first)
    assert "exceeds" in got[1].reason
    assert reader.broken
    assert reader.feed(first) == []
    assert reader.buffered == 0


@pytest.mark.parametrize(
    ("direction", "body", "reason"),
    [
        ("client", b"\x03" + struct.pack(">I", 1) + struct.pack(">I", 999) + b"x", "string"),
        ("client", b"\x06" + struct.pack(">II", 1, 4) + b"h", "too short"),
        (
            "client",
            b"\x06" + struct.pack(">II", 1, 1) + b"h" + struct.pack(">QI", 0, 50) + b"x" * 10,
            "data length",
        ),
        ("server", b"\x67" + struct.pack(">II", 1, 100) + b"short", "data length"),
        ("server", b"\x68" + struct.pack(">II", 1, 10**6), "NAME count"),
        ("server", b"\x69" + struct.pack(">II", 1, codec.ATTR_SIZE) + b"\0", "uint64"),
        ("client", b"\x01", "too short"),
    ],
)
def test_packet_that_does_not_decode_yields_protocol_error(
    direction: codec.Direction, body: bytes, reason: str
) -> None:
    reader = PacketReader(direction)
    got = reader.feed(struct.pack(">I", len(body)) + body + b"more bytes after")
    assert len(got) == 1
    assert isinstance(got[0], ProtocolError)
    assert reason in got[0].reason
    assert got[0].offset == 0
    assert reader.broken


@FAST
@given(st.binary(max_size=600), st.sampled_from(["client", "server"]), st.data())
def test_random_bytes_never_raise_from_reader_or_tracker(
    blob: bytes, direction: codec.Direction, data: st.DataObject
) -> None:
    reader = PacketReader(direction)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8))
    items = feed_split(reader, blob, cuts)
    assert sum(isinstance(i, ProtocolError) for i in items) <= 1
    tracker = Tracker(SESSION, HOME, TEMP, clock=lambda: 1.0)
    feed = tracker.client if direction == "client" else tracker.server
    events = feed(items) + tracker.finish()  # type: ignore[arg-type]
    assert all(isinstance(e, Event) for e in events)
    errors = [e for e in events if e.op is Op.PROTOCOL_ERROR]
    assert len(errors) == sum(isinstance(i, ProtocolError) for i in items)


@SOME
@given(
    st.lists(requests, max_size=25),
    st.lists(replies, max_size=25),
    st.binary(max_size=40),
    st.randoms(use_true_random=False),
)
def test_tracker_survives_any_mix_of_requests_replies_and_garbage(
    reqs: list[Request], reps: list[Reply], garbage: bytes, rnd: random.Random
) -> None:
    client, server = PacketReader("client"), PacketReader("server")
    tracker = Tracker(SESSION, HOME, TEMP, clock=lambda: 5.0)
    cstream = b"".join(encode_request(r) for r in reqs) + garbage
    sstream = b"".join(encode_reply(r) for r in reps)
    events: list[Event] = []
    ci = si = 0
    while ci < len(cstream) or si < len(sstream):
        n = rnd.randint(1, 200)
        if rnd.random() < 0.5:
            events += tracker.client(client.feed(cstream[ci : ci + n]))
            ci += n
        else:
            events += tracker.server(server.feed(sstream[si : si + n]))
            si += n
    events += tracker.finish()
    assert all(isinstance(e, Event) and e.session is SESSION for e in events)
    assert tracker.open_handles == 0
    assert tracker.finish() == []


# -- tracker scenarios -----------------------------------------------------------------


class Wire:
    """Both directions of one session, encoded, fed through readers in odd-sized chunks."""

    def __init__(self, home: str = HOME) -> None:
        self.now = 1000.0
        self.tracker = Tracker(SESSION, home, TEMP, clock=lambda: self.now)
        self.client = PacketReader("client")
        self.server = PacketReader("server")
        self.events: list[Event] = []
        self.next_id = 1
        self._send(self.client, self.tracker.client, encode_request(Request(1, version=3)))
        self._send(self.server, self.tracker.server, encode_reply(Reply(2, version=3)))

    def _send(self, reader: PacketReader, sink: object, stream: bytes) -> None:
        for i in range(0, len(stream), 1777):
            self.events += sink(reader.feed(stream[i : i + 1777]))  # type: ignore[operator]

    def request(self, req: Request, data: bytes | None = None) -> int:
        self._send(self.client, self.tracker.client, encode_request(req, data))
        return req.id

    def reply(self, reply: Reply, after: float = 0.25) -> list[Event]:
        self.now += after
        before = len(self.events)
        self._send(self.server, self.tracker.server, encode_reply(reply))
        return self.events[before:]

    def call(self, t: int, reply: Reply | int = codec.FX_OK, **fields: object) -> list[Event]:
        rid = self.next_id
        self.next_id += 1
        self.request(Request(t, rid, **fields))  # type: ignore[arg-type]
        if isinstance(reply, int):
            reply = Reply(codec.FXP_STATUS, rid, code=reply, message=b"msg", lang=b"")
        return self.reply(dataclasses.replace(reply, id=rid))

    def open(self, path: bytes, pflags: int, handle: bytes, mode: int | None = 0o644) -> None:
        self.call(
            codec.FXP_OPEN,
            Reply(codec.FXP_HANDLE, handle=handle),
            path=path,
            pflags=pflags,
            attrs=Attrs(permissions=mode),
        )

    def write(self, handle: bytes, sizes: Sequence[int], code: int = codec.FX_OK) -> None:
        for size in sizes:
            self.call(codec.FXP_WRITE, code, handle=handle, offset=0, data_len=size)

    def failed(self, code: int, message: bytes) -> Reply:
        return Reply(codec.FXP_STATUS, code=code, message=message, lang=b"")


def ops(events: Sequence[Event]) -> list[Op]:
    return [e.op for e in events]


def test_upload_closed_ok_is_one_complete_event_with_bytes() -> None:
    w = Wire()
    t0 = w.now
    w.open(b"clip.mp4", UPLOAD_FLAGS, b"\0\0\0\0")
    w.write(b"\0\0\0\0", [32768, 32768, 1000])
    close = w.call(codec.FXP_CLOSE, handle=b"\0\0\0\0")
    assert ops(w.events) == [Op.OPEN, Op.CLOSE]
    opened = w.events[0]
    assert (opened.path, opened.flags, opened.mode, opened.status) == (
        "/home/alice/clip.mp4",
        UPLOAD_FLAGS,
        0o644,
        "ok",
    )
    assert opened.duration == pytest.approx(0.25)
    [ev] = close
    assert ev.upload is UploadState.COMPLETE
    assert (ev.path, ev.bytes_written, ev.bytes_read, ev.flags) == (
        "/home/alice/clip.mp4",
        66536,
        0,
        UPLOAD_FLAGS,
    )
    assert ev.time == w.now
    assert ev.duration == pytest.approx(w.now - t0)
    assert ev.message is None


def test_download_bytes_are_counted_from_data_replies() -> None:
    w = Wire()
    w.open(b"/home/alice/movie.flv", FXF_READ, b"\0\0\0\1")
    for n in (32768, 100):
        w.call(
            codec.FXP_READ,
            Reply(codec.FXP_DATA, data_len=n),
            handle=b"\0\0\0\1",
            offset=0,
            length=32768,
        )
    assert w.call(codec.FXP_READ, codec.FX_EOF, handle=b"\0\0\0\1", offset=0, length=32768) == []
    [ev] = w.call(codec.FXP_CLOSE, handle=b"\0\0\0\1")
    assert (ev.op, ev.bytes_read, ev.bytes_written, ev.upload) == (Op.CLOSE, 32868, 0, None)
    assert ops(w.events) == [Op.OPEN, Op.CLOSE]


def test_upload_of_renamed_filepart_completes_once_under_final_name() -> None:
    w = Wire()
    w.open(b"up/clip.mp4.filepart", UPLOAD_FLAGS, b"\0\0\0\2")
    w.write(b"\0\0\0\2", [5000, 5000])
    [close] = w.call(codec.FXP_CLOSE, handle=b"\0\0\0\2")
    assert close.upload is None
    assert close.message == "temporary name: the upload completes when renamed"
    [ren] = w.call(
        codec.FXP_EXTENDED,
        extension=codec.EXT_POSIX_RENAME,
        path=b"up/clip.mp4.filepart",
        path2=b"up/clip.mp4",
    )
    assert (ren.op, ren.path, ren.path2) == (
        Op.RENAME,
        "/home/alice/up/clip.mp4.filepart",
        "/home/alice/up/clip.mp4",
    )
    assert (ren.upload, ren.bytes_written, ren.attrs) == (
        UploadState.COMPLETE,
        10000,
        {"overwrite": True},
    )
    assert [e.upload for e in w.events].count(UploadState.COMPLETE) == 1


def test_rename_of_temp_name_with_nothing_written_this_session_is_no_upload() -> None:
    w = Wire()
    [ren] = w.call(codec.FXP_RENAME, path=b"old.part", path2=b"old.mp4")
    assert (ren.upload, ren.bytes_written, ren.attrs) == (None, 0, None)
    assert "not an upload" in (ren.message or "")


def test_failed_rename_of_filepart_journals_failure_and_no_upload() -> None:
    w = Wire()
    w.open(b"a.tmp", UPLOAD_FLAGS, b"h")
    w.write(b"h", [10])
    w.call(codec.FXP_CLOSE, handle=b"h")
    [ren] = w.call(
        codec.FXP_RENAME, w.failed(codec.FX_FAILURE, b"exists"), path=b"a.tmp", path2=b"a.mp4"
    )
    assert (ren.status, ren.message, ren.upload) == ("failure", "exists", None)
    # the temp upload is still pending: a later rename completes it
    [ren] = w.call(codec.FXP_RENAME, path=b"a.tmp", path2=b"b.mp4")
    assert (ren.upload, ren.bytes_written) == (UploadState.COMPLETE, 10)


def test_write_handle_open_at_finish_is_incomplete_and_unanswered_requests_drop() -> None:
    w = Wire()
    w.open(b"cut.mp4", UPLOAD_FLAGS, b"\0\0\0\3")
    w.write(b"\0\0\0\3", [4096])
    w.request(Request(codec.FXP_WRITE, 99, handle=b"\0\0\0\3", offset=4096, data_len=4096))
    w.now += 3
    [ev] = w.tracker.finish()
    assert (ev.op, ev.upload, ev.bytes_written, ev.message) == (
        Op.CLOSE,
        UploadState.INCOMPLETE,
        4096,
        "session ended with the file open",
    )
    # the reply to the unanswered WRITE arrives too late to count
    assert w.reply(Reply(codec.FXP_STATUS, 99, code=0, message=b"", lang=b"")) == []


def test_failed_remove_is_journaled_with_status_name_and_message() -> None:
    w = Wire()
    [ev] = w.call(
        codec.FXP_REMOVE, w.failed(codec.FX_NO_SUCH_FILE, b"No such file"), path=b"gone.mp4"
    )
    assert (ev.op, ev.path, ev.status, ev.message, ev.ok) == (
        Op.REMOVE,
        "/home/alice/gone.mp4",
        "no_such_file",
        "No such file",
        False,
    )
    [ok] = w.call(codec.FXP_REMOVE, path=b"there.mp4")
    assert (ok.status, ok.message) == ("ok", None)


def test_listing_counts_names_without_dot_entries_at_close() -> None:
    w = Wire()
    w.call(codec.FXP_OPENDIR, Reply(codec.FXP_HANDLE, handle=b"d"), path=b".")
    batch = tuple(NameEntry(n) for n in (b".", b"..", b"a.mp4", b"b"))
    assert w.call(codec.FXP_READDIR, Reply(codec.FXP_NAME, names=batch), handle=b"d") == []
    w.call(codec.FXP_READDIR, Reply(codec.FXP_NAME, names=(NameEntry(b"c"),)), handle=b"d")
    w.call(codec.FXP_READDIR, codec.FX_EOF, handle=b"d")
    [ev] = w.call(codec.FXP_CLOSE, handle=b"d")
    assert (ev.op, ev.path, ev.attrs, ev.status) == (Op.LIST, HOME, {"entries": 3}, "ok")
    [denied] = w.call(
        codec.FXP_OPENDIR, w.failed(codec.FX_PERMISSION_DENIED, b"Permission denied"), path=b"/root"
    )
    assert (denied.op, denied.path, denied.status) == (Op.LIST, "/root", "permission_denied")


def test_setstat_and_fsetstat_journal_the_attribute_summary() -> None:
    w = Wire()
    attrs = Attrs(size=10, uid=1000, gid=100, permissions=0o100640, atime=3, mtime=4)
    [ev] = w.call(codec.FXP_SETSTAT, path=b"x.mp4", attrs=attrs)
    assert (ev.op, ev.path) == (Op.SETSTAT, "/home/alice/x.mp4")
    assert ev.attrs == {"size": 10, "mode": "0640", "uid": 1000, "gid": 100, "atime": 3, "mtime": 4}
    w.open(b"y.mp4", FXF_WRITE, b"h")
    [ev] = w.call(codec.FXP_FSETSTAT, handle=b"h", attrs=Attrs(mtime=9, atime=8))
    assert (ev.path, ev.attrs) == ("/home/alice/y.mp4", {"atime": 8, "mtime": 9})
    [ev] = w.call(
        codec.FXP_EXTENDED, extension=codec.EXT_LSETSTAT, path=b"l", attrs=Attrs(permissions=0o755)
    )
    assert (ev.op, ev.path, ev.attrs) == (Op.SETSTAT, "/home/alice/l", {"mode": "0755"})


def test_symlink_journals_link_as_path_and_target_as_written() -> None:
    w = Wire()
    [ev] = w.call(codec.FXP_SYMLINK, path=b"../shared/target.mp4", path2=b"link.mp4")
    assert (ev.op, ev.path, ev.path2) == (
        Op.SYMLINK,
        "/home/alice/link.mp4",
        "../shared/target.mp4",
    )


def test_hardlink_journals_new_name_as_path() -> None:
    w = Wire()
    [ev] = w.call(codec.FXP_EXTENDED, extension=codec.EXT_HARDLINK, path=b"a", path2=b"b")
    assert (ev.op, ev.path, ev.path2) == (Op.LINK, "/home/alice/b", "/home/alice/a")


@pytest.mark.parametrize(
    ("raw", "resolved"),
    [
        (b"clip.mp4", "/home/alice/clip.mp4"),
        (b"./sub//x/../clip.mp4", "/home/alice/sub/clip.mp4"),
        (b"../bob/x", "/home/bob/x"),
        (b"", "/home/alice"),
        (b"/tmp/../etc//passwd", "/etc/passwd"),
        (b"//srv/x", "/srv/x"),
        (b"-rf", "/home/alice/-rf"),
        ("vidéo.mp4".encode(), "/home/alice/vidéo.mp4"),
        (b"bad\xffname", "/home/alice/bad\\xffname"),
    ],
)
def test_paths_resolve_against_home_and_normalise(raw: bytes, resolved: str) -> None:
    w = Wire(home="/home/alice/")
    [ev] = w.call(codec.FXP_MKDIR, path=raw, attrs=Attrs(permissions=0o40750))
    assert (ev.op, ev.path, ev.mode) == (Op.MKDIR, resolved, 0o750)


def test_lookups_are_journaled_only_when_they_fail() -> None:
    w = Wire()
    assert w.call(codec.FXP_STAT, Reply(codec.FXP_ATTRS, attrs=Attrs(size=1)), path=b"x") == []
    assert (
        w.call(codec.FXP_REALPATH, Reply(codec.FXP_NAME, names=(NameEntry(b"/x"),)), path=b".")
        == []
    )
    [ev] = w.call(codec.FXP_LSTAT, w.failed(codec.FX_NO_SUCH_FILE, b"nope"), path=b"x")
    assert (ev.op, ev.status) == (Op.STAT, "no_such_file")
    [ev] = w.call(
        codec.FXP_EXTENDED,
        w.failed(codec.FX_NO_SUCH_FILE, b"nope"),
        extension=codec.EXT_EXPAND_PATH,
        path=b"~/missing",
    )
    assert (ev.op, ev.path) == (Op.REALPATH, "/home/alice/missing")
    assert (
        w.call(
            codec.FXP_EXTENDED,
            Reply(codec.FXP_EXTENDED_REPLY, ext_data=b"x"),
            extension=codec.EXT_LIMITS,
        )
        == []
    )


def test_failed_write_is_journaled_and_the_close_is_no_upload() -> None:
    w = Wire()
    w.open(b"full.mp4", UPLOAD_FLAGS, b"h")
    w.write(b"h", [100])
    w.write(b"h", [100], code=codec.FX_FAILURE)
    [werr] = w.events[-1:]
    assert (werr.op, werr.status, werr.bytes_written) == (Op.WRITE, "failure", 100)
    [close] = w.call(codec.FXP_CLOSE, handle=b"h")
    assert close.upload is None
    assert close.bytes_written == 100
    assert close.message == "write failed: msg"


def test_close_of_handle_that_wrote_nothing_is_not_an_upload() -> None:
    w = Wire()
    w.open(b"empty.mp4", FXF_WRITE | FXF_APPEND, b"h")
    [ev] = w.call(codec.FXP_CLOSE, handle=b"h")
    assert (ev.upload, ev.message) == (None, "nothing written: not an upload")


def test_protocol_error_becomes_one_bad_message_event() -> None:
    w = Wire()
    w.events.clear()
    w._send(w.client, w.tracker.client, struct.pack(">I", 0xFFFFFFF0) + b"junk")
    [ev] = w.events
    assert (ev.op, ev.status, ev.attrs) == (
        Op.PROTOCOL_ERROR,
        "bad_message",
        {"stream": "client", "offset": len(encode_request(Request(1, version=3)))},
    )
    assert "exceeds" in (ev.message or "")


def test_replies_are_paired_by_id_not_by_order() -> None:
    w = Wire()
    w.request(Request(codec.FXP_REMOVE, 50, path=b"a"))
    w.request(Request(codec.FXP_RMDIR, 51, path=b"d"))
    w.now += 1
    first = w.reply(Reply(codec.FXP_STATUS, 51, code=0, message=b"", lang=b""))
    second = w.reply(Reply(codec.FXP_STATUS, 50, code=2, message=b"gone", lang=b""), after=2)
    assert [(e.op, e.path, e.status) for e in first + second] == [
        (Op.RMDIR, "/home/alice/d", "ok"),
        (Op.REMOVE, "/home/alice/a", "no_such_file"),
    ]
    assert [e.duration for e in first + second] == pytest.approx([1.25, 3.25])


def test_copy_data_counts_known_lengths_and_flags_copy_until_eof() -> None:
    w = Wire()
    w.open(b"src.mp4", FXF_READ, b"r")
    w.open(b"copy.mp4", UPLOAD_FLAGS, b"w")
    copy: dict[str, Any] = {
        "extension": codec.EXT_COPY_DATA,
        "handle": b"r",
        "offset": 0,
        "handle2": b"w",
    }
    assert w.call(codec.FXP_EXTENDED, length=500, offset2=0, **copy) == []
    [closed] = w.call(codec.FXP_CLOSE, handle=b"w")
    assert (closed.bytes_written, closed.upload) == (500, UploadState.COMPLETE)
    w.open(b"copy2.mp4", UPLOAD_FLAGS, b"w")
    w.call(codec.FXP_EXTENDED, length=0, offset2=0, **copy)  # 0 = until end of file
    [closed] = w.call(codec.FXP_CLOSE, handle=b"w")
    assert (closed.bytes_written, closed.upload) == (0, None)
    assert "copy-data of unknown length" in (closed.message or "")
    [src] = w.call(codec.FXP_CLOSE, handle=b"r")
    assert src.bytes_read == 500


def test_finish_closes_read_handles_quietly_and_journals_open_listings() -> None:
    w = Wire()
    w.open(b"movie.flv", FXF_READ, b"r")
    w.call(codec.FXP_READ, Reply(codec.FXP_DATA, data_len=10), handle=b"r", offset=0, length=10)
    w.call(codec.FXP_OPENDIR, Reply(codec.FXP_HANDLE, handle=b"d"), path=b"sub")
    w.call(codec.FXP_READDIR, Reply(codec.FXP_NAME, names=(NameEntry(b"x"),)), handle=b"d")
    w.call(codec.FXP_READDIR, w.failed(codec.FX_FAILURE, b"I/O error"), handle=b"d")
    events = w.tracker.finish()
    assert [(e.op, e.path, e.upload) for e in events] == [
        (Op.CLOSE, "/home/alice/movie.flv", None),
        (Op.LIST, "/home/alice/sub", None),
    ]
    assert events[0].bytes_read == 10
    assert (events[1].attrs, events[1].status, events[1].message) == (
        {"entries": 1},
        "failure",
        "I/O error",
    )
    assert w.tracker.finish() == []


def test_handle_operations_that_fail_name_the_handle_path() -> None:
    w = Wire()
    w.open(b"f.mp4", FXF_WRITE, b"h")
    assert w.call(codec.FXP_EXTENDED, extension=codec.EXT_FSYNC, handle=b"h") == []
    [ev] = w.call(
        codec.FXP_EXTENDED,
        w.failed(codec.FX_FAILURE, b"fsync failed"),
        extension=codec.EXT_FSYNC,
        handle=b"h",
    )
    assert (ev.op, ev.path, ev.status) == (Op.FSYNC, "/home/alice/f.mp4", "failure")
    [ev] = w.call(codec.FXP_FSTAT, w.failed(codec.FX_FAILURE, b"bad"), handle=b"h")
    assert (ev.op, ev.path) == (Op.STAT, "/home/alice/f.mp4")


def test_temp_to_temp_rename_carries_the_upload_to_the_final_rename() -> None:
    w = Wire()
    w.open(b"a.part", UPLOAD_FLAGS, b"h")
    w.write(b"h", [7])
    w.call(codec.FXP_CLOSE, handle=b"h")
    [mid] = w.call(codec.FXP_RENAME, path=b"a.part", path2=b"b.tmp")
    assert mid.upload is None
    [final] = w.call(codec.FXP_RENAME, path=b"b.tmp", path2=b"b.mp4")
    assert (final.upload, final.bytes_written, final.path2) == (
        UploadState.COMPLETE,
        7,
        "/home/alice/b.mp4",
    )
