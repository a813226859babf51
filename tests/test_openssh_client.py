"""The same actions with OpenSSH's own `sftp` client in batch mode: a client nobody here wrote."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import RunningGateway, need_tool


def run_sftp_batch(gateway: RunningGateway, login: str, batch: str, tmp: Path) -> str:
    sftp = need_tool("sftp", "apt-get install openssh-client")
    batch_file = tmp / "batch.txt"
    batch_file.write_text(batch)
    result = subprocess.run(
        [
            sftp,
            "-b",
            str(batch_file),
            "-P",
            str(gateway.port),
            "-i",
            str(gateway.keys[login]),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            f"{login}@127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def test_openssh_sftp_batch_upload_is_journaled_like_paramikos(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    local = tmp_path / "my clip.mp4"
    payload = b"\x00\x01video" * 10_000
    local.write_bytes(payload)
    out = run_sftp_batch(
        gateway,
        "bob",
        """\
mkdir incoming
put "my clip.mp4" "incoming/my clip.mp4"
ls -l incoming
rename "incoming/my clip.mp4" incoming/final.mp4
get incoming/final.mp4 back.mp4
chmod 600 incoming/final.mp4
rm incoming/final.mp4
rmdir incoming
""",
        tmp_path,
    )
    assert "my clip.mp4" in out
    assert (tmp_path / "back.mp4").read_bytes() == payload
    assert list(gateway.home("bob").iterdir()) == []

    gateway.close_clients()
    rows = gateway.wait_rows(lambda rs: any(r["op"] == "logout" for r in rs))
    ops = [(r["op"], r["path"]) for r in rows if r["op"] not in ("open",)]
    assert ("mkdir", "/incoming") in ops
    assert ("close", "/incoming/my clip.mp4") in ops
    assert ("rename", "/incoming/my clip.mp4") in ops
    assert ("setstat", "/incoming/final.mp4") in ops
    assert ("remove", "/incoming/final.mp4") in ops
    assert ("rmdir", "/incoming") in ops
    upload = next(r for r in rows if r["op"] == "close" and r["bytes_written"])
    assert upload["bytes_written"] == len(payload)
    download = next(r for r in rows if r["op"] == "close" and r["bytes_read"])
    assert download["bytes_read"] == len(payload)
    (session,) = gateway.rows("SELECT * FROM sessions")
    assert "OpenSSH" in session["client_version"]
    assert session["auth_method"] == "publickey"
    uploads = gateway.rows("SELECT path, state, bytes FROM uploads")
    assert uploads == [
        {"path": "/incoming/my clip.mp4", "state": "complete", "bytes": len(payload)}
    ]


def test_a_multi_megabyte_upload_arrives_byte_for_byte(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    # Many SSH packets per socket read, and packets split across reads: the
    # gateway hands asyncssh one packet at a time (ssh._feed_whole_packets).
    local = tmp_path / "big.bin"
    payload = os.urandom(24 * 1024 * 1024 + 12345)
    local.write_bytes(payload)
    run_sftp_batch(gateway, "bob", "put big.bin big.bin\nget big.bin back.bin\n", tmp_path)
    assert (gateway.home("bob") / "big.bin").read_bytes() == payload
    assert (tmp_path / "back.bin").read_bytes() == payload


@pytest.mark.parametrize(
    ("block", "requests", "size"),
    [
        (1, 1, 3000),  # one byte a request, one at a time
        (5, 10, 20_000),  # the 4,000 requests of 5 bytes, 10 outstanding
        (512, 256, 300_000),  # many outstanding
        # The most the client sends: its own messages stop at 256 KiB (header included).
        (255 * 1024, 128, 6 * 1024 * 1024 + 7),
    ],
)
def test_openssh_sftp_block_and_request_extremes(
    gateway: RunningGateway, tmp_path: Path, block: int, requests: int, size: int
) -> None:
    """`sftp -B`/`-R` at their ends: every byte up and back down, each transfer journaled."""
    sftp = need_tool("sftp", "apt-get install openssh-client")
    payload = os.urandom(size)
    (tmp_path / "up.bin").write_bytes(payload)
    result = subprocess.run(
        [
            *(sftp, "-B", str(block), "-R", str(requests), "-P", str(gateway.port)),
            *("-i", str(gateway.keys["bob"]), "-o", "StrictHostKeyChecking=no"),
            *("-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"),
            *("-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-b", "-", "bob@127.0.0.1"),
        ],
        input="put up.bin x.bin\nget x.bin down.bin\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert (gateway.home("bob") / "x.bin").read_bytes() == payload
    assert (tmp_path / "down.bin").read_bytes() == payload
    rows = [r for r in gateway.op_rows("close", count=2) if r["path"] == "/x.bin"]
    assert sorted((r["bytes_written"] or 0, r["bytes_read"] or 0) for r in rows) == [
        (0, size),
        (size, 0),
    ]
