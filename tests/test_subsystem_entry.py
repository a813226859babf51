"""`sftpgate subsystem` starts lean: sshd runs it for every OpenSSH session.

Each test runs the installed `sftpgate` script the way sshd does, through one
real SFTP handshake with Debian's sftp-server, with ``PYTHONPROFILEIMPORTTIME``
set: Python then names on stderr every module the process imported, from
start-up to exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from sshd_kit import need_sshd

SFTPGATE = str(Path(sys.executable).parent / "sftpgate")
SSH_FXP_INIT = (5).to_bytes(4, "big") + bytes([1]) + (3).to_bytes(4, "big")
SSH_FXP_VERSION = 2
# A front door only produces events (STYLE.md, habit 1); these are serve's world.
NOT_FOR_THE_TAP = (
    "asyncssh",
    "cryptography",
    "bcrypt",
    "sftpgate.passwords",
    "sftpgate.gateway",
    "sftpgate.frontdoor",
    "sftpgate.journal",
    "sftpgate.jobs",
    "sftpgate.pipeline",
    "sftpgate.cli.serve",
)


def subsystem_config(tmp: Path) -> Path:
    """What packaging/openssh/subsystem.yaml holds, pointed at this test's folders."""
    _, sftp_server = need_sshd()
    (tmp / "spool").mkdir()
    path = tmp / "subsystem.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "subsystem": {
                    "sftp_server": sftp_server,
                    "socket": str(tmp / "no-daemon.sock"),
                    "spool_dir": str(tmp / "spool"),
                    "ack_timeout": 0.2,
                },
                "pipeline": {"temp_patterns": ["*.filepart", "*.part", "*.tmp"]},
            }
        )
    )
    return path


def handshake(config: Path) -> tuple[bytes, set[str], str]:
    """Run one SFTP INIT through `sftpgate subsystem`; return the reply, modules imported, stderr.

    stdin stays open until the reply is in: sftp-server quits at EOF without
    flushing what it has not written yet.
    """
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.Popen(
        [SFTPGATE, "subsystem", "--config", str(config), "--", "-e"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(SSH_FXP_INIT)
        proc.stdin.flush()
        length = int.from_bytes(proc.stdout.read(4), "big")
        reply = proc.stdout.read(length)
        proc.stdin.close()
        err = proc.stderr.read()  # to EOF: the tap and sftp-server have ended
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    stderr = err.decode(errors="replace")
    assert proc.returncode == 0, stderr[-2000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "sftpgate.cli.main" in modules  # the importtime report is really there
    return reply, modules, stderr


def unwanted(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith(NOT_FOR_THE_TAP))


def test_subsystem_session_never_imports_asyncssh_or_serve_modules(tmp_path: Path) -> None:
    reply, modules, _ = handshake(subsystem_config(tmp_path))
    assert reply[0] == SSH_FXP_VERSION  # sftp-server answered through the relay
    assert "sftpgate.subsystem.tap" in modules
    assert unwanted(modules) == []


def test_unreadable_config_runs_sftp_server_untapped_without_importing_asyncssh(
    tmp_path: Path,
) -> None:
    reply, modules, stderr = handshake(tmp_path / "missing.yaml")
    assert reply[0] == SSH_FXP_VERSION
    # sshd relays the subsystem's stderr to the client: the config's path and
    # problem go to the system log instead (see the test below).
    assert "missing.yaml" not in stderr and "without the journal" not in stderr
    assert "sftpgate.subsystem.tap" not in modules
    assert unwanted(modules) == []


def test_the_reason_for_running_untapped_goes_to_the_system_log(tmp_path: Path) -> None:
    import socket

    from sftpgate.cli.subsystem import tell_the_admin

    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
        log.bind(address)
        log.settimeout(5)
        tell_the_admin("sftpgate subsystem: /etc/x.yaml: users: bad", address)
        assert b"/etc/x.yaml: users: bad" in log.recv(4096)
    tell_the_admin("nobody listens", str(tmp_path / "none"))  # silent, no error
