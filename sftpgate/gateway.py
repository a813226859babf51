"""Wiring for ``sftpgate serve``: config → journal writer → SSH listener."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import pwd
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncssh

from . import metrics
from .algorithms import listen_options
from .config import Config, DefenderConfig, check_homes, restart_keys_changed
from .defender import Ban, BanSync, Defender, Door, Guard, Offence
from .errors import ConfigError
from .events import Event, EventSink, Op, current_process, set_node, set_process
from .frontdoor import asyncssh_fast
from .frontdoor.inline import InlineGuard
from .frontdoor.limits import DoorLimits, Quotas
from .frontdoor.ssh import GatewaySSHServer, Users, ensure_host_keys
from .frontdoor.writebehind import WriteBudget
from .identity import identity_for
from .jobs.rules import Rules
from .jobs.store import JobStore
from .jobs.worker import WorkerPool
from .journal.usage import SQLiteUsageLedger
from .journal.writer import JournalWriter, NullSink
from .metrics_http import MetricsServer, start_listener
from .passwords import FairHasher
from .private import private_dir
from .proxyproto import ProxyListener
from .storage import open_backend
from .subsystem.daemon import TapDaemon

log = logging.getLogger(__name__)

# A larger SSH window: Python clients move 30-50% more per second.
WINDOW = 8 * 1024 * 1024
# The largest SSH packet a client may send us: just under 128 KiB, glibc's
# default mmap threshold, so a client builds and encrypts each packet in heap
# memory it reuses. At 257 KiB (one packet per 256 KiB WRITE) asyncssh's client
# got each one in freshly mmapped memory: 140k-510k page faults and ~1 s of
# system time per GiB sent, on the cores the gateway shares with it. A 256 KiB
# WRITE is now three packets. Interleaved A/B, 6 x 1 GiB: asyncssh's client
# 1.43x, paramiko 1.10x, OpenSSH's sftp client 1.00x (same gateway CPU);
# 64 KiB cost that one 0.85x (twice the packets through asyncssh's layer).
MAX_PACKET = 127 * 1024
# Out of descriptors, asyncio reports each failed accept with a traceback (hundreds a
# second under a flood); we log one line per this many seconds instead.
EMFILE_LOG_INTERVAL = 10.0
# How often a drain looks whether sessions are left.
DRAIN_POLL = 0.1


class Gateway:
    """One running gateway. ``start()`` listens; ``stop()`` closes everything it opened."""

    def __init__(
        self,
        config: Config,
        sink: EventSink | None = None,
        server_class: type[GatewaySSHServer] = GatewaySSHServer,
        *,
        reuse_port: bool = False,
        embedded_workers: bool = True,
        tap: bool = True,
    ) -> None:
        """``reuse_port``, ``embedded_workers`` and ``tap`` are for one of several processes
        (supervisor.py): the port shared, the workers run by the supervisor, and the tap's
        socket served by one process only."""
        self.config = config
        self.reuse_port = reuse_port
        self.embedded_workers = embedded_workers
        self.serve_tap = tap
        self.users = Users(config.users)
        self.writer: JournalWriter | None = None
        self.workers: WorkerPool | None = None
        self.handover: Any = None  # PostgreSQL without workers here: storage/postgres/queue.py
        self.tap_daemon: TapDaemon | None = None
        self.rules: Rules | None = None
        self._sink = sink
        self._server_class = server_class
        self.executor = ThreadPoolExecutor(config.server.io_threads, thread_name_prefix="fs")
        # Bytes of WRITEs answered but not yet on disk, over every session.
        self.write_budget = WriteBudget(config.server.receive_budget)
        # Handles, upload size, quotas (frontdoor/limits.py): one for every session.
        self.limits = door_limits(config, self.executor)
        self.inline_guard = InlineGuard()  # one for all sessions: see frontdoor/inline.py
        self._listener: asyncssh.SSHAcceptor | None = None
        self.connections: set[GatewaySSHServer] = set()
        # asyncssh's internals: only with server.fast_paths auto, and only if the
        # check at start finds them as tested (else one warning; see asyncssh_fast).
        self.fast_paths = config.server.fast_paths == "auto" and asyncssh_fast.available()
        self.guard: Guard | None = None
        self.ban_sync: BanSync | None = None
        self.api: Any = None  # the admin API (api/), in a gateway that is not a child
        self.disconnect_watch: Any = None  # sessions an admin asked to end (api/disconnects.py)
        self.sweeper: Any = None  # this process's registry row; dead processes' sessions
        self._emfile_logged = 0.0
        self._previous_handler: tuple[Any, ...] = ()  # the loop's handler before ours
        self.metrics_server: MetricsServer | None = None  # metrics.listen, one process only

    @property
    def sink(self) -> EventSink:
        assert self._sink is not None
        return self._sink

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.get_port())

    async def start(self) -> None:
        cfg = self.config
        set_node(cfg.server.node)
        if not self.reuse_port:  # a supervisor's child counts in the supervisor's folder
            metrics.configure(None)
        keys = await asyncio.to_thread(prepare_state, cfg)
        if self._sink is None:
            if cfg.journal.enabled:
                rules = self.rules = Rules(cfg)
                store = None
                if cfg.database.url is not None:
                    store = await asyncio.to_thread(open_backend(cfg).journal)
                self.writer = JournalWriter(
                    cfg.journal_path,
                    synchronous=cfg.journal.synchronous,
                    batch_max=cfg.journal.batch_max,
                    interval=cfg.journal.commit_interval,
                    on_upload=rules.on_upload,
                    after_commit=rules.after_commit,
                    durable_timeout=cfg.journal.durable_timeout,
                    store=store,
                )
                await asyncio.to_thread(self.writer.start)
                self._sink = self.writer
                if self.embedded_workers and cfg.pipeline.enabled and cfg.jobs.workers > 0:
                    self.workers = await start_workers(cfg)
                    rules.wake = self.workers.wake
                elif cfg.database.url is not None and cfg.pipeline.enabled:
                    self.handover = await start_handover(cfg)
                    rules.wake = self.handover.wake
            else:
                self._sink = NullSink()
        if self.writer is not None:
            await self._start_sweeper()
        if cfg.subsystem.enabled and self.serve_tap:
            self.tap_daemon = TapDaemon(cfg, self.sink, self.users.get)
            await self.tap_daemon.start()
        await self._start_guard()
        self._install_emfile_handler()
        if cfg.metrics.listen and not self.reuse_port:
            self.metrics_server = await start_listener(
                cfg,
                cfg.metrics.listen,
                "serve",
                workers=lambda: self.workers,
                accepting=lambda: self._listener is not None,
            )
        options = await asyncio.to_thread(self._ssh_options, keys)
        if cfg.server.proxy_protocol_from:
            # Each connection behind a PROXY-header gate (proxyproto.py), via asyncssh's
            # public tunnel-listener hook: the same socket, the same transport after the header.
            tunnel = ProxyListener(
                cfg.server.proxy_protocol_from,
                cfg.server.proxy_protocol_timeout,
                self._proxy_refused,
                self._proxy_untrusted,
                reuse_port=self.reuse_port,
            )
            self._listener = await asyncssh.listen(
                cfg.server.listen, cfg.server.port, tunnel=tunnel, options=options
            )
        else:
            self._listener = await asyncssh.listen(
                cfg.server.listen or None,
                cfg.server.port,
                options=options,
                reuse_port=self.reuse_port or None,
            )
        await self._start_api()
        log.info(
            # A child of the supervisor does not say "listening": the supervisor does, once.
            "%s %s:%d (%d users, journal %s, fast paths %s)",
            "sharing port" if self.reuse_port else "listening on",
            cfg.server.listen,
            self.port,
            len(cfg.users),
            _journal_named(cfg),
            "on" if self.fast_paths else "off",
        )

    async def _start_sweeper(self) -> None:
        """Register this process (its sessions are stamped with its id from now on) and
        sweep the sessions of gateway processes that died (journal/sweep.py)."""
        from .journal.sweep import SessionSweeper

        cfg = self.config
        self.sweeper = SessionSweeper(
            open_backend(cfg).gateways,
            cfg.server.node,
            cfg.server.session_sweep,
            cfg.server.gateway_timeout,
        )
        set_process(self.sweeper.id)
        await self.sweeper.start()

    async def _stop_sweeper(self) -> None:
        if self.sweeper is not None:
            sweeper, self.sweeper = self.sweeper, None
            await sweeper.stop()  # after the journal's flush: its row goes unless sessions are open
            if current_process() == sweeper.id:
                set_process(None)

    async def _start_api(self) -> None:
        """The admin API (not in a child of the supervisor: it serves the API itself) and the
        poll that ends sessions an admin asked to disconnect (every process that may hold one:
        with the API here, or on PostgreSQL, where another node may serve it)."""
        cfg = self.config
        if cfg.journal.enabled and (cfg.api.listen is not None or cfg.database.url is not None):
            from .api.disconnects import DisconnectWatch

            watch = DisconnectWatch(
                open_backend(cfg).admin,
                lambda: self.connections,
                self.sink,
                cfg.api.disconnect_poll,
            )
            watch.start()
            self.disconnect_watch = watch
        if cfg.api.listen is not None and not self.reuse_port:
            from .api import start_api

            async def reload(config: Config) -> None:
                self.reload(config)

            self.api = await start_api(lambda: self.config, reload)

    async def _stop_api(self) -> None:
        if self.api is not None:
            api, self.api = self.api, None
            await api.stop()  # its follows end cleanly

    def _proxy_refused(self, address: str, port: int, why: str, score: bool) -> None:
        """A listed balancer's connection without a valid PROXY header: journaled; scored
        only when ``score`` (never the balancer: a ban would shut out every customer)."""
        if self.guard is not None:
            offence = Offence.PROTOCOL_ERROR if score else None
            self.guard.defender.refused(address, port, why, offence=offence)

    def _proxy_untrusted(self, conn: object, address: str, port: int, why: str) -> None:
        """A PROXY header from an address not allowed to send one: the session refuses it."""
        for server in self.connections:
            if server.conn is conn:
                server.refuse(why, Offence.PROTOCOL_ERROR)
                return
        self._proxy_refused(address, port, why, True)  # refused at the door already

    async def _start_guard(self) -> None:
        """The defender, the door's limits, the password hasher, and the ban table's thread."""
        cfg = self.config
        sync: BanSync | None = None
        if cfg.defender.enabled and cfg.journal.enabled:
            loop = asyncio.get_running_loop()

            def deliver(rows: list[Ban], written: list[Ban], lifted: list[Ban]) -> None:
                loop.call_soon_threadsafe(defender.synced, rows, written, lifted)

            sync = BanSync(
                cfg.journal_path,
                cfg.defender.reload_interval,
                deliver,
                synchronous=cfg.journal.synchronous,
                opener=open_backend(cfg).bans if cfg.database.url is not None else None,
            )
        defender = Defender(
            defender_config(cfg), self.sink, persist=sync.persist if sync is not None else None
        )
        door = Door(cfg.door)
        self.guard = Guard(
            defender,
            door,
            FairHasher(cfg.defender.hash_threads, cfg.defender.hash_queue_per_address),
        )
        if sync is not None:
            # Bans from before a restart (or from other gateways) hold from the first connection.
            rows, lifted = await asyncio.to_thread(sync.first_round)
            defender.synced(rows, [], lifted)
            sync.start()
            self.ban_sync = sync
        log.info(
            "door: unauthenticated connections dropped from %d, all at %d (%d per address); "
            "sessions at most %d (%d per user, %d per address); descriptor limit %d",
            door.start,
            door.full,
            cfg.door.max_startups_per_address,
            door.max_sessions,
            cfg.door.max_sessions_per_user,
            cfg.door.max_sessions_per_address,
            door.descriptors,
        )

    def _install_emfile_handler(self) -> None:
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if "out of system resource" in str(context.get("message", "")):
                now = time.monotonic()
                if now - self._emfile_logged >= EMFILE_LOG_INTERVAL:
                    self._emfile_logged = now
                    log.warning(
                        "out of descriptors: new connections wait (%s); lower door limits or "
                        "raise LimitNOFILE",
                        context.get("exception"),
                    )
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        self._previous_handler = (previous,)

    def _ssh_options(self, keys: list[Path]) -> asyncssh.SSHServerConnectionOptions:
        """The listener's options: our algorithms, our host keys, and only the host key
        algorithms the config allows. Blocking (reads the keys)."""
        cfg = self.config
        algorithms = cfg.algorithms
        # Key objects, not paths: asyncssh would re-read and re-parse the
        # files (RSA: ~0.1 s) at every login.
        host_keys = [asyncssh.read_private_key(k) for k in keys]
        for path, key in zip(keys, host_keys, strict=True):
            log.info(
                "host key %s %s (%s)",
                key.get_algorithm(),
                key.get_fingerprint("sha256"),
                path,
            )
        # asyncssh offers every signature algorithm a key can make (an RSA key: ssh-rsa,
        # SHA-1, too); each key pair keeps those `algorithms.host_keys` names.
        allowed = [name.encode("ascii") for name in algorithms.host_keys]
        pairs = []
        for pair in asyncssh.load_keypairs(host_keys):
            pair.host_key_algorithms = [a for a in allowed if a in pair.host_key_algorithms]
            if pair.host_key_algorithms:
                pairs.append(pair)
        if not pairs:
            raise ConfigError(
                f"{cfg.path.name}: algorithms.host_keys: no host key can sign with any of "
                f"{', '.join(algorithms.host_keys)}"
            )
        options = asyncssh.SSHServerConnectionOptions(
            server_factory=self._new_connection,
            server_host_keys=pairs,
            server_version="sftpgate",
            login_timeout=cfg.server.login_timeout,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            # No PTY, so no line editing: skip asyncssh's editor wrapper, a layer
            # every packet of every session went through for nothing.
            line_editor=False,
            window=WINDOW,
            max_pktsize=MAX_PACKET,
            encoding=None,
            **listen_options(
                algorithms.kex, algorithms.ciphers, algorithms.macs, algorithms.host_keys
            ),
        )
        return options

    def _new_connection(self) -> GatewaySSHServer:
        server = self._server_class(
            self.users,
            self.sink,
            self.executor,
            self.config.server.max_auth_attempts,
            self.connections,
            self.config.pipeline.temp_patterns,
            self.rules.wants if self.rules is not None else None,
            self.write_budget,
            self.config.server.inline_local_metadata,
            inline_local_changes=self.config.server.inline_local_changes,
            inline_guard=self.inline_guard,
            fsync_uploads=self.config.journal.enabled and self.config.journal.synchronous == "full",
            umask=self.config.server.umask,
            fast_paths=self.fast_paths,
            requests_in_flight=self.config.server.requests_in_flight,
            limits=self.limits,
            guard=self.guard,
        )
        return server

    def _create_homes(self, config: Config | None = None) -> None:
        create_homes(config or self.config)

    def reload(self, config: Config) -> None:
        """Swap in a re-read config: users, rules, pipeline, email and SMTP settings together.

        Runs on the event loop, so no session, rule or job sees half of it:
        new logins, new uploads and each job step from then on read the new
        config; sessions already open keep their user. Raises
        :class:`ConfigError` (and changes nothing) when a key that needs a
        restart changed (:data:`~sftpgate.config.RESTART_KEYS`) or a home is
        missing.
        """
        changed = restart_keys_changed(self.config, config)
        if changed:
            raise ConfigError(
                f"{config.path.name}: {', '.join(changed)}: changed, and only read at start; "
                "restart sftpgate to apply it"
            )
        if config.server.create_homes:
            try:
                self._create_homes(config)
            except OSError as exc:
                raise ConfigError(f"{config.path.name}: cannot create a home: {exc}") from None
        problems = check_homes(config)
        if problems:
            raise ConfigError("; ".join(problems))
        self.config = config
        self.users.replace(config.users)
        if self.guard is not None:
            self.guard.defender.reconfigure(defender_config(config))
            self.guard.door.reconfigure(config.door)
            self.guard.hasher.per_source = config.defender.hash_queue_per_address
        if self.rules is not None:
            self.rules.config = config
        if self.workers is not None:
            self.workers.config = config
            self.workers.pipeline.config = config
        log.info("reloaded %s: %d users", config.path, len(config.users))

    @property
    def sessions(self) -> int:
        """Connections logged in now (those still logging in are not counted)."""
        return sum(1 for server in self.connections if server.authenticated)

    @property
    def jobs_running(self) -> int:
        """Jobs the embedded workers of this process hold now."""
        return self.workers.running if self.workers is not None else 0

    async def stop_accepting(self) -> None:
        """Close the listener: new connections are refused; open sessions go on."""
        await self._stop_api()
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None

    async def stop_workers(self) -> None:
        """Release the jobs running here (ffmpeg stopped, lease given back, the attempt not
        counted) and stop the embedded workers; jobs committed after wait for a worker."""
        if self.workers is not None:
            workers, self.workers = self.workers, None
            if self.rules is not None:
                self.rules.wake = None
            await workers.stop()
            await asyncio.to_thread(workers.store.close)

    async def drain(self, timeout: float, interrupt: asyncio.Event | None = None) -> bool:
        """Wait until every session has ended, at most ``timeout`` seconds or until
        ``interrupt`` is set; True when none is left. Sessions keep working meanwhile.
        Connections still logging in are not waited for (a client that failed a password
        and sits there would hold the drain): ``stop()`` cuts them with the rest; one that
        logs in meanwhile is a session like the others."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.sessions and loop.time() < deadline:
            if interrupt is not None and interrupt.is_set():
                break
            await asyncio.sleep(min(DRAIN_POLL, max(0.0, deadline - loop.time())))
        return not self.sessions

    async def close_connections(self, timeout: float = 5.0, why: str = "") -> None:
        """Disconnect every client and wait (at most ``timeout``) until their sessions are
        journaled: a handle left open is an ``incomplete`` upload, as any cut session."""
        servers = list(self.connections)
        for server in servers:
            if server.conn is not None:
                if why:
                    log.warning(
                        "disconnecting %s from %s (%s)",
                        server.info.login or "a client not logged in",
                        server.info.remote_addr,
                        why,
                    )
                    if server.info.login is not None:
                        # Journaled as such, before its LOGOUT (and any incomplete upload).
                        self.sink.emit(
                            Event(Op.DISCONNECT, server.info, message=f"server stopping: {why}")
                        )
                server.conn.disconnect(asyncssh.DISC_BY_APPLICATION, why or "server stopping")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for server in servers:
            if server.conn is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        server.conn.wait_closed(), max(0.05, deadline - loop.time())
                    )
        # asyncssh closes left-open handles in the SFTP session's own task.
        while loop.time() < deadline and any(
            ctx.open_files for server in servers for ctx in server.contexts
        ):
            await asyncio.sleep(0.02)
        # A session's LOGOUT follows its handles' CLOSE rows from a task of its own: let it
        # reach the journal before the journal is flushed and closed.
        pending = [task for server in servers if (task := server.logout_pending) is not None]
        if pending:
            await asyncio.wait(pending, timeout=max(0.05, deadline - loop.time()))

    async def stop(self, close_timeout: float = 5.0, why: str = "") -> None:
        """Close everything: the listener, the sessions left (``close_timeout`` to journal
        them; ``why`` is logged for each), the workers (jobs released), the tap, bans and
        the journal (flushed)."""
        await self._stop_api()
        if self.disconnect_watch is not None:
            await self.disconnect_watch.stop()
            self.disconnect_watch = None
        await self.stop_accepting()
        await self.close_connections(close_timeout, why)
        await self.limits.quotas.aclose()  # the last usage changes, to the journal database
        if self.tap_daemon is not None:
            await self.tap_daemon.stop()
            self.tap_daemon = None
        await self.stop_workers()
        if self.handover is not None:
            await self.handover.stop()
            self.handover = None
        if self._previous_handler:
            asyncio.get_running_loop().set_exception_handler(self._previous_handler[0])
            self._previous_handler = ()
        if self.ban_sync is not None:
            await asyncio.to_thread(self.ban_sync.stop)  # writes the last bans first
            self.ban_sync = None
        if self.guard is not None:
            self.guard.hasher.close()
        if self.writer is not None:
            await self.writer.aclose()
            self.writer = None
        await self._stop_sweeper()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        self.executor.shutdown(wait=False, cancel_futures=True)


def prepare_state(config: Config) -> list[Path]:
    """The state folder (ours alone, whatever the umask), the host keys (made if missing) and,
    with ``server.create_homes``, the homes. Blocking; run once before any process listens."""
    private_dir(config.server.state_dir)
    keys = ensure_host_keys(config.server.host_keys_dir)
    if config.server.create_homes:
        create_homes(config)
    return keys


def create_homes(config: Config) -> None:
    for user in config.users:
        if not user.home.exists():
            user.home.mkdir(parents=True, mode=0o750)
            if os.geteuid() == 0 and (user.uid is not None or _has_account(user.login)):
                ident = identity_for(user.login, user.home, user.uid, user.gid)
                assert ident is not None
                # Through the folder just made, never a path looked up again.
                fd = os.open(user.home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    os.fchown(fd, ident.uid, ident.gid)
                finally:
                    os.close(fd)
            log.info("created home %s for %s", user.home, user.login)


def defender_config(config: Config) -> DefenderConfig:
    """``defender``, with the PROXY-protocol balancers safelisted: their own connections
    (health checks, v2 LOCAL) are never scored or capped per address, since a ban of a
    balancer would shut out every client behind it. Proxied clients keep their own address."""
    balancers = config.server.proxy_protocol_from
    if not balancers:
        return config.defender
    return dataclasses.replace(config.defender, safelist=config.defender.safelist + balancers)


def door_limits(config: Config, executor: ThreadPoolExecutor) -> DoorLimits:
    """The limits every session shares, from ``server.*``; quota usage kept in the journal."""
    server = config.server
    ledger = None
    if config.journal.enabled and config.database.url is not None:
        ledger = open_backend(config).usage
    elif config.journal.enabled:
        ledger = functools.partial(
            SQLiteUsageLedger, config.journal_path, synchronous=config.journal.synchronous
        )
    return DoorLimits(
        max_handles=server.max_handles,
        max_upload_size=server.max_upload_size,
        quota_bytes=server.quota_bytes,
        quota_files=server.quota_files,
        quotas=Quotas(ledger, executor),
    )


async def start_handover(config: Config) -> Any:
    """On PostgreSQL, in a gateway without workers: hand committed jobs to Procrastinate."""
    from .storage.postgres.backend import from_config
    from .storage.postgres.queue import HandOver

    assert config.database.url is not None
    pg = await asyncio.to_thread(from_config(config).jobs)
    handover = HandOver(config.database.url, pg, config.server.node)
    await handover.start()
    return handover


async def start_workers(config: Config) -> WorkerPool:
    """Open the job store and start the embedded workers (a dead worker's jobs: by lease).

    On PostgreSQL (``database.url``), Procrastinate runs the jobs (storage/postgres/queue.py).
    """
    if config.database.url is not None:
        from .storage.postgres.backend import from_config
        from .storage.postgres.queue import QueuedWorkers

        pg = await asyncio.to_thread(from_config(config).jobs)
        queued = QueuedWorkers(config, config.database.url, pg)
        await queued.start()
        return queued  # type: ignore[return-value]  # a WorkerPool to its callers
    store = await asyncio.to_thread(
        JobStore, config.journal_path, synchronous=config.journal.synchronous
    )
    pool = WorkerPool(config, store)
    await pool.start()
    return pool


def _has_account(login: str) -> bool:
    try:
        pwd.getpwnam(login)
    except KeyError:
        return False
    return True


def _journal_named(cfg: Config) -> str:
    """The journal as the start line names it: never a database URL (it may hold a password)."""
    if not cfg.journal.enabled:
        return "off"
    if cfg.database.url:
        return "on PostgreSQL"
    return str(cfg.journal_path)
