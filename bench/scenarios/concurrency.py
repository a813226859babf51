"""Figures 4 and 5: many sessions at once.

4. ``options.concurrent`` sessions, each uploading ``options.concurrent_mib`` MiB at
   the same moment, against sftpgate and against OpenSSH (sshd + sftp-server),
   interleaved rounds; the aggregate MB/s ratio, and each server's peak RSS.
5. ``options.many`` sessions against sftpgate, each: connect, upload a small
   file, disconnect; the number that failed, and sftpgate's peak RSS.

The client is the same for both servers: asyncssh, every session on one asyncio
loop in this process. Figure 4 times the transfer phase only (open, write,
close, for all sessions at once, started together once every session has its
SFTP channel); connecting is timed separately and shown in the text, because a
Python client spends most of its CPU on key exchanges and that would swamp the
transfer.

Figure 4 connects through a semaphore (at most ``CONNECT_AT_ONCE`` handshakes
in flight; the connect phase is not timed). Figure 5 starts every handshake at
once (``connect_at_once=0``) and holds each session until all of them have
uploaded, so the sessions really overlap. (Before the gateway loaded its host
keys once, asyncssh re-read and re-checked the RSA key file at every login,
about 0.1 s of CPU each, and a burst of 1000 sessions all hit the 60 s login
timeout; ``figure_5(..., connect_at_once=64)`` is the gentler variant.)
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from ..common import Figure, Options, interleave, median, rss_mb
from ..servers import Endpoint, Servers, clean_home, extra_gateway

MIB = 1024 * 1024
CONNECT_AT_ONCE = 64  # SSH handshakes in flight at most (0: no limit)
SAMPLE_EVERY = 0.1  # seconds between RSS samples
SMALL_FILE = 4096  # bytes uploaded by each session of figure 5


class RssSampler:
    """Peak RSS (MB) of a process tree, sampled by a thread every ``SAMPLE_EVERY`` s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.samples = 0
        self.busy = 0.0  # seconds spent sampling (it shares this process's GIL with the client)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _sample(self) -> None:
        start = time.perf_counter()
        self.peak = max(self.peak, rss_mb(self.pid))
        self.samples += 1
        self.busy += time.perf_counter() - start

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(SAMPLE_EVERY):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # one last look, after the load


def load_key(servers: Servers) -> asyncssh.SSHKey:
    return asyncssh.read_private_key(str(servers.key))


async def connect(
    endpoint: Endpoint, login: str, key: asyncssh.SSHKey, timeout: float = 120.0
) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        endpoint.port,
        username=login,
        client_keys=[key],
        known_hosts=None,
        agent_path=None,
        connect_timeout=timeout,
        login_timeout=timeout,
        preferred_auth="publickey",
    )


async def upload(sftp: asyncssh.SFTPClient, name: str, data: bytes) -> None:
    async with sftp.open(name, "wb") as f:
        await f.write(data)


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to at least ``needed`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def process_nofile(pid: int) -> int | None:
    """The soft open-files limit of a running process (from /proc), None if unknown."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return None if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# --------------------------------------------------------------------- figure 4


@dataclass
class _Round:
    seconds: float  # transfer phase
    connect_seconds: float
    connected_rss: float  # MB once every session is connected, before the uploads
    peak_rss: float
    sample_ms: float  # mean time one rss_mb() sample took (it walks all of /proc)


@dataclass
class _Side:
    endpoint: Endpoint
    rounds: list[_Round] = field(default_factory=list)
    peak_rss: float = 0.0


async def _concurrent_round(
    endpoint: Endpoint, login: str, key: asyncssh.SSHKey, sessions: int, payload: bytes
) -> tuple[float, float, float]:
    """Connect all, then upload from all at once: (upload s, connect s, MB once connected)."""
    gate = asyncio.Semaphore(CONNECT_AT_ONCE or sessions)

    async def open_session() -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        async with gate:
            conn = await connect(endpoint, login, key)
            try:
                sftp = await conn.start_sftp_client()
            except BaseException:
                conn.close()
                raise
            return conn, sftp

    start = time.perf_counter()
    opened = await asyncio.gather(
        *(open_session() for _ in range(sessions)), return_exceptions=True
    )
    connect_seconds = time.perf_counter() - start
    connected_rss = rss_mb(endpoint.pid)
    pairs = [p for p in opened if not isinstance(p, BaseException)]
    try:
        errors = [p for p in opened if isinstance(p, BaseException)]
        if errors:
            raise RuntimeError(
                f"{endpoint.name}: {len(errors)} of {sessions} sessions could "
                f"not connect; first: {errors[0]!r}"
            )
        start = time.perf_counter()
        await asyncio.gather(
            *(upload(sftp, f"conc-{i:04d}.bin", payload) for i, (_, sftp) in enumerate(pairs))
        )
        seconds = time.perf_counter() - start
    finally:
        for conn, sftp in pairs:
            sftp.exit()
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn, _ in pairs), return_exceptions=True)
    return seconds, connect_seconds, connected_rss


def _check_arrived(endpoint: Endpoint, sessions: int, size: int) -> None:
    for i in range(sessions):
        path = endpoint.home / f"conc-{i:04d}.bin"
        got = path.stat().st_size if path.exists() else None
        if got != size:
            raise AssertionError(f"{endpoint.name}: {path.name} has {got} bytes, not {size}")


def _round_runner(
    side: _Side, login: str, key: asyncssh.SSHKey, sessions: int, payload: bytes
) -> Callable[[], float]:
    def once() -> float:
        clean_home(side.endpoint)
        with RssSampler(side.endpoint.pid) as sampler:
            seconds, connect_seconds, connected_rss = asyncio.run(
                _concurrent_round(side.endpoint, login, key, sessions, payload)
            )
        _check_arrived(side.endpoint, sessions, len(payload))
        clean_home(side.endpoint)
        sample_ms = 1000 * sampler.busy / max(1, sampler.samples)
        side.rounds.append(_Round(seconds, connect_seconds, connected_rss, sampler.peak, sample_ms))
        side.peak_rss = max(side.peak_rss, sampler.peak)
        return sessions * len(payload) / seconds / 1e6  # MB/s

    return once


def figure_4(servers: Servers, options: Options) -> list[Figure]:
    sessions, size = options.concurrent, options.concurrent_mib * MIB
    raise_nofile(4 * sessions + 256)
    key = load_key(servers)
    payload = os.urandom(size)
    gate, ossh = _Side(servers.sftpgate), _Side(servers.openssh)
    g_start, o_start = rss_mb(gate.endpoint.pid), rss_mb(ossh.endpoint.pid)
    gate_rates, ossh_rates = interleave(
        _round_runner(gate, servers.login, key, sessions, payload),
        _round_runner(ossh, servers.login, key, sessions, payload),
        rounds=options.rounds,
        warmup=options.warmup,
    )
    g, o = median(gate_rates), median(ossh_rates)
    kept = options.warmup
    g_conn = median([r.connect_seconds for r in gate.rounds[kept:]])
    o_conn = median([r.connect_seconds for r in ossh.rounds[kept:]])
    g_idle, o_idle = gate.rounds[0].connected_rss, ossh.rounds[0].connected_rss
    g_ms = median([r.sample_ms for r in gate.rounds])
    o_ms = median([r.sample_ms for r in ossh.rounds])
    title = f"{sessions} concurrent sessions x {options.concurrent_mib} MiB upload"
    client = "asyncssh client, all sessions on one asyncio loop in the bench process"
    throughput = Figure(
        number=4,
        title=f"{title}: aggregate MB/s",
        measured=(
            f"{g:.0f} vs {o:.0f} MB/s (connecting all {sessions} took {g_conn:.1f} vs "
            f"{o_conn:.1f} s, not timed)"
        ),
        value=g / o,
        target=">= 1.5",
        notes=(
            f"{client}; timed: open+write+close of every session at once, once all "
            f"sessions are connected ({CONNECT_AT_ONCE} handshakes in flight while "
            "connecting). Median of interleaved rounds, warm-up discarded."
        ),
        extra={
            "sftpgate_mb_s": gate_rates,
            "openssh_mb_s": ossh_rates,
            "sftpgate_connect_s": [r.connect_seconds for r in gate.rounds],
            "openssh_connect_s": [r.connect_seconds for r in ossh.rounds],
            "sessions": sessions,
            "bytes_per_session": size,
        },
    )
    memory = Figure(
        number=4,
        title=f"{title}: sftpgate peak RSS",
        measured=(
            f"sftpgate {gate.peak_rss:.0f} MB peak ({g_start:.0f} MB before, {g_idle:.0f} MB "
            f"with all {sessions} connected in the first round); OpenSSH {ossh.peak_rss:.0f} "
            f"MB peak ({o_start:.0f} MB before, {o_idle:.0f} MB connected): sshd and all its "
            "per-session sshd and sftp-server processes"
        ),
        value=gate.peak_rss,
        target="<= 500",
        notes=(
            f"rss_mb() of each server's process tree every {SAMPLE_EVERY} s, by a thread of "
            "the bench process, during its rounds (warm-up included); OpenSSH's is a sum over "
            "processes, so pages they share count once per process. One sample took "
            f"{g_ms:.0f} ms (sftpgate) and {o_ms:.0f} ms (OpenSSH, 2 processes a session): the "
            "sampler takes some CPU from the client and servers while they are measured."
        ),
        extra={
            "sftpgate_peak_mb": gate.peak_rss,
            "openssh_peak_mb": ossh.peak_rss,
            "sftpgate_before_mb": g_start,
            "openssh_before_mb": o_start,
            "sftpgate_connected_mb": [r.connected_rss for r in gate.rounds],
            "openssh_connected_mb": [r.connected_rss for r in ossh.rounds],
            "sftpgate_round_peak_mb": [r.peak_rss for r in gate.rounds],
        },
    )
    return [throughput, memory]


# --------------------------------------------------------------------- figure 5


@dataclass
class ManyResult:
    sessions: int
    failures: int
    errors: list[str]
    seconds: float
    peak_open: int  # most sessions connected at the same time
    uploaded: int


async def _many(
    endpoint: Endpoint, login: str, key: asyncssh.SSHKey, sessions: int, connect_at_once: int
) -> ManyResult:
    """Every session: connect, upload, wait for all others to get there, disconnect.

    Holding each session until every one has uploaded (or failed) makes the
    ``sessions`` connections overlap for real. At most ``connect_at_once``
    handshakes are in flight (0: all start at once).
    """
    data = b"x" * SMALL_FILE
    errors: list[str] = []
    done = 0
    open_now = peak_open = uploaded = 0
    all_there = asyncio.Event()
    gate = asyncio.Semaphore(connect_at_once or sessions)

    def finished_one() -> None:
        nonlocal done
        done += 1
        if done == sessions:
            all_there.set()

    async def session(index: int) -> None:
        nonlocal open_now, peak_open, uploaded
        reached = False
        try:
            async with gate:
                conn = await connect(endpoint, login, key)
            async with conn:
                open_now += 1
                peak_open = max(peak_open, open_now)
                try:
                    async with conn.start_sftp_client() as sftp:
                        await upload(sftp, f"many-{index:05d}.bin", data)
                    uploaded += 1
                    reached = True
                    finished_one()
                    await asyncio.wait_for(all_there.wait(), 900)
                finally:
                    open_now -= 1
        except Exception as exc:  # counted: figure 5 is the number of these
            errors.append(f"{type(exc).__name__}: {exc}")
            if not reached:
                finished_one()

    start = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(sessions)))
    return ManyResult(
        sessions, len(errors), errors, time.perf_counter() - start, peak_open, uploaded
    )


def figure_5(servers: Servers, options: Options, *, connect_at_once: int = 0) -> list[Figure]:
    sessions = options.many
    limits = raise_nofile(2 * sessions + 256)
    gate_limit = process_nofile(servers.sftpgate.pid)
    key = load_key(servers)
    endpoint = servers.sftpgate
    clean_home(endpoint)
    peak_fds = open_fds(endpoint.pid)

    with RssSampler(endpoint.pid) as sampler:
        stop = threading.Event()

        def count_fds() -> None:
            nonlocal peak_fds
            while not stop.wait(SAMPLE_EVERY):
                peak_fds = max(peak_fds, open_fds(endpoint.pid))

        counter = threading.Thread(target=count_fds, daemon=True)
        counter.start()
        try:
            result = asyncio.run(_many(endpoint, servers.login, key, sessions, connect_at_once))
        finally:
            stop.set()
            counter.join()
    names = [endpoint.home / f"many-{i:05d}.bin" for i in range(sessions)]
    arrived = sum(1 for path in names if path.is_file() and path.stat().st_size == SMALL_FILE)
    clean_home(endpoint)
    fd_note = (
        f"gateway open-files limit {gate_limit}, its peak open fds {peak_fds}; "
        f"bench process limit {limits[0]}"
    )
    if gate_limit is not None and peak_fds >= gate_limit - 16:
        fd_note += " (the gateway ran out of file descriptors)"
    how = (
        "all handshakes started at once"
        if not connect_at_once
        else f"at most {connect_at_once} handshakes in flight"
    )
    first = f"; first error: {result.errors[0]}" if result.errors else ""
    extra: dict[str, Any] = {
        "failures": result.failures,
        "errors": result.errors[:20],
        "arrived": arrived,
        "uploaded": result.uploaded,
        "peak_open": result.peak_open,
        "seconds": result.seconds,
        "peak_fds": peak_fds,
        "gateway_nofile": gate_limit,
        "peak_mb": sampler.peak,
        "connect_at_once": connect_at_once,
    }
    failures = Figure(
        number=5,
        title=f"{sessions} concurrent sessions (connect, upload {SMALL_FILE // 1024} KiB, "
        "disconnect): failures",
        measured=(
            f"{result.failures} of {sessions} failed; {arrived} files arrived; "
            f"{result.peak_open} connected at once; {result.seconds:.0f} s{first}"
        ),
        value=float(result.failures),
        target="<= 0",
        notes=(
            f"asyncssh client, one asyncio loop in the bench process, {how}; each session "
            f"stays connected until every session has uploaded. {fd_note}."
        ),
        extra=extra,
    )
    memory = Figure(
        number=5,
        title=f"{sessions} concurrent sessions: sftpgate peak RSS",
        measured=f"{sampler.peak:.0f} MB ({result.peak_open} sessions connected at once)",
        value=sampler.peak,
        target="<= 1000",
        extra=extra,
    )
    return [failures, memory]


def figure_17(servers: Servers, options: Options, processes: int = 0) -> list[Figure]:
    """Figure 4's load against ``server.processes: 1`` (the main gateway) and ``processes``
    (default: one per core), same home, interleaved rounds; the ratio is the scaling."""
    processes = processes or max(2, os.cpu_count() or 1)
    sessions, size = options.concurrent, options.concurrent_mib * MIB
    raise_nofile(4 * sessions + 256)
    key = load_key(servers)
    payload = os.urandom(size)
    with extra_gateway(
        servers, "processes", shared_home=True, server={"processes": processes}
    ) as endpoint:
        one, many = _Side(servers.sftpgate), _Side(endpoint)
        many_rates, one_rates = interleave(
            _round_runner(many, servers.login, key, sessions, payload),
            _round_runner(one, servers.login, key, sessions, payload),
            rounds=options.rounds,
            warmup=options.warmup,
        )
    m, o = median(many_rates), median(one_rates)
    cores = os.cpu_count() or 1
    return [
        Figure(
            number=17,
            title=(
                f"{sessions} concurrent sessions x {options.concurrent_mib} MiB upload: "
                f"server.processes {processes} vs 1"
            ),
            measured=f"{m:.0f} vs {o:.0f} MB/s on {cores} cores (client included)",
            value=m / o,
            target=">= 0.9",
            notes=(
                f"Figure 4's client and checks against two gateways of the same config and "
                f"home: `server.processes: {processes}` (a supervisor and {processes} gateway "
                f"processes on one SO_REUSEPORT port) and the main one (1 process). Peak RSS "
                f"{many.peak_rss:.0f} vs {one.peak_rss:.0f} MB (the whole process tree). The "
                f"client is one Python process on the same {cores} cores: where the cores are "
                "fewer than the gateway processes plus one, the client and the gateways share "
                "them and the ratio shows that contention, not the gateway's scaling."
            ),
            extra={"processes_mb_s": many_rates, "one_process_mb_s": one_rates},
        )
    ]


def run(servers: Servers, options: Options) -> list[Figure]:
    figures: list[Figure] = []
    if options.wants(4):
        figures += figure_4(servers, options)
    if options.wants(5):
        figures += figure_5(servers, options)
    if options.wants(17):
        figures += figure_17(servers, options)
    return figures
