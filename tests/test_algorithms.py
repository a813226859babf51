"""What the gateway offers in the SSH handshake: no SHA-1, no CBC, no weak MAC (ssh-audit says so),
overrides in `algorithms`, and the host keys' fingerprints in the log."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import asyncssh
import paramiko
import pytest

from conftest import PASSWORDS, start_gateway


def ssh_audit(port: int) -> dict[str, object]:
    tool = Path(sys.executable).with_name("ssh-audit")
    if not tool.exists():
        pytest.fail("ssh-audit is not installed: run scripts/setup.sh (pyproject's test extra)")
    done = subprocess.run(
        [str(tool), "-j", "--skip-rate-test", "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        report: dict[str, object] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"ssh-audit said: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return report


def test_ssh_audit_finds_no_sha1_no_cbc_and_no_weak_mac(
    tmp_path: Path, user_keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sftpgate")
    running = start_gateway(tmp_path, user_keys)
    try:
        report = ssh_audit(running.port)
    finally:
        running.stop()
    offered = {
        kind: [entry["algorithm"] for entry in report[kind]]  # type: ignore[index, union-attr]
        for kind in ("kex", "key", "enc", "mac")
    }
    everything = [name for names in offered.values() for name in names]
    assert offered["enc"] and offered["mac"] and offered["kex"] and offered["key"]
    assert not [n for n in everything if "sha1" in n or n == "ssh-rsa" or n.endswith("-cbc")]
    assert not [n for n in offered["mac"] if n.startswith(("umac-64", "hmac-md5"))]
    assert set(offered["key"]) == {"ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"}
    # Nothing ssh-audit counts as a failure (its own list of broken algorithms).
    failures = [
        (kind, entry["algorithm"], entry["notes"]["fail"])  # type: ignore[index]
        for kind in ("kex", "key", "enc", "mac")
        for entry in report[kind]  # type: ignore[attr-defined]
        if entry.get("notes", {}).get("fail")
    ]
    assert not failures, failures
    # The host keys' SHA256 fingerprints are in the log at start.
    for name in ("ssh-ed25519", "ssh-rsa"):
        assert f"host key {name} SHA256:" in caplog.text


def test_algorithms_can_be_narrowed_and_clients_must_match(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    running = start_gateway(
        tmp_path,
        user_keys,
        extra={"algorithms": {"ciphers": ["aes256-ctr"], "host_keys": ["rsa-sha2-512"]}},
    )
    try:
        t = paramiko.Transport(("127.0.0.1", running.port))
        t.connect(username="alice", password=PASSWORDS["alice"])
        assert t.remote_cipher == "aes256-ctr"
        assert t.host_key_type == "rsa-sha2-512"
        t.close()

        async def asyncssh_with(**algs: list[str]) -> None:
            async with asyncssh.connect(
                "127.0.0.1",
                running.port,
                username="alice",
                password=PASSWORDS["alice"],
                known_hosts=None,
                client_keys=None,
                **algs,
            ):
                pass

        # Both sides see no common algorithm; whichever acts first, the client
        # gets the key exchange's failure or the gateway's close of it (a race,
        # ~1 in 4 here). The same client with the allowed cipher logs in below.
        refused = (asyncssh.KeyExchangeFailed, asyncssh.ConnectionLost)
        with pytest.raises(refused):
            asyncio.run(asyncssh_with(encryption_algs=["aes128-ctr"]))
        with pytest.raises(refused):
            asyncio.run(asyncssh_with(server_host_key_algs=["ssh-rsa"]))  # SHA-1 signatures
        asyncio.run(asyncssh_with(encryption_algs=["aes256-ctr"]))
    finally:
        running.stop()
