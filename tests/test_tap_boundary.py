"""A local user who attacks the tap socket slows only themself; `serve` uploads go on.

Real parts only: a gateway (`serve`, its journal writer, the tap daemon on its
Unix socket) in this process, a real unprivileged system user (``useradd``)
whose processes fuzz and flood the socket, and paramiko uploading as another
user through `serve` meanwhile. The daemon knows the attacker by SO_PEERCRED.
"""

from __future__ import annotations

import io
import json
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import PASSWORDS, LoopThread, RunningGateway
from sftpgate.config import load_config
from sftpgate.events import Event, Op, SessionInfo
from sftpgate.gateway import Gateway
from sftpgate.passwords import hash_password
from sftpgate.subsystem import daemon as daemon_module
from sftpgate.subsystem.wire import MAX_LINE
from sshd_kit import TestUser, UserFactory, need_root
from sshd_kit import make_user as make_user
from sshd_kit import shared_dir as shared_dir

# Runs as the attacker. "relay": frames from stdin (4-byte length + bytes) go to
# the socket, "ok" after each; a connection the daemon cuts off is replaced.
# "flood": CONNECTIONS threads send a block of lines in a loop, forever.
ATTACKER = r"""
import socket, struct, sys, threading, time

path, mode = sys.argv[1], sys.argv[2]

def drain(s):
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass

def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    threading.Thread(target=drain, args=(s,), daemon=True).start()
    return s

if mode == "relay":
    s = connect()
    inp = sys.stdin.buffer
    while (head := inp.read(4)) and len(head) == 4:
        data = inp.read(struct.unpack(">I", head)[0])
        for _ in range(2):
            try:
                s.sendall(data)
                break
            except OSError:
                s.close()
                s = connect()
        sys.stdout.write("ok\n")
        sys.stdout.flush()
else:
    block = open(sys.argv[3], "rb").read()

    def blast():
        while True:
            try:
                s = connect()
                while True:
                    s.sendall(block)
            except OSError:
                s.close()
                time.sleep(0.01)  # cut off (over the connection limit): come back

    for _ in range(int(sys.argv[4])):
        threading.Thread(target=blast, daemon=True).start()
    threading.Event().wait()
"""

FLOOD_CONNECTIONS = daemon_module.MAX_CONNECTIONS_PER_UID + 8
UPLOADS = 5


def site_config(shared: Path, mallory: TestUser) -> Path:
    data: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1",
            "port": 0,
            "state_dir": str(shared / "state"),
            "host_keys_dir": str(shared / "hostkeys"),
            "create_homes": True,
        },
        "journal": {"synchronous": "normal"},
        "pipeline": {"enabled": True},  # uploads of *.mp4 start jobs...
        "jobs": {"workers": 0},  # ...that stay queued: the job rows are what we check
        "subsystem": {
            "enabled": True,
            "socket": str(shared / "run" / "events.sock"),
            "spool_dir": str(shared / "spool"),
            "replay_interval": 600,
        },
        "users": [
            {
                "login": "alice",
                "name": "Alice",
                "surname": "Liddell",
                "email": "alice@example.org",
                "home": str(shared / "serve-homes" / "alice"),
                "password_hash": hash_password(PASSWORDS["alice"], log_n=10),
            },
            {
                "login": mallory.login,
                "name": "Mallory",
                "surname": "Local",
                "email": "mallory@example.org",
                "home": str(mallory.home),
            },
        ],
    }
    path = shared / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def site(shared_dir: Path, make_user: UserFactory) -> Iterator[tuple[RunningGateway, TestUser]]:
    need_root()
    mallory = make_user()
    config = load_config(site_config(shared_dir, mallory), environ={})
    loop = LoopThread()
    gateway = Gateway(config)
    loop.run(gateway.start())
    running = RunningGateway(config, gateway, loop, {})
    try:
        yield running, mallory
    finally:
        running.stop()


def event_data(mallory: TestUser, seq: int, name: str, **changes: Any) -> dict[str, Any]:
    session = SessionInfo(id="f00d", remote_addr="10.0.0.9", remote_port=2222, login=mallory.login)
    event = Event(Op.CLOSE, session, path=f"{mallory.home}/{name}", bytes_written=1)
    data = {f.name: getattr(event, f.name) for f in fields(Event)}
    data.update(op="close", session={f.name: getattr(session, f.name) for f in fields(session)})
    data.update(changes)
    return {"seq": seq, "event": data}


EVENT_FIELDS = [f.name for f in fields(Event)]
SESSION_FIELDS = [f.name for f in fields(SessionInfo)]
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included
    | st.text(max_size=40),  # lone surrogates included
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
HUGE = st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1)


@st.composite
def hostile_lines(draw: st.DrawFn, mallory: TestUser) -> bytes:
    seq = draw(st.integers(min_value=1, max_value=2**53))
    name = draw(st.sampled_from(["a.mp4", "b.txt", "../../etc/passwd", "x.mp4.filepart"]))
    upload = draw(st.sampled_from([None, "complete", "incomplete"]))
    data = event_data(mallory, seq, name, upload=upload, key=f"f00d#{seq}")
    kind = draw(st.sampled_from(["field", "session", "missing", "op", "raw", "long", "valid"]))
    if kind == "field":
        data["event"][draw(st.sampled_from(EVENT_FIELDS))] = draw(JUNK | HUGE)
    elif kind == "session":
        data["event"]["session"][draw(st.sampled_from(SESSION_FIELDS))] = draw(JUNK | HUGE)
    elif kind == "missing":
        del data["event"][draw(st.sampled_from(EVENT_FIELDS))]
    elif kind == "op":
        data["event"]["op"] = draw(st.text(max_size=20) | st.sampled_from(["converted", "x"]))
    elif kind == "raw":  # anything, invalid UTF-8 included
        return draw(st.binary(max_size=300)).replace(b"\n", b" ") + b"\n"
    elif kind == "long":
        return b"[" * draw(st.integers(MAX_LINE, 3 * MAX_LINE)) + b"\n"
    return json.dumps(data).encode() + b"\n"


class Attacker:
    """The attacker's relay process: each frame goes to the daemon's socket as that user."""

    def __init__(self, script: Path, sock: Path, user: TestUser) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(sock), "relay"],
            user=user.uid,
            group=user.gid,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def send(self, frame: bytes) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(struct.pack(">I", len(frame)) + frame)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready and self.proc.stdout.readline() == b"ok\n", "the relay got stuck"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_a_local_user_fuzzing_and_flooding_the_tap_never_stops_serve_uploads(
    site: tuple[RunningGateway, TestUser], shared_dir: Path
) -> None:
    running, mallory = site
    sock = running.config.subsystem.socket
    script = shared_dir / "attacker.py"
    script.write_text(ATTACKER)
    block = shared_dir / "flood.jsonl"
    block.write_bytes(
        b"".join(
            json.dumps(event_data(mallory, seq, f"flood{seq}.txt", op="stat")).encode() + b"\n"
            for seq in range(1, 501)
        )
    )
    for path in (script, block):
        path.chmod(0o644)

    uploaded: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def upload_as_alice() -> None:
        try:
            client = running.sftp("alice")
            for i in range(UPLOADS):
                client.putfo(io.BytesIO(b"v" * 70_000), f"clip{i}.mp4")  # CLOSE waits on its job
                uploaded.append(f"/clip{i}.mp4")
            while not done.is_set():  # and on, for as long as the attack lasts
                name = f"clip{len(uploaded)}.mp4"
                client.putfo(io.BytesIO(b"w" * 1000), name)
                uploaded.append(f"/{name}")
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    flood_started = time.monotonic()
    flood = subprocess.Popen(
        [sys.executable, str(script), str(sock), "flood", str(block), str(FLOOD_CONNECTIONS)],
        user=mallory.uid,
        group=mallory.gid,
    )
    relay = Attacker(script, sock, mallory)
    uploader = threading.Thread(target=upload_as_alice)
    try:
        uploader.start()

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(hostile_lines(mallory))
        def fuzz(line: bytes) -> None:
            relay.send(line)

        fuzz()
    finally:
        done.set()
        uploader.join(60)
        flood.kill()  # our own child, by its pid
        flood.wait(10)
        flood_seconds = time.monotonic() - flood_started
        relay.stop()

    assert failures == [], f"an upload through serve failed: {failures[0]!r}"
    assert len(uploaded) >= UPLOADS
    uploads = running.rows("SELECT path, state, login FROM uploads WHERE login = 'alice'")
    assert [u["path"] for u in uploads] == uploaded  # every reply OK had its row...
    assert {u["state"] for u in uploads} == {"complete"}
    jobs = running.rows("SELECT path, state FROM jobs WHERE login = 'alice' ORDER BY id")
    assert [j["path"] for j in jobs] == uploaded  # ...and its job
    assert {j["state"] for j in jobs} == {"queued"}

    refusals = running.rows("SELECT * FROM operations WHERE status = 'refused'")
    assert refusals and {r["login"] for r in refusals} == {mallory.login}
    assert all(f"(uid {mallory.uid})" in r["message"] for r in refusals)
    assert max(len(r["message"]) for r in refusals) < 500  # no huge value echoed
    # Whatever got in for mallory stayed in mallory's home, and within the rate.
    theirs = running.rows(
        "SELECT path, status FROM operations WHERE login = ? AND status != 'refused'",
        (mallory.login,),
    )
    assert all(r["path"] is None or r["path"].startswith("/") for r in theirs)
    allowed = daemon_module.EVENT_BURST + daemon_module.EVENTS_PER_SECOND * flood_seconds
    assert len(theirs) <= allowed + 50
    # Nothing of theirs was set aside by the writer: the schema stopped it first.
    assert running.rows("SELECT * FROM operations WHERE status = 'journal_error'") == []
