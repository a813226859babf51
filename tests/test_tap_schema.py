"""The daemon's socket trusts nothing: every line is checked against a typed schema.

Pure checks of ``wire.decode_line`` and the token bucket, then a real
:class:`TapDaemon` on a real Unix socket with a real journal writer: refused
lines are journaled as refusals (uid and reason, never the value) and never
reach the journal as events; over-long lines, extra connections and floods
cost only the connection that sends them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import write_config
from sftpgate.config import Config, User, load_config
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.journal.writer import JournalWriter
from sftpgate.subsystem.daemon import TapDaemon, TokenBucket
from sftpgate.subsystem.wire import MAX_LINE, SchemaError, decode_line, encode_line, event_to_dict

HUGE = 2**70


def valid(seq: int = 1, **changes: Any) -> dict[str, Any]:
    """A line the tap could have sent, as data, with ``changes`` to its event."""
    session = SessionInfo(id="0123abcd", remote_addr="10.0.0.1", remote_port=5000, login="alice")
    event = Event(Op.CLOSE, session, path="/home/alice/v.mp4", bytes_written=10)
    data = event_to_dict(event, key=f"0123abcd#{seq}")
    data.update(changes)
    return {"seq": seq, "event": data}


def line(data: Any) -> bytes:
    return json.dumps(data).encode() + b"\n"


def without(field: str) -> dict[str, Any]:
    data = valid()
    del data["event"][field]
    return data


def with_session(**changes: Any) -> dict[str, Any]:
    data = valid()
    data["event"]["session"] = {**data["event"]["session"], **changes}
    return data


# Each class of bad line: (bytes, what the refusal must name).
BAD_LINES: dict[str, tuple[bytes, str]] = {
    "wrong type": (line(valid(duration="x")), "event.duration: must be a number"),
    "bool for int": (line(valid(flags=True)), "event.flags: must be an integer"),
    "missing field": (line(without("status")), "event.status: missing"),
    "unknown field": (line(valid(owner="root")), "unknown field"),
    "huge int": (line(valid(bytes_written=HUGE)), "event.bytes_written: out of range"),
    "negative int": (line(with_session(remote_port=-1)), "event.session.remote_port"),
    "nested object": (line(valid(path={"a": [{"b": 1}]})), "event.path: must be a string"),
    "nested attrs": (line(valid(attrs={"a": {"b": 1}})), "event.attrs.a: must be a string"),
    "unknown op": (line(valid(op="format_disk")), "event.op: not one of"),
    "pipeline op": (line(valid(op="converted")), "event.op: not one of"),
    "unknown status": (line(valid(status="fine")), "event.status: not an SFTP status"),
    "unknown upload": (line(valid(upload="maybe")), "event.upload: not one of"),
    "long path": (line(valid(path="/" + "a" * 5000)), "event.path: longer than 4096"),
    "NUL in path": (line(valid(path="/a\0b")), "event.path: contains NUL"),
    "lone surrogate": (
        line(valid()).replace(b'"op": "close"', b'"op": "\\ud800"'),
        "event.op: not one of",
    ),
    "surrogate path": (
        line(valid()).replace(b'"/home/alice/v.mp4"', b'"/home/alice/\\udc80"'),
        "event.path: not valid Unicode",
    ),
    "NaN": (line(valid(time=float("nan"))), "NaN is not a number"),
    "infinity": (line(valid(duration=float("inf"))), "Infinity is not a number"),
    "bad session id": (line(with_session(id="../../x")), "event.session.id: not of the form"),
    "invalid UTF-8": (b'{"seq": 1, "event": "\xff\xfe"}\n', "not UTF-8"),
    "not JSON": (b"hello\n", "not a JSON value"),
    "not an object": (b"[1, 2]\n", "must be an object"),
    "no seq": (line({"event": valid()["event"]}), "line.seq"),
    "event not an object": (line({"seq": 1, "event": [1]}), "event: must be an object"),
    "deep nesting": (b'{"seq": 1, "event": ' + b"[" * 50_000 + b"}\n", "not a JSON value"),
    "oversized": (b'{"seq": 1, "x": "' + b"a" * MAX_LINE + b'"}\n', "line longer than"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_class_of_bad_line_is_refused_naming_the_field_not_the_value(kind: str) -> None:
    raw, reason = BAD_LINES[kind]
    with pytest.raises(SchemaError) as refused:
        decode_line(raw)
    why = str(refused.value)
    assert reason in why
    assert len(why) < 200 and str(HUGE) not in why and "aaaa" not in why


def test_a_valid_line_keeps_its_seq_when_its_event_is_refused() -> None:
    with pytest.raises(SchemaError) as refused:
        decode_line(line(valid(seq=41, duration="x")))
    assert refused.value.seq == 41  # so the daemon can ack it: a resend is refused again


def test_a_valid_line_decodes_to_its_event() -> None:
    session = SessionInfo(id="ab12", remote_addr="10.0.0.1", remote_port=22, login="alice")
    event = Event(
        Op.RENAME,
        session,
        path="/home/alice/a.part",
        path2="/home/alice/a.mp4",
        attrs={"overwrite": True, "n": [1, 2.5, "x", None]},
        bytes_written=7,
        upload=UploadState.COMPLETE,
        status="status_42",
    )
    seq, decoded = decode_line(encode_line(3, event))
    assert seq == 3 and decoded.op is Op.RENAME and decoded.upload is UploadState.COMPLETE
    assert decoded.attrs == event.attrs and decoded.key == "ab12#3"


def test_the_token_bucket_gives_its_burst_then_its_rate() -> None:
    now = [100.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() == pytest.approx(0.1)  # owed: wait a tenth of a second
    assert not bucket.try_take()
    now[0] += 0.2  # two tokens in: one pays the debt
    assert bucket.try_take() and not bucket.try_take()
    now[0] += 3600  # never more than the burst saved
    assert [bucket.take() for _ in range(5)] == [0.0] * 5 and bucket.take() > 0


# -- a real daemon on a real socket, with a real journal --------------------------


class Tap:
    """A client of the daemon's socket (as this test's uid, which the daemon maps to alice)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> Tap:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def acks(self, count: int) -> list[int]:
        return [json.loads(await self.reader.readline())["ack"] for _ in range(count)]

    async def closed_by_daemon(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


def journal_rows(config: Config, sql: str = "SELECT * FROM operations ORDER BY id") -> Any:
    conn = sqlite3.connect(config.journal_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


Body = Callable[[TapDaemon, Path], Awaitable[None]]


def run_daemon(tmp_path: Path, user_keys: dict[str, Path], body: Body, **limits: Any) -> Config:
    """Start writer and daemon, run ``body``, stop both (everything committed); the config."""
    home = tmp_path / "homes" / "alice"
    extra = {"subsystem": {"socket": str(tmp_path / "tap.sock"), "spool_dir": "spool"}}
    config = load_config(write_config(tmp_path, user_keys, extra), environ={})
    alice = config.user("alice")
    assert alice is not None and alice.home == home

    def user_for_login(login: str) -> User | None:
        return alice  # whoever runs this test is alice to the daemon

    async def main() -> None:
        writer = JournalWriter(config.journal_path, interval=0.005)
        writer.start()
        daemon = TapDaemon(config, writer, user_for_login, **limits)
        await daemon.start()
        try:
            await asyncio.wait_for(body(daemon, config.subsystem.socket), 30)
        finally:
            await daemon.stop()
            await writer.aclose()

    asyncio.run(main())
    return config


def alice_line(seq: int, path: str = "/v.mp4", **changes: Any) -> bytes:
    data = valid(seq, **changes)
    data["event"]["path"] = f"{HOME_MARK}{path}"
    return line(data)


HOME_MARK = "@HOME@"


def refused_seq(raw: bytes) -> int | None:
    try:
        decode_line(raw)
    except SchemaError as exc:
        return exc.seq
    raise AssertionError("not refused")


def test_bad_lines_are_journaled_as_refusals_and_never_as_events(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    home = str(tmp_path / "homes" / "alice")
    bad = [raw for kind, (raw, _) in sorted(BAD_LINES.items()) if kind != "oversized"]
    # Every bad line claims a complete upload where it can: none may become one.
    bad = [raw.replace(b'"upload": null', b'"upload": "complete"') for raw in bad]
    with_seq = [raw for raw in bad if refused_seq(raw) is not None]
    assert 0 < len(with_seq) < len(bad)

    async def body(daemon: TapDaemon, sock: Path) -> None:
        tap = await Tap.connect(sock)
        await tap.send(b"".join(bad))
        good = alice_line(99, "/good.mp4", upload="complete")
        await tap.send(good.replace(HOME_MARK.encode(), home.encode()))
        acks = await tap.acks(len(with_seq) + 1)  # refused, but journaled: acked too
        assert acks == [1] * len(with_seq) + [99]
        tap.close()

    config = run_daemon(tmp_path, user_keys, body)
    rows = journal_rows(config)
    refusals = [r for r in rows if r["status"] == "refused"]
    assert len(refusals) == len(bad)
    assert all(r["login"] == "alice" and f"(uid {os.getuid()})" in r["message"] for r in refusals)
    assert all(len(r["message"]) < 400 and str(HUGE) not in r["message"] for r in refusals)
    assert [(r["op"], r["path"]) for r in rows if r["status"] != "refused"] == [
        ("close", "/good.mp4")
    ]
    uploads = journal_rows(config, "SELECT path FROM uploads")
    assert uploads == [{"path": "/good.mp4"}]


def test_an_oversized_line_ends_only_its_own_connection(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    home = str(tmp_path / "homes" / "alice").encode()

    async def body(daemon: TapDaemon, sock: Path) -> None:
        hog, other = await Tap.connect(sock), await Tap.connect(sock)
        await hog.send(b"x" * (MAX_LINE * 3))  # no newline, ever
        assert await hog.closed_by_daemon()
        hog.close()
        await other.send(alice_line(1, "/still.txt").replace(HOME_MARK.encode(), home))
        assert await other.acks(1) == [1]
        other.close()

    config = run_daemon(tmp_path, user_keys, body)
    messages = [r["message"] for r in journal_rows(config) if r["status"] == "refused"]
    assert len(messages) == 1 and f"line longer than {MAX_LINE} bytes" in messages[0]


def test_connections_over_the_per_uid_limit_are_closed_at_once(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    home = str(tmp_path / "homes" / "alice").encode()

    async def body(daemon: TapDaemon, sock: Path) -> None:
        first, second = await Tap.connect(sock), await Tap.connect(sock)
        await first.send(alice_line(1, "/a").replace(HOME_MARK.encode(), home))
        await second.send(alice_line(1, "/b", key="other#1").replace(HOME_MARK.encode(), home))
        assert await first.acks(1) == [1] and await second.acks(1) == [1]  # both counted
        third = await Tap.connect(sock)
        assert await third.closed_by_daemon()  # that tap spools; its events come later
        third.close()
        await first.send(alice_line(2, "/c").replace(HOME_MARK.encode(), home))
        assert await first.acks(1) == [2]
        first.close()
        second.close()

    config = run_daemon(tmp_path, user_keys, body, max_connections_per_uid=2)
    rows = journal_rows(config)
    assert [r["path"] for r in rows if r["status"] == "ok"] == ["/a", "/b", "/c"]
    (refusal,) = [r for r in rows if r["status"] == "refused"]
    assert "over 2 connections" in refusal["message"]


def test_a_flood_waits_on_its_token_bucket_instead_of_being_read(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    # Clock and sleep injected: the bucket never refills by itself, and the
    # daemon's wait is a gate this test opens.
    home = str(tmp_path / "homes" / "alice").encode()
    now = [0.0]
    asked: list[float] = []
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:
        asked.append(seconds)
        await gate.wait()

    async def body(daemon: TapDaemon, sock: Path) -> None:
        tap = await Tap.connect(sock)
        lines = [alice_line(seq, f"/f{seq}") for seq in range(1, 21)]
        await tap.send(b"".join(lines).replace(HOME_MARK.encode(), home))
        assert await tap.acks(5) == [1, 2, 3, 4, 5]  # the burst
        while not asked:
            await asyncio.sleep(0)  # until the daemon, reading line 6, must wait
        assert asked == [pytest.approx(0.1)]  # one token owed at 10 a second
        assert daemon.refused == 0
        now[0] += 100  # time passes; the gate opens: the rest is read
        gate.set()
        assert await tap.acks(15) == list(range(6, 21))
        tap.close()

    config = run_daemon(
        tmp_path,
        user_keys,
        body,
        events_per_second=10,
        event_burst=5,
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert len(journal_rows(config)) == 20
