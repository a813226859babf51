"""The tap's event sender: acked events are done, the rest are spooled, and it never blocks.

A real Unix socket stands in for the daemon: one that acks every line it
reads, and one that accepts the connection but never reads a byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.subsystem import sender as sender_module
from sftpgate.subsystem.sender import EventSender
from sftpgate.subsystem.wire import ack_line, decode_line, encode_line, event_to_dict

SESSION = SessionInfo(id="0123abcd", remote_addr="127.0.0.1", remote_port=50000, login="alice")


def events(count: int) -> list[Event]:
    return [
        Event(Op.CLOSE, SESSION, path=f"/home/alice/f{i}.mp4", bytes_written=i, attrs={"n": [i]})
        for i in range(count)
    ]


def spooled(spool: Path) -> list[int]:
    return [
        json.loads(line)["seq"]
        for path in spool.glob("*.jsonl")
        for line in path.read_bytes().splitlines()
    ]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A daemon that acks every event it reads; yields its socket and the seqs it got."""
    path = tmp_path / "events.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    got: list[int] = []

    def serve() -> None:
        # One blocking ack per line: once the tap's side holds ~200 unread acks this
        # daemon stops reading until the tap takes them (the sender must, even in close()).
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as stream, contextlib.suppress(OSError):
            for line in stream:
                seq, _event = decode_line(line)
                got.append(seq)
                conn.sendall(ack_line(seq))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, got
    listener.close()
    thread.join(5)


def test_events_the_daemon_acks_are_not_spooled(
    daemon: tuple[Path, list[int]], tmp_path: Path
) -> None:
    path, got = daemon
    sender = EventSender(path, tmp_path, SESSION.id, ack_timeout=5)
    assert sender.connected
    for event in events(500):
        sender.send(event)
        sender.flush()
    sender.close()
    assert got == list(range(1, 501))
    assert spooled(tmp_path) == []


def test_events_gather_for_flush_delay_then_go_together_without_close(
    daemon: tuple[Path, list[int]], tmp_path: Path
) -> None:
    path, got = daemon
    sender = EventSender(path, tmp_path, SESSION.id, ack_timeout=5)
    assert sender.timeout() is None  # nothing waiting: the relay may sleep for good
    for event in events(5):
        sender.send(event)
    timeout = sender.timeout()
    assert timeout is not None and 0 <= timeout <= sender_module.FLUSH_DELAY * 1000 + 1
    assert not sender.wants_write  # waiting by choice, not for the socket
    time.sleep(sender_module.FLUSH_DELAY)
    assert sender.timeout() == 0
    sender.flush_due()
    assert sender.timeout() is None
    deadline = time.monotonic() + 5
    while len(got) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [1, 2, 3, 4, 5]  # the daemon has them while the session goes on
    sender.close()
    assert spooled(tmp_path) == []


def test_flush_bytes_of_waiting_events_go_at_once(
    daemon: tuple[Path, list[int]], tmp_path: Path
) -> None:
    path, got = daemon
    sender = EventSender(path, tmp_path, SESSION.id, ack_timeout=5)
    line = len(encode_line(1, events(1)[0]))
    sent = 0
    for event in events(2 * sender_module.FLUSH_BYTES // line):
        sender.send(event)  # no flush_due, no delay
        sent += 1
        if sender.timeout() is None:  # handed over: nothing waits any more
            break
    assert sender.timeout() is None
    deadline = time.monotonic() + 5
    while len(got) < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == list(range(1, sent + 1))
    assert sent * line >= sender_module.FLUSH_BYTES * 0.9  # not one by one
    sender.close()


def test_a_daemon_that_stops_reading_never_blocks_the_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sender_module, "MAX_BEHIND", 256 * 1024)
    path = tmp_path / "events.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        sender = EventSender(path, tmp_path, SESSION.id, ack_timeout=0.2)
        start = time.monotonic()
        for event in events(5000):  # ~1.5 MB of lines: far more than the socket buffers hold
            sender.send(event)
            sender.flush()
        assert time.monotonic() - start < 5  # a blocking send would hang here for good
        assert not sender.connected  # given up on: the rest went to the spool
        sender.close()
    assert sorted(spooled(tmp_path)) == list(range(1, 5001))


def test_an_unreachable_daemon_means_every_event_is_spooled(tmp_path: Path) -> None:
    sender = EventSender(tmp_path / "nobody.sock", tmp_path, SESSION.id, ack_timeout=0.2)
    assert not sender.connected and sender.fileno() is None
    for event in events(3):
        sender.send(event)
    sender.close()
    assert spooled(tmp_path) == [1, 2, 3]


def test_event_lines_are_what_asdict_gave_and_round_trip_with_their_key() -> None:
    event = Event(
        Op.CLOSE,
        SESSION,
        path="/home/alice/clip.mp4",
        flags=26,
        attrs={"permissions": "0o644", "list": [1, 2]},
        bytes_written=70_000,
        upload=UploadState.COMPLETE,
    )
    expected = {**dataclasses.asdict(event), "op": "close", "upload": "complete"}
    del expected["session"]["node"]  # the daemon names its own node; the tap sends none
    assert event_to_dict(event) == expected
    seq, decoded = decode_line(encode_line(7, event))
    assert seq == 7
    assert decoded == dataclasses.replace(event, key="0123abcd#7")
