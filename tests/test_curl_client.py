"""curl (libssh2) against `serve`: upload, download, `-Q` commands; a client nobody here wrote."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import asyncssh

from conftest import PASSWORDS, RunningGateway, need_tool


def host_key_sha256(gateway: RunningGateway) -> str:
    """The gateway's ed25519 host key as curl pins it: unpadded base64 of its SHA-256.

    libssh2 prefers ed25519 to RSA, the other host key the gateway has.
    """
    pub = gateway.config.server.host_keys_dir / "ssh_host_ed25519_key.pub"
    return str(asyncssh.read_public_key(pub).get_fingerprint("sha256")).removeprefix("SHA256:")


def run_curl(
    gateway: RunningGateway, path: str, *args: str, login: str = "alice", cwd: Path
) -> subprocess.CompletedProcess[str]:
    """curl on ``sftp://…/~/path`` (``path`` beneath the home), the host key pinned.

    ``login`` logs in with its password if it has one, else with its key.
    """
    curl = need_tool("curl", "apt-get install curl")
    if login in PASSWORDS:
        auth = ["-u", f"{login}:{PASSWORDS[login]}"]
    else:
        key = gateway.keys[login]
        auth = ["-u", f"{login}:", "--key", str(key), "--pubkey", str(key.with_suffix(".pub"))]
    result = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--hostpubsha256",
            host_key_sha256(gateway),
            *auth,
            *args,
            f"sftp://127.0.0.1:{gateway.port}/~/{path}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, f"curl exited {result.returncode}: {result.stderr}"
    return result


def test_curl_upload_and_download_arrive_byte_for_byte_and_are_journaled(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    payload = os.urandom(300_000)  # several of libssh2's WRITEs and READs
    (tmp_path / "clip.mp4").write_bytes(payload)

    run_curl(gateway, "clip.mp4", "-T", "clip.mp4", login="bob", cwd=tmp_path)
    assert (gateway.home("bob") / "clip.mp4").read_bytes() == payload
    run_curl(gateway, "clip.mp4", "-o", "back.mp4", login="bob", cwd=tmp_path)
    assert (tmp_path / "back.mp4").read_bytes() == payload

    gateway.wait_rows(lambda rs: sum(r["op"] == "logout" for r in rs) >= 2)
    closes = [r for r in gateway.rows() if r["op"] == "close"]
    assert [(r["path"], r["bytes_written"], r["bytes_read"]) for r in closes] == [
        ("/clip.mp4", len(payload), 0),
        ("/clip.mp4", 0, len(payload)),
    ]
    assert gateway.rows("SELECT path, state, bytes FROM uploads") == [
        {"path": "/clip.mp4", "state": "complete", "bytes": len(payload)}
    ]
    sessions = gateway.rows("SELECT client_version, auth_method FROM sessions")
    assert [(s["client_version"].split("_")[0], s["auth_method"]) for s in sessions] == [
        ("SSH-2.0-libssh2", "publickey")
    ] * 2


def test_curl_quote_commands_act_on_disk_and_are_journaled(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    home = gateway.home("alice")
    (home / "a.txt").write_text("a")
    (home / "old.txt").write_text("old")
    (home / "empty").mkdir()

    quotes = [
        "mkdir dir",
        "rename a.txt dir/b.txt",
        "symlink dir/b.txt link",  # curl: a link at `link` pointing to dir/b.txt
        "chmod 600 dir/b.txt",
        "rm old.txt",
        "rmdir empty",
    ]
    args = [arg for q in quotes for arg in ("-Q", q)]
    listing = run_curl(gateway, "", *args, cwd=tmp_path).stdout  # the home's listing after them

    assert (home / "dir").is_dir()
    assert (home / "dir" / "b.txt").read_text() == "a"
    assert not (home / "a.txt").exists()
    assert os.readlink(home / "link") == "dir/b.txt"
    assert (home / "link").read_text() == "a"
    assert stat.S_IMODE((home / "dir" / "b.txt").stat().st_mode) == 0o600
    assert not (home / "old.txt").exists()
    assert not (home / "empty").exists()
    assert "link -> dir/b.txt" in listing

    rows = gateway.wait_rows(lambda rs: any(r["op"] == "logout" for r in rs))
    changed = ("mkdir", "rename", "symlink", "setstat", "remove", "rmdir")
    changes = [r for r in rows if r["op"] in changed]
    assert [(r["op"], r["path"], r["path2"], r["status"]) for r in changes] == [
        ("mkdir", "/dir", None, "ok"),
        ("rename", "/a.txt", "/dir/b.txt", "ok"),
        ("symlink", "/link", "dir/b.txt", "ok"),
        ("setstat", "/dir/b.txt", None, "ok"),
        ("remove", "/old.txt", None, "ok"),
        ("rmdir", "/empty", None, "ok"),
    ]
    setstat: dict[str, Any] = json.loads(changes[3]["attrs"])
    assert setstat["mode"] == "0600"
