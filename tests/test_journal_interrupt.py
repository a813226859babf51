"""Ctrl-C to ``sftpgate journal``, a real process: a follow ends with 0 (that is how a follow
stops); a listing cut short ends with 130, as docs/cli.md says of any command interrupted."""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import write_config
from sftpgate.config import load_config
from sftpgate.events import Event, Op, SessionInfo
from sftpgate.storage import open_backend

ROWS = 400  # well over a 4 KiB pipe of JSON lines


def _journal(tmp_path: Path, user_keys: dict[str, Path]) -> Path:
    config = write_config(tmp_path, user_keys)
    session = SessionInfo(id="s1", remote_addr="192.0.2.7", remote_port=1, login="alice")
    journal = open_backend(load_config(config)).journal()
    try:
        journal.record_batch(
            [Event(Op.LOGIN, session)]
            + [Event(Op.MKDIR, session, path=f"/dir-{n:04d}") for n in range(ROWS)]
        )
    finally:
        journal.close()
    return config


def _wait_blocked_on_pipe(pid: int, timeout: float = 30) -> None:
    """Until the process sleeps in a write to its (full, unread) stdout pipe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # "pipe_write", or "anon_pipe_write" on newer kernels
        if "pipe_write" in Path(f"/proc/{pid}/wchan").read_text():
            return
        time.sleep(0.02)
    raise AssertionError("the listing never filled its pipe")


def test_ctrl_c_cuts_a_listing_short_with_130(tmp_path: Path, user_keys: dict[str, Path]) -> None:
    config = _journal(tmp_path, user_keys)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftpgate", "journal", "-c", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        _wait_blocked_on_pipe(proc.pid)
        proc.send_signal(signal.SIGINT)
        proc.stdout.read()  # let it go on, if it would
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert "Traceback" not in err


def test_ctrl_c_ends_a_follow_with_0(tmp_path: Path, user_keys: dict[str, Path]) -> None:
    config = _journal(tmp_path, user_keys)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftpgate", "journal", "-c", str(config), "--json", "--follow"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        rows = [json.loads(proc.stdout.readline()) for _ in range(ROWS + 1)]
        assert rows[-1]["path"] == f"/dir-{ROWS - 1:04d}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
