"""Handles per session (``server.max_handles``) and the gateway's descriptor reserve.

An attacker (alice, from 127.0.0.2) pipelines 20,000 OPENs in one session:
the first ``max_handles`` get a handle, every other one a clear "too many
open handles" failure, journaled; the gateway's descriptors grow by no more
than the cap, and a bystander (carol) uploads and downloads every half second
throughout without a failure.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PASSWORDS, RunningGateway, start_gateway
from hostile_kit import Bystander, login_from, open_fds
from rawsftp import CLOSE, OPEN, RawSFTP, s, u32
from sftpgate.frontdoor.limits import MAX_HANDLES

HANDLE, STATUS = 102, 101
BATCH = 500


def overlapped(bystander: Bystander, rounds: int = 3, timeout: float = 30) -> None:
    """Wait until the bystander has done ``rounds`` rounds, so the attack overlapped them."""
    deadline = time.monotonic() + timeout
    while len(bystander.rounds) < rounds and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def door(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = start_gateway(tmp_path, user_keys)
    try:
        yield running
    finally:
        running.stop()


def open_many(raw: RawSFTP, count: int, name: bytes = b"f.bin") -> tuple[list[bytes], list[str]]:
    """Pipeline ``count`` OPENs (read) in batches; the handles got, the failures' messages."""
    handles: list[bytes] = []
    refused: list[str] = []
    left = count
    while left:
        batch = min(BATCH, left)
        left -= batch
        frames = [raw.framed(OPEN, s(name), u32(0x01), u32(0))[1] for _ in range(batch)]
        raw.chan.sendall(b"".join(frames))
        for _ in range(batch):
            kind, _, body = raw.reply()
            if kind == HANDLE:
                handles.append(body[4:])
            else:
                assert kind == STATUS
                (code, size) = struct.unpack_from(">II", body)
                refused.append(f"{code} {body[8 : 8 + size].decode()}")
    return handles, refused


def close_all(raw: RawSFTP, handles: list[bytes]) -> None:
    for start in range(0, len(handles), BATCH):
        chunk = handles[start : start + BATCH]
        raw.chan.sendall(b"".join(raw.framed(CLOSE, s(h))[1] for h in chunk))
        for _ in chunk:
            kind, _, body = raw.reply()
            assert kind == STATUS and body[:4] == b"\0\0\0\0"


def test_20000_handles_in_one_session_stop_at_the_cap_and_others_keep_working(
    door: RunningGateway,
) -> None:
    (door.home("alice") / "f.bin").write_bytes(b"x" * 100)
    t = login_from("127.0.0.2", door.port, "alice", PASSWORDS["alice"])
    try:
        raw = RawSFTP(t)
        before = open_fds()
        with Bystander(door.port, "carol", PASSWORDS["carol"]) as bystander:
            handles, refused = open_many(raw, 20_000)
            held = open_fds() - before
            close_all(raw, handles)
            overlapped(bystander)
        assert len(handles) == MAX_HANDLES == 512
        assert len(refused) == 20_000 - MAX_HANDLES
        assert set(refused) == {"4 too many open handles (at most 512 a session)"}
        # The session's files hold at most the cap (plus the bystander's few, in flight).
        assert MAX_HANDLES <= held < MAX_HANDLES + 40
        # Once closed, the session opens again.
        again, none = open_many(raw, 3)
        assert len(again) == 3 and not none
        close_all(raw, again)
    finally:
        t.close()
    bystander.check(most=3.0)
    rows = door.wait_rows(
        lambda rs: sum("too many open handles" in (r["message"] or "") for r in rs) == 19_488,
        timeout=30,
    )
    refusal = next(r for r in rows if "too many open handles" in (r["message"] or ""))
    assert refusal["op"] == "open" and refusal["status"] == "failure"
    assert refusal["remote_addr"] == "127.0.0.2" and refusal["path"] == "/f.bin"
    # The defender counts the session's limit hit once, not 19,488 times.
    guard = door.gateway.guard
    assert guard is not None
    assert guard.defender.score("127.0.0.2") == door.config.defender.score_limit


def test_handles_of_every_session_together_stop_short_of_the_descriptor_limit(
    door: RunningGateway,
) -> None:
    (door.home("alice") / "f.bin").write_bytes(b"x" * 100)
    limits = door.gateway.limits
    # As if the process's open-files limit were 30 descriptors above what it holds now.
    limits.most_open_files = limits.open_files + 30
    first = login_from("127.0.0.2", door.port, "alice", PASSWORDS["alice"])
    second = login_from("127.0.0.3", door.port, "alice", PASSWORDS["alice"])
    try:
        a, b = RawSFTP(first), RawSFTP(second)
        got_a, refused_a = open_many(a, 20)
        got_b, refused_b = open_many(b, 20)
        assert len(got_a) == 20 and not refused_a
        assert len(got_b) == 10
        assert set(refused_b) == {"4 too many open files in the gateway, try again later"}
        close_all(a, got_a)
        more, none = open_many(b, 5)  # room again once the first let go
        assert len(more) == 5 and not none
        close_all(b, got_b + more)
        assert limits.open_files == 0
    finally:
        first.close()
        second.close()
