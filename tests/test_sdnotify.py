"""sd_notify: what systemd hears from real `sftpgate serve` / `sftpgate worker` processes.

The test plays systemd's part: it binds a Unix datagram socket, passes it as
NOTIFY_SOCKET (and WATCHDOG_USEC), and reads each datagram with the sender's
pid (SO_PASSCRED), so it can tell the supervisor from its children.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_leases import WorkerProcess
from test_serve_process import ServeProcess

from conftest import write_config
from sftpgate.sdnotify import Notifier, address_of

WATCHDOG_USEC = 400_000  # pings every 0.2 s


@dataclass
class Message:
    pid: int
    at: float
    fields: dict[str, str]


class NotifySocket:
    """systemd's end: every datagram, with the pid that sent it."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:  # the abstract namespace, as systemd itself uses for some units
            name = f"sftpgate-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        space = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, space)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append(Message(pid, time.monotonic(), fields))

    def env(self, watchdog: bool = True) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.env_value}
        if watchdog:
            env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        return env

    def seen(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def wait(
        self, predicate: Callable[[Message], bool], after: int = 0, timeout: float = 30
    ) -> tuple[int, Message]:
        """The first message from index ``after`` on that matches; its index and itself."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, message in enumerate(self.seen()[after:], after):
                if predicate(message):
                    return index, message
            time.sleep(0.02)
        raise AssertionError(f"no such message; saw {[m.fields for m in self.seen()]}")

    def close(self) -> None:
        self._closed = True
        self._reader.join(5)
        self.sock.close()


def has(key: str, value: str = "1") -> Callable[[Message], bool]:
    return lambda m: m.fields.get(key) == value


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


# -- the module on its own -----------------------------------------------------------


def test_notify_socket_addresses_path_abstract_and_refused() -> None:
    assert address_of("/run/systemd/notify") == "/run/systemd/notify"
    assert address_of("@abstract/name") == "\0abstract/name"
    assert address_of("vsock:2:1234") is None
    assert address_of("relative/path") is None
    assert address_of("@") is None


def test_from_environ_takes_the_variables_out_and_ignores_anothers_watchdog() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1", "A": "b"}
    notifier = Notifier.from_environ(env, pid=1)
    assert env == {"A": "b"}  # children never inherit them
    assert notifier.enabled and notifier.watchdog_interval == 15.0
    theirs = Notifier.from_environ(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "2"}, pid=1
    )
    assert theirs.enabled and theirs.watchdog_interval is None
    unset = Notifier.from_environ({})
    assert not unset.enabled and not unset.ready() and unset.watchdog_interval is None


def test_a_send_to_a_socket_gone_never_raises_and_status_is_one_line(tmp_path: Path) -> None:
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert gone.ready("x") is False  # logged once, never raised
    gone.close()
    sock = NotifySocket(tmp_path / "notify")
    try:
        notifier = Notifier(sock.env_value)
        assert notifier.status("two\nlines")
        _, message = sock.wait(lambda m: "STATUS" in m.fields)
        assert message.fields == {"STATUS": "two lines"}
        assert message.pid == os.getpid()
        notifier.close()
    finally:
        sock.close()


def test_a_blocked_event_loop_stops_the_watchdog_pings(notify: NotifySocket) -> None:
    """The pings come from a task on the loop: while the loop is blocked, none goes."""
    notifier = Notifier(address_of(notify.env_value), WATCHDOG_USEC)

    async def main() -> tuple[float, float]:
        task = asyncio.create_task(notifier.watchdog())
        await asyncio.sleep(0.7)
        blocked_at = time.monotonic()
        time.sleep(1.5)  # the loop blocked: what a hung handler would do
        resumed_at = time.monotonic()
        await asyncio.sleep(0.7)
        task.cancel()
        return blocked_at, resumed_at

    try:
        blocked_at, resumed_at = asyncio.run(main())
    finally:
        notifier.close()
    pings = [m.at for m in notify.seen() if m.fields.get("WATCHDOG") == "1"]
    before = [t for t in pings if t < blocked_at]
    during = [t for t in pings if blocked_at + 0.05 < t < resumed_at - 0.05]
    after = [t for t in pings if t > resumed_at]
    assert len(before) >= 2 and len(after) >= 2, pings
    assert during == [], "a ping went while the loop was blocked"


# -- real processes ------------------------------------------------------------------


def test_serve_says_ready_reloading_ready_stopping_and_pings_the_watchdog(
    tmp_path: Path, user_keys: dict[str, Path], notify: NotifySocket
) -> None:
    config = write_config(tmp_path, user_keys)
    serve = ServeProcess(config, notify.env())
    pid = serve.proc.pid
    try:
        _, ready = notify.wait(has("READY"))
        assert ready.pid == pid and ready.fields["STATUS"].startswith("serving: 0 sessions")
        first, _ = notify.wait(has("WATCHDOG"))
        notify.wait(has("WATCHDOG"), after=first + 1)  # pings keep coming

        mark = len(notify.seen())
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        serve.proc.send_signal(signal.SIGHUP)
        at, reloading = notify.wait(has("RELOADING"), after=mark)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        # systemd compares MONOTONIC_USEC with its own clock: it must be that clock.
        assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
        notify.wait(has("READY"), after=at + 1)

        # SIGSTOP: no pings while stopped; they resume after SIGCONT.
        serve.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # let a ping already in flight arrive before counting
        stopped_at = len(notify.seen())
        stopped = time.monotonic()
        while time.monotonic() - stopped < 1.2:  # six ping intervals
            time.sleep(0.1)
        assert not [m for m in notify.seen()[stopped_at:] if m.fields.get("WATCHDOG")]
        serve.proc.send_signal(signal.SIGCONT)
        notify.wait(has("WATCHDOG"), after=stopped_at)

        mark = len(notify.seen())
        serve.proc.send_signal(signal.SIGTERM)
        _, stopping = notify.wait(has("STOPPING"), after=mark)
        assert stopping.fields["STATUS"].startswith("draining: 0 sessions")
        assert serve.proc.wait(30) == 0
    finally:
        if serve.proc.poll() is None:
            serve.proc.send_signal(signal.SIGCONT)
        serve.stop()  # also closes its stderr
    assert {m.pid for m in notify.seen()} == {pid}


def test_supervisor_alone_speaks_ready_after_every_child_and_restarts_a_hung_one(
    tmp_path: Path, user_keys: dict[str, Path], notify: NotifySocket
) -> None:
    config = write_config(tmp_path, user_keys, {"server": {"processes": 2}})
    # A 3 s watchdog: a child silent that long is hung (each says "alive" every second).
    env = {"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "3000000"}
    serve = ServeProcess(config, env)
    pid = serve.proc.pid
    try:
        # READY only after the "listening" line, which the supervisor prints once both
        # children listen.
        assert any("(2 processes)" in line for line in serve.lines)
        _, ready = notify.wait(has("READY"))
        assert ready.fields["STATUS"] == "serving: 2 gateway processes, 0 jobs running"
        notify.wait(has("WATCHDOG"))

        children = gateway_children(pid)
        assert len(children) == 2
        mark = len(notify.seen())
        serve.proc.send_signal(signal.SIGHUP)
        at, _ = notify.wait(has("RELOADING"), after=mark)
        notify.wait(has("READY"), after=at + 1)
        assert sum("reloaded" in line for line in serve.lines) >= 2

        # A child frozen (its loop cannot say "alive"): killed and restarted; the
        # supervisor keeps pinging systemd all along.
        hung = children[0]
        os.kill(hung, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            f"(pid {hung}) silent" in line for line in serve.lines
        ):
            time.sleep(0.1)
        assert any(f"(pid {hung}) silent" in line for line in serve.lines), serve.lines
        while time.monotonic() < deadline and len(gateway_children(pid)) < 2:
            time.sleep(0.1)
        assert hung not in gateway_children(pid) and len(gateway_children(pid)) == 2

        mark = len(notify.seen())
        serve.proc.send_signal(signal.SIGTERM)
        notify.wait(has("STOPPING"), after=mark)
        assert serve.proc.wait(30) == 0
    finally:
        serve.stop()  # also closes its stderr
    assert {m.pid for m in notify.seen()} == {pid}, "a child talked to NOTIFY_SOCKET"


def test_worker_says_ready_reloading_ready_stopping(
    tmp_path: Path,
    user_keys: dict[str, Path],
    notify: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = write_config(tmp_path, user_keys, {"pipeline": {"enabled": True}})
    data = yaml.safe_load(config.read_text())
    data["jobs"] = {"workers": 1, "poll_interval": 0.2}
    config.write_text(yaml.safe_dump(data))
    # The worker needs the schema; an install makes it with `sftpgate db migrate`.
    subprocess.run(
        [sys.executable, "-m", "sftpgate", "db", "migrate", "--config", str(config)],
        check=True,
        capture_output=True,
    )
    for name, value in notify.env().items():
        monkeypatch.setenv(name, value)  # WorkerProcess passes this process's environment
    worker = WorkerProcess(config)
    try:
        _, ready = notify.wait(has("READY"))
        assert ready.pid == worker.proc.pid
        assert ready.fields["STATUS"] == "1 worker, 0 jobs running"
        notify.wait(has("WATCHDOG"))
        mark = len(notify.seen())
        worker.proc.send_signal(signal.SIGHUP)
        at, _ = notify.wait(has("RELOADING"), after=mark)
        notify.wait(has("READY"), after=at + 1)
        mark = len(notify.seen())
        worker.proc.send_signal(signal.SIGTERM)
        notify.wait(has("STOPPING"), after=mark)
        assert worker.proc.wait(30) == 0
    finally:
        worker.kill()


def gateway_children(pid: int) -> list[int]:
    """The gateway processes of supervisor ``pid`` (its direct children running serve)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and b"--child" in cmdline and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)
