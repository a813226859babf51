"""``sftpgate serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Callable

from ..config import check_homes, load_config
from ..errors import ConfigError, SftpgateError
from ..gateway import Gateway
from ..lifecycle import FORCE_LIMIT, Lifecycle, keep_status, plural
from ..logsetup import announce, setup_logging
from ..sdnotify import Notifier
from .common import config_from

HELP = "Run the SFTP gateway (SSH server offering SFTP only) and journal what users do."

log = logging.getLogger("sftpgate")

# A supervisor's child says "alive" this often; a forced stop of a child ends it this soon
# (before the supervisor's own FORCE_LIMIT, so the supervisor sees it go).
CHILD_BEAT = 1.0
CHILD_FORCE_LIMIT = 1.0


def register(parser: argparse.ArgumentParser) -> None:
    # Set by the supervisor (server.processes > 1) on the gateway processes it starts:
    # which one this is, and the pipe to say "listening" on. Not for people.
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    problems = check_homes(config)
    if problems:
        raise ConfigError("; ".join(problems))
    setup_logging(config.log.level, config.log.json, node=config.server.node)
    child: int | None = args.child
    # Out of the environment at once: no child process (gateway, ffmpeg) inherits it.
    notifier = Notifier.from_environ()
    if child is None and config.server.processes > 1:
        from ..supervisor import Supervisor  # only when supervising

        return asyncio.run(Supervisor(args.config, config, notifier).run())
    gateway = Gateway(
        config,
        reuse_port=child is not None,
        embedded_workers=child is None,  # the supervisor runs them
        tap=child in (None, 0),  # one process serves the tap's socket
    )
    return asyncio.run(_serve(args.config, gateway, child, args.ready_fd, notifier))


async def _serve(
    config_file: str,
    gateway: Gateway,
    child: int | None = None,
    ready_fd: int | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain (see :mod:`sftpgate.lifecycle`); the exit code.

    A supervisor's child (``ready_fd``) tells the supervisor on that pipe, one line each:
    ``ready`` once listening, ``alive`` every CHILD_BEAT seconds from its event loop,
    ``reloaded`` after each SIGHUP. It never talks to systemd; the supervisor does.
    """
    notifier = notifier or Notifier()
    life = Lifecycle(notifier, force_limit=CHILD_FORCE_LIMIT if child is not None else FORCE_LIMIT)
    pipe = ChildPipe(ready_fd) if ready_fd is not None else None

    def reload() -> None:
        # SIGHUP: users, rules, pipeline, email and SMTP settings from one re-read file.
        notifier.reloading()
        try:
            gateway.reload(load_config(config_file))
        except ConfigError as exc:
            log.error("reload refused, keeping the old config: %s", exc)
        if pipe is not None:
            pipe.say(b"reloaded")
        notifier.ready(serving(gateway))

    life.install(reload, sigint=child is None)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.stop()
        raise SftpgateError(
            f"cannot listen on {gateway.config.server.listen}:"
            f"{gateway.config.server.port}: {exc.strerror or exc}"
        ) from None
    background: list[asyncio.Task[None]] = []
    if pipe is not None:
        # The supervisor prints the one "listening" line once every process is up.
        pipe.say(b"ready")
        background.append(asyncio.create_task(pipe.beat()))
    else:
        announce(f"sftpgate: listening on {gateway.config.server.listen}:{gateway.port}")
        notifier.ready(serving(gateway))
        background.append(asyncio.create_task(notifier.watchdog()))
    # What STATUS= says (under systemd): serving, then the drain's count.
    status: list[Callable[[], str]] = [lambda: serving(gateway)]
    background.append(asyncio.create_task(keep_status(notifier, lambda: status[0]())))
    try:
        await life.stop.wait()
        await _drain(gateway, life, child, status)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if pipe is not None:
            pipe.close()
        life.done()
    return life.exit_code


async def _drain(
    gateway: Gateway, life: Lifecycle, child: int | None, status: list[Callable[[], str]]
) -> None:
    """First signal: no new connections, jobs released, sessions go on up to
    ``server.drain_timeout``; then what is left is disconnected and all is flushed."""
    timeout = gateway.config.server.drain_timeout
    loop = asyncio.get_running_loop()
    until = time.strftime("%H:%M:%S", time.localtime(time.time() + timeout))
    which = f" (process {child})" if child is not None else ""

    def draining() -> str:
        return f"draining: {plural(gateway.sessions, 'session')} left; the rest cut at {until}"

    status[0] = draining
    life.notifier.stopping(draining())
    await gateway.stop_accepting()
    log.info(
        "stopping%s: no new connections; %s may finish for %.0f s",
        which,
        plural(gateway.sessions, "open session"),
        timeout,
    )
    await gateway.stop_workers()
    started = loop.time()
    while not await gateway.drain(min(1.0, timeout - (loop.time() - started)), life.force):
        if life.force.is_set() or loop.time() - started >= timeout:
            break
    if life.force.is_set():
        why = "stopping at once (second signal)"
    elif gateway.sessions:
        why = f"server.drain_timeout ({timeout:g} s) passed"
    else:
        why = ""
    if gateway.sessions:
        log.warning("stopping%s: %s; %s cut", which, why, plural(gateway.sessions, "session"))
    else:
        log.info("stopping%s: every session ended", which)
    status[0] = lambda: "stopping: flushing the journal"
    await gateway.stop(close_timeout=0.5 if life.force.is_set() else 5.0, why=why)
    log.info("stopped%s", which)


def serving(gateway: Gateway) -> str:
    return (
        f"serving: {plural(gateway.sessions, 'session')}, "
        f"{plural(gateway.jobs_running, 'job')} running"
    )


class ChildPipe:
    """A supervisor's child's side of its pipe: one short line per message, never
    blocking (a full pipe drops a beat; a supervisor gone is no error)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        os.set_blocking(fd, False)

    def say(self, word: bytes) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, word + b"\n")
        except BlockingIOError:
            pass
        except OSError:  # the supervisor is gone
            self.close()

    async def beat(self) -> None:
        """``alive`` from the event loop every CHILD_BEAT: a blocked loop goes silent."""
        while self.fd is not None:
            await asyncio.sleep(CHILD_BEAT)
            self.say(b"alive")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
