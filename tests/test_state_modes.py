"""Private state: journal (+ WAL/SHM), host keys, spool files and their folders, under umask 022.

Everything is started through its real entry point (`sftpgate serve`, the
tap's event sender) with the umask most systems give a service, and every
file and folder of the state and host key folders is stat'ed afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from test_serve_process import ServeProcess

from conftest import PASSWORDS, free_port, write_config
from sftpgate.events import Event, Op, SessionInfo
from sftpgate.journal.store import connect
from sftpgate.subsystem.sender import EventSender


@pytest.fixture
def umask_022() -> Iterator[None]:
    # For what this process creates itself (the sender test); restored after.
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(*folders: Path) -> dict[str, int]:
    """Mode bits of each folder and everything beneath it, by path."""
    found: dict[str, int] = {}
    for top in folders:
        found[str(top)] = stat.S_IMODE(top.lstat().st_mode)
        for path in top.rglob("*"):
            found[str(path)] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(*folders: Path) -> None:
    wrong = {
        path: oct(mode)
        for path, mode in modes(*folders).items()
        if mode != (0o700 if Path(path).is_dir() else 0o600)
    }
    assert not wrong, f"not 0700 folders / 0600 files: {wrong}"


def upload(port: int, name: str = "hello.txt") -> None:
    t = paramiko.Transport(("127.0.0.1", port))
    try:
        t.connect(username="alice", password=PASSWORDS["alice"])
        client = paramiko.SFTPClient.from_transport(t)
        assert client is not None
        with client.open(name, "wb") as f:
            f.write(b"x" * 1000)
    finally:
        t.close()


def test_serve_under_umask_022_keeps_journal_wal_shm_and_host_keys_private(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config = write_config(tmp_path, user_keys)
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)}, umask=0o022)
    try:
        upload(port)
        state = tmp_path / "state"
        journal = state / "journal.sqlite3"
        deadline = time.monotonic() + 10
        while not Path(f"{journal}-wal").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Checked while serving: the WAL and the shared memory exist only now.
        names = {p.name for p in state.iterdir()}
        assert {"journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"} <= names
        assert_private(state, tmp_path / "hostkeys")
        assert len(list((tmp_path / "hostkeys").iterdir())) == 4
    finally:
        assert serve.stop() == 0
    assert_private(tmp_path / "state", tmp_path / "hostkeys")


def test_serve_tightens_state_left_open_by_an_older_version_and_says_so(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config = write_config(tmp_path, user_keys)
    port = free_port()
    # What earlier versions left under umask 022: everything readable by all.
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)}, umask=0o022)
    upload(port)
    assert serve.stop() == 0
    state, keys = tmp_path / "state", tmp_path / "hostkeys"
    for folder in (state, keys):
        folder.chmod(0o755)
        for path in folder.iterdir():
            path.chmod(0o644)
    # A reader holding the journal open: SQLite makes its WAL and shared
    # memory with the database file's mode (0644 now) and keeps them there.
    conn = sqlite3.connect(state / "journal.sqlite3")
    try:
        conn.execute("SELECT count(*) FROM sessions").fetchone()
        wal = state / "journal.sqlite3-wal"
        assert stat.S_IMODE(wal.stat().st_mode) == 0o644
        serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)}, umask=0o022)
        try:
            upload(port, "again.txt")
            assert_private(state, keys)
        finally:
            assert serve.stop() == 0
    finally:
        conn.close()
    log = "".join(serve.lines)
    for path in (state, state / "journal.sqlite3", wal, keys, keys / "ssh_host_ed25519_key"):
        assert f"{path} was mode 0" in log, log


def test_tap_spool_file_is_0600_under_umask_022_and_never_one_planted_there(
    tmp_path: Path, umask_022: None
) -> None:
    session = SessionInfo(id="feedbeef", remote_addr="127.0.0.1", remote_port=1, login="alice")
    event = Event(Op.CLOSE, session, path="/a.mp4", bytes_written=1)
    sender = EventSender(tmp_path / "nobody.sock", tmp_path, session.id, ack_timeout=0.1)
    sender.send(event)
    sender.close()
    (spool,) = tmp_path.glob("*.jsonl")
    assert stat.S_IMODE(spool.stat().st_mode) == 0o600

    # A file already at a session's spool name (world-readable) is not written to.
    planted = tmp_path / f"{os.getuid()}-cafe0001.jsonl"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    sender = EventSender(tmp_path / "nobody.sock", tmp_path, "cafe0001", ack_timeout=0.1)
    sender.send(event)
    sender.close()
    assert planted.read_bytes() == b""


def test_opening_the_journal_again_keeps_the_locks_this_process_holds(tmp_path: Path) -> None:
    # Closing any descriptor of a file drops every POSIX lock the process holds
    # on it: the mode check must not open the journal (or its -shm) SQLite uses.
    path = tmp_path / "journal.sqlite3"
    first = connect(path)
    first.execute("BEGIN IMMEDIATE")  # the write lock, in the -shm (WAL mode)
    try:
        connect(path).close()  # e.g. the job store opening after the writer
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0);"
                " c.execute('BEGIN IMMEDIATE')",
                str(path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert other.returncode != 0 and "database is locked" in other.stderr, other
    finally:
        first.execute("ROLLBACK")
        first.close()
