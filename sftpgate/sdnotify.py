"""systemd's notify protocol (``sd_notify(3)``) without a dependency.

A unit with ``Type=notify`` sets ``$NOTIFY_SOCKET`` (a Unix datagram socket,
``@name`` for the abstract namespace); each message is one datagram of
``KEY=value`` lines. Outside systemd the variable is unset and every call here
does nothing.

:meth:`Notifier.from_environ` takes ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID`` out of the environment (as ``sd_notify(unset_environment=1)``
does), so no child — a gateway process of the supervisor, ffmpeg — inherits
them: the unit keeps ``NotifyAccess=main`` and only the process systemd started
speaks for the service.

A send never blocks the event loop: the socket is non-blocking and a datagram
that cannot go at once (systemd's queue full, the socket gone) is dropped and
logged once; the next status or ping carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock ``MONOTONIC_USEC=`` is read on."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def address_of(value: str) -> str | None:
    """The socket address ``NOTIFY_SOCKET`` names: a path, or ``@name`` for the abstract
    namespace (a leading NUL). None for what we cannot reach (``vsock:``, relative). Pure."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Tells systemd how the service is doing; a no-op when ``address`` is None."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address is not None else None
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd asked for, taking its variables out of ``environ``
        (``os.environ`` by default). A watchdog meant for another process
        (``WATCHDOG_PID``) is not ours."""
        env = os.environ if environ is None else environ
        raw = env.pop("NOTIFY_SOCKET", "")
        usec_text = env.pop("WATCHDOG_USEC", "")
        watchdog_pid = env.pop("WATCHDOG_PID", "")
        address = address_of(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r: not a socket this process can reach; ignored", raw)
        usec: int | None = None
        if usec_text.isdigit() and int(usec_text) > 0:
            usec = int(usec_text)
            if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
                usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half the unit's ``WatchdogSec=``."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines; True if it went. Never blocks, never raises."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify: cannot tell systemd (%s); will keep trying", exc)
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = "reloading the config") -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    async def watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping ``WATCHDOG=1`` every half ``WatchdogSec`` while ``healthy()``; returns at once
        without a watchdog. It runs on the event loop it proves alive: a loop blocked (or a
        process stopped) sends nothing, and systemd, after ``WatchdogSec``, kills and
        restarts the service."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            if healthy():
                self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    # One line: a newline would start a new KEY=value.
    return [] if text is None else ["STATUS=" + " ".join(text.split())]
