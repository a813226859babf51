"""``server.processes: N``: one supervisor, N gateway processes sharing the port.

One Python process is about one core, so a busy host runs several gateways.
Each child is a plain ``sftpgate serve --child I`` process (started with
fork+exec, never a bare fork of a process that has threads) with its own
listening socket on the same port (``SO_REUSEPORT``: the kernel spreads new
connections over them), its own event loop and its own journal writer (SQLite
WAL; each commit is ``BEGIN IMMEDIATE`` with a 30 s busy timeout, so writers
queue, they do not fail).

The supervisor:

- prepares the state folder, host keys and homes once, before any child
  starts (two children must not both make a host key);
- holds the port: with ``server.port: 0`` it picks one and binds a socket to it
  (``SO_REUSEPORT``, never listening), so a restarted child gets the same port;
- runs the one set of embedded workers (a crashing gateway never takes a
  running ffmpeg with it; jobs committed by any child are found by polling,
  ``jobs.poll_interval``);
- restarts a child that dies, after 1, 2, 4 … 30 s (back to 1 s once a child
  has run a minute);
- forwards SIGHUP (each child reloads; the workers here take the new config)
  and SIGTERM/SIGINT (each child drains; then the workers stop).

Child 0 alone serves the OpenSSH tap's socket (``subsystem.enabled``); while it
restarts, taps spool and replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from .config import Config, load_config, restart_keys_changed
from .errors import ConfigError, SftpgateError
from .events import set_node
from .gateway import prepare_state, start_workers
from .jobs.worker import WorkerPool

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
# A child that ran this long before dying starts again after BACKOFF_FIRST.
STABLE_AFTER = 60.0
READY_TIMEOUT = 120.0


class Supervisor:
    """Starts, watches and stops the gateway processes. ``run()`` returns the exit code."""

    def __init__(self, config_file: str, config: Config) -> None:
        self.config_file = config_file
        self.config = config
        self.count = config.server.processes
        self.workers: WorkerPool | None = None
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = asyncio.Event()
        self._port_hold: socket.socket | None = None
        self._port = config.server.port
        self._tasks: set[asyncio.Task[None]] = set()
        self.api: Any = None  # the admin API (api/): here, never in the children

    async def run(self) -> int:
        cfg = self.config
        set_node(cfg.server.node)
        await asyncio.to_thread(prepare_state, cfg)
        self._hold_port()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            if cfg.journal.enabled and cfg.pipeline.enabled and cfg.jobs.workers > 0:
                # Before the children: the journal exists (and is in WAL mode) when they open it.
                self.workers = await start_workers(cfg)
            if cfg.api.listen is not None:
                from .api import start_api

                self.api = await start_api(lambda: self.config, self._api_reload)
            ready = [asyncio.Event() for _ in range(self.count)]
            watchers = [
                asyncio.create_task(self._keep(index, ready[index])) for index in range(self.count)
            ]
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(event.wait() for event in ready)), READY_TIMEOUT
                )
            except TimeoutError:
                self._stopping.set()
                await asyncio.gather(*watchers, return_exceptions=True)
                raise SftpgateError("the gateway processes did not all start") from None
            print(
                f"sftpgate: listening on {cfg.server.listen}:{self._port} ({self.count} processes)",
                file=sys.stderr,
                flush=True,
            )
            log.info("supervising %d gateway processes (pid %d)", self.count, os.getpid())
            await self._stopping.wait()
            log.info("stopping %d gateway processes", len(self.children))
            await self._stop_api()  # its follows end as the drain starts
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            await self._stop_api()
            if self.workers is not None:
                await self.workers.stop()
                await asyncio.to_thread(self.workers.store.close)
                self.workers = None
            if self._port_hold is not None:
                self._port_hold.close()
        return 0

    def _hold_port(self) -> None:
        """Bind (not listen on) the port with SO_REUSEPORT; pick one if the config says 0."""
        family = socket.AF_INET6 if ":" in self.config.server.listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.config.server.listen, self._port))
        except OSError as exc:
            sock.close()
            raise SftpgateError(
                f"cannot listen on {self.config.server.listen}:{self._port}: {exc.strerror or exc}"
            ) from None
        self._port = sock.getsockname()[1]
        self._port_hold = sock

    async def _keep(self, index: int, ready: asyncio.Event) -> None:
        """Run child ``index`` until stopping; restart it, with backoff, when it dies."""
        delay = BACKOFF_FIRST
        while not self._stopping.is_set():
            started = time.monotonic()
            proc = await self._start(index, ready)
            self.children[index] = proc
            stop = asyncio.create_task(self._stopping.wait())
            done = asyncio.create_task(proc.wait())
            await asyncio.wait({stop, done}, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set():
                stop.cancel()
                await self._stop_child(proc)
                done.cancel()
                break
            stop.cancel()
            code = proc.returncode
            self.children.pop(index, None)
            if time.monotonic() - started >= STABLE_AFTER:
                delay = BACKOFF_FIRST
            log.error(
                "gateway process %d (pid %d) ended with %s; restarting in %.0f s",
                index,
                proc.pid,
                code if code is None or code >= 0 else signal.Signals(-code).name,
                delay,
            )
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _start(self, index: int, ready: asyncio.Event) -> asyncio.subprocess.Process:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, "SFTPGATE_SERVER__PORT": str(self._port)}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sftpgate",
                "serve",
                "--config",
                self.config_file,
                "--child",
                str(index),
                "--ready-fd",
                str(write_fd),
                pass_fds=(write_fd,),
                env=env,
            )
        finally:
            os.close(write_fd)
        task = asyncio.create_task(self._await_ready(read_fd, index, proc.pid, ready))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proc

    async def _await_ready(self, fd: int, index: int, pid: int, ready: asyncio.Event) -> None:
        """The child writes a line once listening (or closes the pipe when it dies first)."""
        try:
            line = await asyncio.to_thread(os.read, fd, 64)
        finally:
            os.close(fd)
        if line.startswith(b"ready"):
            log.info("gateway process %d (pid %d) listening", index, pid)
            ready.set()

    async def _stop_child(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()

    async def _stop_api(self) -> None:
        if self.api is not None:
            api, self.api = self.api, None
            await api.stop()

    async def _api_reload(self, config: Config) -> None:
        """``POST /v1/users/reload``: refuse what SIGHUP would refuse, else reload as it does."""
        changed = restart_keys_changed(self.config, config)
        if changed:
            raise ConfigError(f"{', '.join(changed)}: changed; restart sftpgate to apply it")
        self._reload()

    def _reload(self) -> None:
        """SIGHUP: every child re-reads the file; the workers here take the new config."""
        for proc in list(self.children.values()):
            if proc.returncode is None:
                proc.send_signal(signal.SIGHUP)
        try:
            config = load_config(self.config_file)
            changed = restart_keys_changed(self.config, config)
            if changed:
                raise ConfigError(f"{', '.join(changed)}: changed; restart sftpgate to apply it")
        except ConfigError as exc:
            log.error("reload refused by the supervisor, keeping the old config: %s", exc)
            return
        self.config = config
        if self.workers is not None:
            self.workers.config = config
            self.workers.pipeline.config = config
        log.info("supervisor reloaded %s", config.path)
