"""Figure 16: memory under overload, the receive budget (``server.receive_budget``).

``options.overload_sessions`` sessions each upload ``options.overload_mib`` MiB at
the same moment to sftpgate alone; its peak RSS, sampled every 0.1 s, with
the default budget (64 MiB) and, beside it, with the budget out of the way
(16 GiB: what every release before it did, each channel's 8 MiB SSH window
re-opened as fast as data arrived), in alternating rounds. The client is
figure 4's (asyncssh, every session on one loop in this process); every
upload is checked byte count by byte count.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import asyncssh

from ..common import Figure, Options, interleave, median
from ..servers import Endpoint, Servers, clean_home, extra_gateway
from .concurrency import RssSampler, _check_arrived, _concurrent_round, load_key, raise_nofile

MIB = 1024 * 1024
UNBOUNDED = 16 * 1024**3  # a budget that is never spent


def _round(
    endpoint: Endpoint,
    login: str,
    key: asyncssh.SSHKey,
    sessions: int,
    payload: bytes,
    peaks: list[float],
) -> Callable[[], float]:
    def once() -> float:
        clean_home(endpoint)
        with RssSampler(endpoint.pid) as sampler:
            seconds, _, _ = asyncio.run(_concurrent_round(endpoint, login, key, sessions, payload))
        _check_arrived(endpoint, sessions, len(payload))
        clean_home(endpoint)
        peaks.append(sampler.peak)
        return sessions * len(payload) / seconds / 1e6  # MB/s

    return once


def figure_16(servers: Servers, options: Options) -> list[Figure]:
    sessions, size = options.overload_sessions, options.overload_mib * MIB
    raise_nofile(4 * sessions + 256)
    key = load_key(servers)
    payload = os.urandom(size)
    bounded = servers.sftpgate
    bounded_peaks: list[float] = []
    unbounded_peaks: list[float] = []
    with extra_gateway(
        servers, "unbounded", shared_home=True, server={"receive_budget": UNBOUNDED}
    ) as unbounded:
        rates, free_rates = interleave(
            _round(bounded, servers.login, key, sessions, payload, bounded_peaks),
            _round(unbounded, servers.login, key, sessions, payload, unbounded_peaks),
            rounds=options.overload_rounds,
            warmup=0,
        )
    peak, free_peak = max(bounded_peaks), max(unbounded_peaks)
    title = f"{sessions} concurrent sessions x {options.overload_mib} MiB upload"
    return [
        Figure(
            number=16,
            title=f"{title}: sftpgate peak RSS under overload",
            measured=(
                f"{peak:.0f} MB with the receive budget (64 MiB), {free_peak:.0f} MB without "
                f"it; {median(rates):.0f} vs {median(free_rates):.0f} MB/s"
            ),
            value=peak,
            target="<= 400",
            notes=(
                "sftpgate alone, default config (journal full, fast paths auto) beside the "
                f"same with `server.receive_budget: {UNBOUNDED}` (never spent: how every "
                "release before the budget behaved); rss_mb() of the gateway process every "
                "0.1 s, alternating rounds, the highest of each side's rounds. Figure 4's "
                "client and checks."
            ),
            extra={
                "peak_mb": bounded_peaks,
                "unbounded_peak_mb": unbounded_peaks,
                "mb_s": rates,
                "unbounded_mb_s": free_rates,
                "sessions": sessions,
                "bytes_per_session": size,
            },
        )
    ]


def run(servers: Servers, options: Options) -> list[Figure]:
    return figure_16(servers, options) if options.wants(16) else []
