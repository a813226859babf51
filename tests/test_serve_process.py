"""`sftpgate serve` as a real process: host keys, env overrides, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest
import yaml

from conftest import PASSWORDS, free_port, write_config


class ServeProcess:
    """`sftpgate serve` (or ``command``) as a process; its stderr lines are kept."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str] | None = None,
        *,
        command: list[str] | None = None,
        umask: int = -1,
    ) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "sftpgate", "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            umask=umask,
        )
        listening = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if "listening on" in line:
                    listening.set()

        threading.Thread(target=drain, daemon=True).start()
        if not listening.wait(60):
            self.stop()
            pytest.fail("serve did not start: " + "".join(self.lines))

    def hup_and_wait(self, text: str, timeout: float = 10) -> str:
        """Send SIGHUP and return the first log line after it that holds ``text``."""
        seen = len(self.lines)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in the log after SIGHUP: {self.lines[seen:]}")

    def stop(self) -> int:
        return stop_serve(self.proc)


def start_serve(
    config: Path, env: dict[str, str], command: list[str] | None = None, umask: int = -1
) -> subprocess.Popen[str]:
    """Start `sftpgate serve` (or ``command``), wait for its "listening" line, drain its stderr."""
    return ServeProcess(config, env, command=command, umask=umask).proc


def stop_serve(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def kill_serve(proc: subprocess.Popen[str]) -> None:
    """SIGKILL, as a crash would: no cleanup of any kind."""
    try:
        proc.kill()
        proc.wait(10)
    finally:
        assert proc.stderr is not None
        proc.stderr.close()


def host_key(port: int) -> paramiko.PKey:
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.start_client()
        return t.get_remote_server_key()
    finally:
        t.close()


def test_serve_creates_host_keys_0600_reuses_them_and_stops_on_sigterm(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config = write_config(tmp_path, user_keys)
    port = free_port()
    env = {"SFTPGATE_SERVER__PORT": str(port)}  # the environment beats the file (port: 0)

    proc = start_serve(config, env)
    try:
        first = host_key(port)
        keys = sorted(p.name for p in (tmp_path / "hostkeys").iterdir())
        assert keys == [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
            "ssh_host_rsa_key.pub",
        ]
        for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
            assert stat.S_IMODE((tmp_path / "hostkeys" / name).stat().st_mode) == 0o600
        t = paramiko.Transport(("127.0.0.1", port))
        t.connect(username="alice", password=PASSWORDS["alice"])
        client = paramiko.SFTPClient.from_transport(t)
        assert client is not None
        client.mkdir("made-by-process")
        t.close()
    finally:
        assert stop_serve(proc) == 0

    proc = start_serve(config, env)
    try:
        assert host_key(port) == first
    finally:
        assert stop_serve(proc) == 0
    assert (tmp_path / "homes" / "alice" / "made-by-process").is_dir()


def test_sighup_reloads_users_without_dropping_the_listener(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config = write_config(tmp_path, user_keys)
    port = free_port()
    proc = start_serve(config, {"SFTPGATE_SERVER__PORT": str(port)})
    try:
        data = yaml.safe_load(config.read_text())
        data["users"] = [u for u in data["users"] if u["login"] != "alice"]
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        refused = False
        while time.monotonic() < deadline and not refused:
            t = paramiko.Transport(("127.0.0.1", port))
            try:
                t.connect(username="alice", password=PASSWORDS["alice"])
            except paramiko.AuthenticationException:
                refused = True
            finally:
                t.close()
            time.sleep(0.1)
        assert refused, "alice could still log in after she was removed and SIGHUP sent"
    finally:
        assert stop_serve(proc) == 0
