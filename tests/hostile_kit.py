"""Shared parts of the hostile-input tests: attackers from their own addresses, a bystander.

Loopback has all of 127.0.0.0/8: an attacker connects *from* 127.0.0.2 (or
any other) so that a ban or a per-address limit hits it and not the
bystander, who connects from 127.0.0.1 like every other test client.

:class:`Bystander` is a well-behaved customer working through an attack: every
``interval`` seconds a fresh login, an upload of a small file, its download
and a check of its bytes. ``check()`` fails the test if any round failed, if
one took longer than the bound, or if too few rounds ran.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import paramiko


def connect_from(
    source: str, port: int, host: str = "127.0.0.1", timeout: float = 10
) -> socket.socket:
    """A TCP connection to the gateway whose source address is ``source`` (127.x.y.z)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def login_from(
    source: str, port: int, login: str, password: str, timeout: float = 10
) -> paramiko.Transport:
    """A paramiko transport logged in with a password, from ``source``."""
    t = paramiko.Transport(connect_from(source, port, timeout=timeout))
    t.banner_timeout = timeout
    t.auth_timeout = timeout
    t.connect(username=login, password=password)
    return t


def open_fds(pid: int | None = None) -> int:
    """How many descriptors a process holds (this one by default)."""
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


@dataclass
class Round:
    started: float
    took: float
    error: str | None = None


@dataclass
class Bystander:
    """A customer uploading and downloading every ``interval`` s while a test attacks.

    ``connect`` returns a logged-in transport (the default: a password login
    from 127.0.0.1 as ``login``). Use as a context manager around the attack.
    """

    port: int
    login: str
    password: str
    interval: float = 0.5
    size: int = 4096
    connect: Callable[[], paramiko.Transport] | None = None
    clock: Callable[[], float] = time.monotonic
    rounds: list[Round] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Bystander:
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _transport(self) -> paramiko.Transport:
        if self.connect is not None:
            return self.connect()
        return login_from("127.0.0.1", self.port, self.login, self.password)

    def _one(self, n: int) -> None:
        payload = os.urandom(self.size)
        t = self._transport()
        try:
            sftp = paramiko.SFTPClient.from_transport(t)
            assert sftp is not None
            name = f"bystander-{n}.bin"
            with sftp.open(name, "wb") as f:
                f.write(payload)
            with sftp.open(name, "rb") as f:
                got = f.read()
            if got != payload:
                raise AssertionError(f"{name}: downloaded bytes differ")
            sftp.remove(name)
            sftp.close()
        finally:
            t.close()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            started = self.clock()
            error = None
            try:
                self._one(n)
            except Exception as exc:  # recorded; check() fails the test with it
                error = f"{type(exc).__name__}: {exc}"
            took = self.clock() - started
            self.rounds.append(Round(started, took, error))
            n += 1
            self._stop.wait(max(0.0, self.interval - took))

    def check(self, *, most: float = 2.0, at_least: int = 2) -> None:
        """No round failed, none took over ``most`` seconds, at least ``at_least`` ran."""
        failed = [r for r in self.rounds if r.error is not None]
        assert not failed, f"the bystander failed: {failed[:3]}"
        assert len(self.rounds) >= at_least, f"only {len(self.rounds)} bystander rounds"
        slowest = max(r.took for r in self.rounds)
        assert slowest <= most, f"a bystander round took {slowest:.2f} s (bound {most} s)"
