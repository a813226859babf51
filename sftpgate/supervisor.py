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
  and SIGTERM/SIGINT (each child drains; the workers here release their jobs at
  once); a second SIGTERM/SIGINT is forwarded too (each child stops at once);
- alone talks to systemd (``sdnotify.py``; the children never see
  ``NOTIFY_SOCKET``): ``READY=1`` once every child listens, ``RELOADING=1`` then
  ``READY=1`` once every child has reloaded, ``STOPPING=1``, and ``WATCHDOG=1``
  from its own event loop while every child is running or being restarted. Each
  child says ``alive`` on its pipe every second from its own loop; with a watchdog
  (``WatchdogSec=``) a child silent that long is hung: it is killed and restarted.

With ``metrics.listen`` the supervisor alone serves ``/metrics``: every process
counts into files of a 0700 folder under the state folder, emptied at start
(prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` inherited by
the children), and a scrape sums them (docs/metrics.md).

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

from . import metrics
from .config import Config, load_config, restart_keys_changed
from .errors import ConfigError, SftpgateError
from .events import set_node
from .gateway import prepare_state, start_workers
from .jobs.worker import WorkerPool
from .lifecycle import Lifecycle, keep_status, plural
from .logsetup import announce
from .metrics_http import MetricsServer, start_listener
from .sdnotify import Notifier

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
# A child that ran this long before dying starts again after BACKOFF_FIRST.
STABLE_AFTER = 60.0
READY_TIMEOUT = 120.0
# How long a SIGHUP waits for every child to say "reloaded" before READY=1 all the same.
RELOAD_TIMEOUT = 30.0
# A forced stop: the children end within their own limit (cli/serve.py), this one after.
FORCE_LIMIT = 1.6


class Supervisor:
    """Starts, watches and stops the gateway processes. ``run()`` returns the exit code."""

    def __init__(self, config_file: str, config: Config, notifier: Notifier | None = None) -> None:
        self.config_file = config_file
        self.config = config
        self.count = config.server.processes
        self.notifier = notifier or Notifier()
        self.workers: WorkerPool | None = None
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self.life = Lifecycle(self.notifier, force_limit=FORCE_LIMIT)
        self._stopping = self.life.stop
        self._port_hold: socket.socket | None = None
        self._port = config.server.port
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics_server: MetricsServer | None = None
        self.api: Any = None  # the admin API (api/): here, never in the children
        self._watchers: list[asyncio.Task[None]] = []
        self._beats: dict[int, float] = {}  # child pid -> when it last said anything
        self._reloads: dict[int, int] = {}  # child index -> "reloaded" lines seen
        self._said = asyncio.Event()  # set at each "reloaded"

    async def run(self) -> int:
        cfg = self.config
        set_node(cfg.server.node)
        await asyncio.to_thread(prepare_state, cfg)
        # Before any child starts: they inherit the folder (PROMETHEUS_MULTIPROC_DIR).
        await asyncio.to_thread(
            metrics.configure, cfg.server.state_dir / "metrics" if cfg.metrics.listen else None
        )
        self._hold_port()
        self.life.on_force = self._forward_force
        self.life.install(self._reload)
        background: list[asyncio.Task[None]] = []
        try:
            if cfg.journal.enabled and cfg.pipeline.enabled and cfg.jobs.workers > 0:
                # Before the children: the journal exists (and is in WAL mode) when they open it.
                self.workers = await start_workers(cfg)
            if cfg.metrics.listen:
                self.metrics_server = await start_listener(
                    cfg,
                    cfg.metrics.listen,
                    "supervisor",
                    workers=lambda: self.workers,
                    children=self._gateway_pids,
                    accepting=lambda: not self._stopping.is_set(),
                )
            if cfg.api.listen is not None:
                from .api import start_api

                self.api = await start_api(lambda: self.config, self._api_reload)
            ready = [asyncio.Event() for _ in range(self.count)]
            watchers = self._watchers = [
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
            announce(
                f"sftpgate: listening on {cfg.server.listen}:{self._port} ({self.count} processes)"
            )
            log.info("supervising %d gateway processes (pid %d)", self.count, os.getpid())
            self.notifier.ready(self._serving())
            background.append(asyncio.create_task(self.notifier.watchdog(self._healthy)))
            background.append(asyncio.create_task(keep_status(self.notifier, self._status)))
            await self._stopping.wait()
            log.info(
                "stopping %d gateway processes (each drains for at most %g s)",
                len(self.children),
                self.config.server.drain_timeout,
            )
            self.notifier.stopping(self._status())
            await self._stop_api()  # its follows end as the drain starts
            if self.workers is not None:
                await self._stop_workers()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if self.workers is not None:
                await self._stop_workers()
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            await self._stop_api()
            if self._port_hold is not None:
                self._port_hold.close()
            self.life.done()
        return self.life.exit_code

    async def _stop_workers(self) -> None:
        """Release the jobs running here at once (ffmpeg stopped, no attempt counted)."""
        workers, self.workers = self.workers, None
        if workers is not None:
            await workers.stop()
            await asyncio.to_thread(workers.store.close)

    def _serving(self) -> str:
        jobs = self.workers.running if self.workers is not None else 0
        return f"serving: {len(self.children)} gateway processes, {plural(jobs, 'job')} running"

    def _status(self) -> str:
        if self._stopping.is_set():
            return f"draining: {len(self.children)} gateway processes left"
        return self._serving()

    def _healthy(self) -> bool:
        """Every child is running or being restarted (its watcher alive); a child silent
        for the watchdog's time is hung: killed here, so its watcher restarts it."""
        if not self._stopping.is_set() and any(task.done() for task in self._watchers):
            return False
        usec = self.notifier.watchdog_usec
        if usec is not None and not self._stopping.is_set():
            now = time.monotonic()
            for index, proc in list(self.children.items()):
                seen = self._beats.get(proc.pid)
                if proc.returncode is None and seen is not None and now - seen > usec / 1e6:
                    log.error(
                        "gateway process %d (pid %d) silent for %.0f s: hung; killing it",
                        index,
                        proc.pid,
                        now - seen,
                    )
                    self._beats.pop(proc.pid, None)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
        return True

    def _forward_force(self) -> None:
        """A second SIGTERM/SIGINT: every child stops at once too."""
        for proc in list(self.children.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    def _gateway_pids(self) -> dict[str, int]:
        """The gateway processes running now, by name (any thread: one atomic copy)."""
        children = dict(self.children)
        return {f"gateway-{i}": p.pid for i, p in children.items() if p.returncode is None}

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
            await asyncio.to_thread(metrics.process_dead, proc.pid)  # its sessions are gone
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
        task = asyncio.create_task(self._listen(read_fd, index, proc.pid, ready))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proc

    async def _listen(self, fd: int, index: int, pid: int, ready: asyncio.Event) -> None:
        """The child's lines (cli/serve.py ``ChildPipe``): ``ready`` once listening, then
        ``alive`` every second and ``reloaded`` after each SIGHUP; EOF when it ends."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while line := await reader.readline():
                self._beats[pid] = time.monotonic()
                if line.startswith(b"ready"):
                    log.info("gateway process %d (pid %d) listening", index, pid)
                    ready.set()
                elif line.startswith(b"reloaded"):
                    self._reloads[index] = self._reloads.get(index, 0) + 1
                    self._said.set()
        finally:
            transport.close()
            self._beats.pop(pid, None)

    async def _stop_child(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
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
        """SIGHUP: every child re-reads the file; the workers here take the new config.
        systemd hears RELOADING=1 now and READY=1 once every child has reloaded."""
        self.notifier.reloading()
        before = dict(self._reloads)
        waiting = {i for i, proc in self.children.items() if proc.returncode is None}
        for proc in list(self.children.values()):
            if proc.returncode is None:
                proc.send_signal(signal.SIGHUP)
        task = asyncio.create_task(self._reloaded(waiting, before))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
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

    async def _reloaded(self, waiting: set[int], before: dict[int, int]) -> None:
        """READY=1 once each child in ``waiting`` said "reloaded" (or ended), at most
        RELOAD_TIMEOUT seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOAD_TIMEOUT

        def left() -> set[int]:
            return {
                i
                for i in waiting
                if self._reloads.get(i, 0) <= before.get(i, 0)
                and i in self.children
                and self.children[i].returncode is None
            }

        while left() and loop.time() < deadline:
            self._said.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._said.wait(), min(0.5, deadline - loop.time()))
        if left():
            log.warning("gateway processes %s did not confirm the reload", sorted(left()))
        if not self._stopping.is_set():
            self.notifier.ready(self._serving())
