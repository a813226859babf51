"""Signals of a long-running command: first SIGTERM drains, second forces, SIGHUP reloads.

Shared by ``sftpgate serve`` (one process or a supervisor's child),
the supervisor and ``sftpgate worker`` (rq's model: a warm shutdown, then a
cold one). The first SIGTERM or SIGINT sets :attr:`Lifecycle.stop`; the
command drains. A second one sets :attr:`Lifecycle.force`: the command cuts
what is left and flushes the journal, and a timer thread ends the process
with ``os._exit`` after ``force_limit`` seconds whatever it is doing (a
thread, so a blocked event loop or a hung file call cannot hold it). The exit
status of a forced stop is 128 + the signal (143 for SIGTERM, 130 for
SIGINT), as a shell reports a process ended by that signal; a drain exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

from .sdnotify import Notifier

log = logging.getLogger(__name__)

# A forced stop ends the process this long after the second signal, at the latest.
FORCE_LIMIT = 1.5
# How often STATUS= is refreshed for `systemctl status` (only under systemd).
STATUS_INTERVAL = 2.0


class Lifecycle:
    """The stop and force events a command waits on, and its exit status."""

    def __init__(self, notifier: Notifier | None = None, force_limit: float = FORCE_LIMIT) -> None:
        self.notifier = notifier or Notifier()
        self.force_limit = force_limit
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.exit_code = 0
        self._timer: threading.Timer | None = None
        self.on_force: Callable[[], None] | None = None

    def install(self, reload: Callable[[], None] | None = None, *, sigint: bool = True) -> None:
        """Handle SIGTERM (and SIGINT unless ``sigint`` is False: a supervisor's child
        ignores it, the terminal's Ctrl-C reaches the supervisor, which forwards one
        SIGTERM) and SIGHUP (``reload``) on the running loop."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.signalled, signal.SIGTERM)
        if sigint:
            loop.add_signal_handler(signal.SIGINT, self.signalled, signal.SIGINT)
        else:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload)

    def signalled(self, signum: int) -> None:
        """First call: drain. Second: force, and arm the timer that ends the process."""
        name = signal.Signals(signum).name
        if not self.stop.is_set():
            log.info("%s: draining (a second %s stops at once)", name, name)
            self.stop.set()
            return
        if self.force.is_set():
            return
        log.warning("second %s: stopping now", name)
        self.exit_code = 128 + signum
        self.force.set()
        self._timer = threading.Timer(self.force_limit, self._exit_now)
        self._timer.daemon = True
        self._timer.start()
        if self.on_force is not None:
            self.on_force()

    def _exit_now(self) -> None:
        # Still running force_limit seconds after the second signal: what was committed
        # stays; what was not is lost anyway (SIGKILL would do the same).
        with contextlib.suppress(Exception):
            log.error("forced stop still running after %.1f s: exiting", self.force_limit)
        os._exit(self.exit_code)

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def keep_status(notifier: Notifier, text: Callable[[], str]) -> None:
    """Send ``STATUS=`` whenever ``text()`` changes (checked every STATUS_INTERVAL)."""
    if not notifier.enabled:
        return
    last = ""
    while True:
        now = text()
        if now != last:
            notifier.status(now)
            last = now
        await asyncio.sleep(STATUS_INTERVAL)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
