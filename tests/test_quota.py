"""Quotas (bytes and files, per user) and ``server.max_upload_size``, hit mid-upload.

Real paramiko clients against a real gateway; alice has a quota, carol (the
bystander, uploading and downloading every half second through each attack)
has none. Usage lives in the journal database (``quota_usage``): scanned
once, then kept current from the gateway's own changes.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORDS, RunningGateway, start_gateway
from hostile_kit import Bystander, login_from
from rawsftp import CLOSE, OPEN, WRITE_CREATE_TRUNC, RawSFTP, s, u32, u64

QUOTA = 64 * 1024
FILES = 4
EXTENDED, HANDLE = 200, 102


def overlapped(bystander: Bystander, rounds: int = 3, timeout: float = 30) -> None:
    """Wait until the bystander has done ``rounds`` rounds, so the attack overlapped them."""
    deadline = time.monotonic() + timeout
    while len(bystander.rounds) < rounds and time.monotonic() < deadline:
        time.sleep(0.05)


def usage_row(gw: RunningGateway, login: str = "alice") -> tuple[int, int] | None:
    conn = sqlite3.connect(gw.config.journal_path)
    try:
        row = conn.execute("SELECT bytes, files FROM quota_usage WHERE login = ?", (login,))
        found = row.fetchone()
    finally:
        conn.close()
    return None if found is None else (int(found[0]), int(found[1]))


def wait_usage(gw: RunningGateway, expected: tuple[int, int], timeout: float = 15) -> None:
    gw.wait_rows(
        lambda _: usage_row(gw) == expected,
        sql="SELECT 1",
        timeout=timeout,
    )


def start(tmp_path: Path, keys: dict[str, Path], **server: Any) -> RunningGateway:
    return start_gateway(
        tmp_path,
        keys,
        extra={"server": server} if server else None,
        users={"alice": {"quota_bytes": QUOTA, "quota_files": FILES}},
    )


@pytest.fixture
def quota(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = start(tmp_path, user_keys)
    try:
        yield running
    finally:
        running.stop()


def test_an_upload_past_the_quota_fails_mid_upload_and_starts_nothing(
    quota: RunningGateway, tmp_path: Path
) -> None:
    (quota.home("alice") / "old.bin").write_bytes(b"o" * 10_000)  # there before: scanned
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(200 * 1024))
    with Bystander(quota.port, "carol", PASSWORDS["carol"]) as bystander:
        sftp = quota.sftp("alice")
        # Each WRITE answered before the next (paramiko's put pipelines, and then
        # says only "size mismatch"): the refused one raises with the gateway's words.
        with (
            pytest.raises(OSError, match=f"Quota exceeded: at most {QUOTA} bytes"),
            sftp.open("big.mp4", "wb") as f,
        ):
            f.write(big.read_bytes())
        sftp.close()
        overlapped(bystander)
    bystander.check(most=3.0)
    rows = quota.wait_rows(lambda rs: any(r["status"] == "quota_exceeded" for r in rs))
    refused = next(r for r in rows if r["status"] == "quota_exceeded")
    assert refused["op"] == "write" and refused["path"] == "/big.mp4"
    assert refused["message"] == f"Quota exceeded: at most {QUOTA} bytes"
    # What was accepted stays within the quota; the upload completed nothing.
    assert (quota.home("alice") / "big.mp4").stat().st_size <= QUOTA - 10_000
    quota.op_rows("close")
    assert quota.rows("SELECT * FROM uploads WHERE path = '/big.mp4' AND state = 'complete'") == []
    # Usage: the file there before and what was written, in the journal database.
    on_disk = 10_000 + (quota.home("alice") / "big.mp4").stat().st_size
    wait_usage(quota, (on_disk, 2))


def test_the_file_quota_refuses_a_new_file_but_not_an_overwrite(quota: RunningGateway) -> None:
    sftp = quota.sftp("alice")
    for n in range(FILES):
        with sftp.open(f"f{n}.bin", "wb") as f:
            f.write(b"x")
    with pytest.raises(OSError, match=f"Quota exceeded: at most {FILES} files"):
        sftp.open("one-more.bin", "wb")
    with sftp.open("f0.bin", "wb") as f:  # an existing file: still writable, truncated
        f.write(b"again")
    sftp.remove("f1.bin")
    with sftp.open("one-more.bin", "wb") as f:  # the removed file's place
        f.write(b"y")
    wait_usage(quota, (5 + 1 + 1 + 1, FILES))
    rows = quota.wait_rows(lambda rs: any(r["status"] == "quota_exceeded" for r in rs))
    assert [r["op"] for r in rows if r["status"] == "quota_exceeded"] == ["open"]


def test_remove_and_a_rename_over_a_file_give_its_bytes_back(quota: RunningGateway) -> None:
    sftp = quota.sftp("alice")
    for name in ("a.bin", "b.bin"):
        with sftp.open(name, "wb") as f:
            f.write(b"z" * 30_000)
    with pytest.raises(OSError, match="Quota exceeded"), sftp.open("c.bin", "wb") as f:
        f.write(b"z" * 30_000)
    sftp.remove("c.bin")
    sftp.posix_rename("a.bin", "b.bin")  # b's 30,000 bytes are freed
    with sftp.open("c.bin", "wb") as f:
        f.write(b"z" * 30_000)
    wait_usage(quota, (60_000, 2))


def test_copy_data_counts_against_the_quota_and_never_copies_a_file_into_itself(
    quota: RunningGateway,
) -> None:
    (quota.home("alice") / "src.bin").write_bytes(b"s" * 40_000)
    t = login_from("127.0.0.2", quota.port, "alice", PASSWORDS["alice"])
    try:
        raw = RawSFTP(t)
        kind, body = raw.request(OPEN, s(b"src.bin"), u32(0x01 | 0x02), u32(0))
        assert kind == HANDLE
        src = body[4:]
        kind, body = raw.request(OPEN, s(b"dst.bin"), u32(WRITE_CREATE_TRUNC), u32(0))
        dst = body[4:]

        def copy(a: bytes, offset: int, length: int, b: bytes, to: int) -> tuple[int, str]:
            fields = s(b"copy-data") + s(a) + u64(offset) + u64(length) + s(b) + u64(to)
            return raw.status(EXTENDED, fields)

        # Into itself: refused, whole or overlapping, the file unchanged.
        for offset, length, to in ((0, 0, 0), (0, 0, 1), (0, 20_000, 10_000), (100, 10, 105)):
            code, message = copy(src, offset, length, src, to)
            assert (code, message) == (4, "copy-data: the source and destination ranges overlap")
        # Non-overlapping within one file is a copy like any other: counted.
        assert copy(src, 0, 10_000, src, 40_000)[0] == 0
        # To another file: past the quota it stops with the quota's error.
        code, message = copy(src, 0, 0, dst, 0)
        assert (code, message) == (4, f"Quota exceeded: at most {QUOTA} bytes")
        assert raw.status(CLOSE, s(src))[0] == 0
        raw.status(CLOSE, s(dst))
    finally:
        t.close()
    assert (quota.home("alice") / "src.bin").stat().st_size == 50_000
    assert (quota.home("alice") / "dst.bin").stat().st_size <= QUOTA - 50_000


def test_usage_is_kept_in_the_journal_database_not_rescanned_at_each_start(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    first = start(tmp_path, user_keys)
    try:
        sftp = first.sftp("alice")
        with sftp.open("kept.bin", "wb") as f:
            f.write(b"k" * 50_000)
        wait_usage(first, (50_000, 1))
    finally:
        first.stop()
    # Outside the gateway (what it cannot see): the next start does not rescan.
    (first.home("alice") / "kept.bin").unlink()
    second = start(tmp_path, user_keys)
    try:
        sftp = second.sftp("alice")
        # 50,000 + 20,000 > 64 KiB as the journal has it
        with pytest.raises(OSError, match="Quota exceeded"), sftp.open("next.bin", "wb") as f:
            f.write(b"n" * 20_000)
    finally:
        second.stop()


def test_max_upload_size_refuses_a_write_and_a_setstat_past_it(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    gw = start_gateway(tmp_path, user_keys, extra={"server": {"max_upload_size": 100_000}})
    try:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(150_000))
        with Bystander(gw.port, "alice", PASSWORDS["alice"]) as bystander:
            sftp = gw.sftp("carol")
            with (
                pytest.raises(OSError, match="File too large: at most 100000 bytes"),
                sftp.open("big.mp4", "wb") as f,
            ):
                f.write(big.read_bytes())
            with sftp.open("small.bin", "wb") as f:
                f.write(b"s")
            with pytest.raises(OSError, match="File too large"):
                sftp.truncate("small.bin", 100_001)
            sftp.truncate("small.bin", 100_000)  # up to it is fine
            overlapped(bystander)
        bystander.check(most=3.0)
        rows = gw.wait_rows(lambda rs: sum(r["status"] == "quota_exceeded" for r in rs) >= 2)
        ops = [r["op"] for r in rows if r["status"] == "quota_exceeded"]
        assert ops[:1] == ["write"] and "setstat" in ops
        complete = "SELECT * FROM uploads WHERE path = '/big.mp4' AND state = 'complete'"
        assert gw.rows(complete) == []
    finally:
        gw.stop()


def test_a_user_without_a_quota_has_no_usage_kept(quota: RunningGateway) -> None:
    sftp = quota.sftp("carol")
    with sftp.open("free.bin", "wb") as f:
        f.write(b"f" * 100_000)
    assert usage_row(quota, "carol") is None
