"""Figures 1, 2, 3 and 9: uploads to sftpgate against OpenSSH, and the journal's cost.

1. one big file with OpenSSH's ``sftp`` client, MB/s, sftpgate ÷ OpenSSH
2. the same with paramiko and with the asyncssh client (each against itself)
3. many small files in one ``sftp`` session, files/s, sftpgate ÷ OpenSSH
9. the small files again, sftpgate with its journal ÷ sftpgate with the journal off

Every client uses aes128-gcm@openssh.com; the Python clients an 8 MiB window and
256 KiB packets on both servers. Every round checks that the files arrived
whole, then empties the home.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import paramiko

from ..common import Figure, Options, interleave, median, timed
from ..servers import Endpoint, Servers, clean_home, extra_gateway

CIPHER = "aes128-gcm@openssh.com"
WINDOW = 8 * 1024 * 1024
MAX_PACKET = 256 * 1024
MIB = 1024 * 1024
MB = 1_000_000
BIG = "transfer-big.bin"

Upload = Callable[[Endpoint], object]


def run(servers: Servers, options: Options) -> list[Figure]:
    src = servers.workdir / "transfer-src"
    src.mkdir()
    try:
        big_mib = options.big_mib if options.wants(1) or options.wants(2) else 0
        big = _make_file(src / BIG, big_mib * MIB)
        small_size = options.small_kib * 1024
        small = [_make_file(src / f"small-{i:05d}", small_size) for i in range(options.small_files)]
        figures = []
        if options.wants(1):
            figures.append(_figure1(servers, options, big))
        if options.wants(2):
            figures += _figure2(servers, options, big)
        if options.wants(3):
            figures.append(_figure3(servers, options, small))
        if options.wants(9):
            # Two gateways started for the figure, in the one home figure 3
            # used: on this machine's ext4 where a home sits and what it held
            # moved create costs more than the journal does.
            with (
                extra_gateway(servers, "journal", shared_home=True) as journal,
                extra_gateway(
                    servers, "nojournal", shared_home=True, journal={"enabled": False}
                ) as nojournal,
            ):
                figures.append(_figure9(servers, journal, nojournal, options, small))
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return figures


# ------------------------------------------------------------------- the figures


def _figure1(servers: Servers, options: Options, big: Path) -> Figure:
    def upload(endpoint: Endpoint) -> None:
        _sftp_batch(servers, endpoint, f'put "{big}" "{BIG}"\n')

    return _rate_figure(
        1,
        f"{options.big_mib} MiB upload, OpenSSH sftp client",
        servers.sftpgate,
        servers.openssh,
        upload,
        [big],
        options,
        unit="MB/s",
        per=big.stat().st_size / MB,
        target=">= 1.1",
        notes=f"cipher {CIPHER}",
    )


def _figure2(servers: Servers, options: Options, big: Path) -> list[Figure]:
    pkey = paramiko.Ed25519Key.from_private_key_file(str(servers.key))
    ciphers: set[str] = set()
    block_sizes: dict[str, set[int]] = {}

    def with_paramiko(endpoint: Endpoint) -> None:
        ciphers.add(_paramiko_put(servers, endpoint, pkey, big))

    def with_asyncssh(endpoint: Endpoint) -> None:
        block = asyncio.run(_asyncssh_put(servers, endpoint, big))
        block_sizes.setdefault(endpoint.name, set()).add(block)

    per = big.stat().st_size / MB
    title = f"{options.big_mib} MiB upload, "
    para = _rate_figure(
        2,
        title + "paramiko",
        servers.sftpgate,
        servers.openssh,
        with_paramiko,
        [big],
        options,
        unit="MB/s",
        per=per,
        target=">= 1.0",
    )
    para.notes = (
        f"paramiko {paramiko.__version__}, cipher {', '.join(sorted(ciphers))} "
        "(negotiated), 8 MiB window, 256 KiB max packet (what it receives), SFTPClient.put "
        "(32 KiB writes, pipelined)"
    )
    asy = _rate_figure(
        2,
        title + "asyncssh",
        servers.sftpgate,
        servers.openssh,
        with_asyncssh,
        [big],
        options,
        unit="MB/s",
        per=per,
        target=">= 1.0",
    )
    blocks = ", ".join(
        f"{name} {'/'.join(str(b // 1024) for b in sorted(sizes))} KiB"
        for name, sizes in sorted(block_sizes.items())
    )
    asy.notes = (
        f"asyncssh {asyncssh.__version__}, cipher {CIPHER}, 8 MiB window, 256 KiB "
        f"max packet (what it receives; it sends packets of the size each server asks "
        f"for), SFTPClient.put with its default write size, which follows "
        f"each server's limits@openssh.com answer: {blocks}"
    )
    asy.extra["write_block"] = {name: sorted(sizes) for name, sizes in block_sizes.items()}
    return [para, asy]


def _figure3(servers: Servers, options: Options, small: list[Path]) -> Figure:
    return _rate_figure(
        3,
        f"{options.small_files} x {options.small_kib} KiB uploads, OpenSSH sftp client "
        "(one session)",
        servers.sftpgate,
        servers.openssh,
        _small_upload(servers, small),
        small,
        options,
        unit="files/s",
        per=len(small),
        target=">= 0.9",
        notes=f"cipher {CIPHER}",
    )


def _figure9(
    servers: Servers, journal: Endpoint, nojournal: Endpoint, options: Options, small: list[Path]
) -> Figure:
    return _rate_figure(
        9,
        f"journal cost: {options.small_files} x {options.small_kib} KiB uploads, journal on ÷ off",
        journal,
        nojournal,
        _small_upload(servers, small),
        small,
        options,
        unit="files/s",
        per=len(small),
        target=">= 0.95",
        notes="both sides sftpgate, OpenSSH sftp client, one session; two gateways started "
        "for this figure, serving the same home (figure 3's)",
    )


# ---------------------------------------------------------------- measuring


def _rate_figure(
    number: int,
    title: str,
    a: Endpoint,
    b: Endpoint,
    upload: Upload,
    files: list[Path],
    options: Options,
    *,
    unit: str,
    per: float,
    target: str,
    notes: str = "",
) -> Figure:
    """Interleave ``upload`` on a and b; the figure is median rate a ÷ median rate b."""
    rates = measure_rates(a, b, upload, files, options, per=per)
    return Figure(
        number,
        title,
        rates.measured(unit),
        rates.ratio,
        target,
        notes,
        extra={
            "unit": unit,
            a.name: rates.seconds_a,
            b.name: rates.seconds_b,
            "seconds": "per round",
        },
    )


# Called before a round; returns what to check after it (e.g. the journal's rows).
RoundCheck = Callable[[], Callable[[], None]]


@dataclass
class Rates:
    """Per-round seconds of two interleaved sides and their median rates."""

    seconds_a: list[float]
    seconds_b: list[float]
    per: float

    @property
    def rate_a(self) -> float:
        return median([self.per / s for s in self.seconds_a])

    @property
    def rate_b(self) -> float:
        return median([self.per / s for s in self.seconds_b])

    @property
    def ratio(self) -> float:
        return self.rate_a / self.rate_b

    def measured(self, unit: str) -> str:
        digits = 0 if min(self.rate_a, self.rate_b) >= 10 else 1
        return f"{self.rate_a:.{digits}f} vs {self.rate_b:.{digits}f} {unit}"


def measure_rates(
    a: Endpoint,
    b: Endpoint,
    upload: Upload,
    files: list[Path],
    options: Options,
    *,
    per: float,
    check_a: RoundCheck | None = None,
) -> Rates:
    """Run ``upload`` on a and b alternately (warm-up discarded), each round checked."""
    seconds_a, seconds_b = interleave(
        lambda: run_round(a, upload, files, check_a),
        lambda: run_round(b, upload, files),
        rounds=options.rounds,
        warmup=options.warmup,
    )
    return Rates(seconds_a, seconds_b, per)


def run_round(
    endpoint: Endpoint, upload: Upload, files: list[Path], check: RoundCheck | None = None
) -> float:
    """One timed upload; then check what arrived (and ``check``), and empty the home."""
    os.sync()  # earlier rounds' writeback stays out of this one
    after = check() if check else None
    seconds = timed(lambda: upload(endpoint))
    check_arrived(endpoint.home, files)
    if after is not None:
        after()
    clean_home(endpoint)
    return seconds


def check_arrived(home: Path, files: list[Path]) -> None:
    """Raise unless every local file is in ``home`` under its own name with its size."""
    for local in files:
        remote = home / local.name
        want = local.stat().st_size
        try:
            got = remote.stat().st_size
        except FileNotFoundError:
            raise RuntimeError(f"upload missing: {remote}") from None
        if got != want:
            raise RuntimeError(f"upload incomplete: {remote} has {got} of {want} bytes")


def _make_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for start in range(0, size, MIB):
            f.write(os.urandom(min(MIB, size - start)))
    return path


# ------------------------------------------------------------------ the clients


def _small_upload(servers: Servers, small: list[Path]) -> Upload:
    batch = "".join(f'put "{local}" "{local.name}"\n' for local in small)

    def upload(endpoint: Endpoint) -> None:
        _sftp_batch(servers, endpoint, batch)

    return upload


def _sftp_batch(servers: Servers, endpoint: Endpoint, batch: str, flags: Sequence[str] = ()) -> str:
    """OpenSSH's ``sftp`` client running ``batch`` in one session; its output; raise if it fails.

    ``flags`` go to ``sftp`` before the others (e.g. ``-B 512 -R 64``).
    """
    options = {
        "Ciphers": CIPHER,
        "StrictHostKeyChecking": "no",
        "UserKnownHostsFile": "/dev/null",
        "BatchMode": "yes",
        "IdentitiesOnly": "yes",
    }
    argv = ["sftp", *flags, "-b", "-", "-P", str(endpoint.port), "-i", str(servers.key)]
    argv += ["-F", "/dev/null"]
    for name, value in options.items():
        argv += ["-o", f"{name}={value}"]
    argv.append(f"{servers.login}@127.0.0.1")
    done = subprocess.run(
        argv, input=batch, capture_output=True, text=True, timeout=1800, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"sftp to {endpoint.name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def _paramiko_put(servers: Servers, endpoint: Endpoint, pkey: paramiko.PKey, local: Path) -> str:
    """Upload with paramiko; return the cipher it negotiated."""
    transport = paramiko.Transport(
        ("127.0.0.1", endpoint.port), default_window_size=WINDOW, default_max_packet_size=MAX_PACKET
    )
    try:
        transport.get_security_options().ciphers = (CIPHER,)
        transport.connect(username=servers.login, pkey=pkey)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        sftp.put(str(local), local.name)  # confirm=True: stats the result
        sftp.close()
        cipher: str = transport.local_cipher
        return cipher
    finally:
        transport.close()


async def _asyncssh_put(servers: Servers, endpoint: Endpoint, local: Path) -> int:
    """Upload with the asyncssh client; return the write size it used."""
    options: dict[str, Any] = {
        "username": servers.login,
        "client_keys": [str(servers.key)],
        "known_hosts": None,
        "agent_path": None,
        "config": None,
        "encryption_algs": [CIPHER],
        "window": WINDOW,
        "max_pktsize": MAX_PACKET,
    }
    async with (
        asyncssh.connect("127.0.0.1", endpoint.port, **options) as conn,
        conn.start_sftp_client() as sftp,
    ):
        await sftp.put(str(local), local.name)
        # put() writes min(local read limit, server's write limit) per request
        block: int = min(sftp.limits.max_write_len, asyncssh.sftp.MAX_SFTP_READ_LEN)
        return block
