"""Figures 14 and 15: pipelined small requests and a big download, OpenSSH's ``sftp`` client.

14. one file moved in many small requests with many outstanding, in one
    ``sftp`` session, up (``put``) and down (``get``), requests/s, sftpgate ÷
    OpenSSH. Two shapes: ``sftp -B 512 -R 64`` (``options.pipelined_requests``
    requests of 512 bytes, 64 outstanding) and the extreme ``sftp -B 5 -R 10``
    (requests of 5 bytes, 10 outstanding). A row per shape and direction.
15. one big file downloaded (``get`` with the client's defaults: 64 requests
    outstanding, each as big as the server's limits@openssh.com allows: 256 KiB
    from sftpgate, 255 KiB from sftp-server), MB/s, sftpgate ÷ OpenSSH.

Each round is one ``sftp`` run; what is timed is the transfer inside it, by
the session's own clock (``!date`` before and after the command): the whole
run includes ssh's start, key exchange and login, which cost sshd ~0.15 s
more than the gateway here, as much as a whole 4,000-request transfer. The
notes give both. Every round is checked, untimed: a download's bytes are
compared with the source, an upload's bytes with what arrived in the home
and, on sftpgate's side, the journal must hold exactly one complete upload
row for it, with its size. Then the home is emptied (uploads) or the local
copy removed (downloads).
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..common import Figure, Options, interleave, median, timed
from ..servers import Endpoint, Servers
from .transfer import CIPHER, MB, MIB, RoundCheck, _make_file, _sftp_batch, run_round

# (buffer bytes, requests outstanding): sftp -B, sftp -R
SHAPES = ((512, 64), (5, 10))
STAMP = "date +%s.%N"
JOURNAL_TIMEOUT = 30.0  # seconds the gateway may take to journal an upload after the client


def run(servers: Servers, options: Options) -> list[Figure]:
    src = servers.workdir / "requests-src"
    dst = servers.workdir / "requests-dst"
    src.mkdir()
    dst.mkdir()
    figures: list[Figure] = []
    try:
        if options.wants(14):
            figures += _figure14(servers, options, src, dst)
        if options.wants(15):
            big = _make_file(src / "download-big.bin", options.big_mib * MIB)
            figures.append(_figure15(servers, options, big, dst))
            big.unlink()
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    return figures


# ------------------------------------------------------------------- the figures


def _figure14(servers: Servers, options: Options, src: Path, dst: Path) -> list[Figure]:
    count = options.pipelined_requests
    figures = []
    for block, outstanding in SHAPES:
        local = _make_file(src / f"pipelined-{block}-{outstanding}.bin", count * block)
        flags = ["-B", str(block), "-R", str(outstanding)]
        shape = (
            f"{count} requests of {block} B, {outstanding} outstanding "
            f"(`sftp -B {block} -R {outstanding}`)"
        )
        up = _upload_rounds(servers, options, local, flags)
        down = _download_rounds(servers, options, local, dst, flags)
        for direction, rounds in (("up", up), ("down", down)):
            figures.append(
                _figure(
                    14,
                    f"pipelined small requests, {direction}: {shape}, one session",
                    rounds,
                    count,
                    "requests/s",
                    notes=f"cipher {CIPHER}",
                )
            )
        local.unlink()
    return figures


def _figure15(servers: Servers, options: Options, big: Path, dst: Path) -> Figure:
    rounds = _download_rounds(servers, options, big, dst, [])
    return _figure(
        15,
        f"{options.big_mib} MiB download, OpenSSH sftp client",
        rounds,
        big.stat().st_size / MB,
        "MB/s",
        notes=f"cipher {CIPHER}; `get` with the client's defaults (64 reads outstanding, "
        "each as big as limits@openssh.com allows: 256 KiB here, 255 KiB from sftp-server); "
        "the file sits in the home (in the page cache after the warm-up) "
        "and is written to a local file",
    )


# ---------------------------------------------------------------- measuring


@dataclass
class Rounds:
    """Per kept round: the transfer's seconds, and the whole ``sftp`` run's, of each side."""

    sftpgate: list[float] = field(default_factory=list)
    openssh: list[float] = field(default_factory=list)
    whole: dict[str, list[float]] = field(default_factory=dict)


def _figure(
    number: int, title: str, rounds: Rounds, per: float, unit: str, *, notes: str
) -> Figure:
    rate_a = median([per / s for s in rounds.sftpgate])
    rate_b = median([per / s for s in rounds.openssh])
    digits = 0 if min(rate_a, rate_b) >= 10 else 1
    whole_a, whole_b = (median(rounds.whole[side]) for side in ("sftpgate", "openssh"))
    return Figure(
        number,
        title,
        f"{rate_a:.{digits}f} vs {rate_b:.{digits}f} {unit}",
        rate_a / rate_b,
        ">= 1.0",
        f"{notes}; the transfer {median(rounds.sftpgate):.3f} vs {median(rounds.openssh):.3f} s "
        f"(timed inside the session), the whole `sftp` run {whole_a:.3f} vs {whole_b:.3f} s "
        "(ssh's start, key exchange and login included); every round's bytes compared"
        + (", and sftpgate's journal row for every upload" if "up:" in title else ""),
        extra={
            "unit": unit,
            "sftpgate": rounds.sftpgate,
            "openssh": rounds.openssh,
            "whole": rounds.whole,
            "seconds": "per round",
        },
    )


def _timed_batch(servers: Servers, endpoint: Endpoint, command: str, flags: list[str]) -> float:
    """Run ``command`` in one ``sftp`` session; seconds it took, from the session's own clock.

    ``!date`` before and after it (a local command sftp runs between requests)
    leaves ssh's start, key exchange and login out of the time; what is left in
    is one fork of a shell, the same on both sides.
    """
    out = _sftp_batch(servers, endpoint, f"!{STAMP}\n{command}\n!{STAMP}\n", flags)
    stamps = [float(line) for line in out.splitlines() if line.strip().replace(".", "").isdigit()]
    if len(stamps) != 2:
        raise RuntimeError(f"sftp to {endpoint.name}: no time stamps in {out[-500:]!r}")
    return stamps[1] - stamps[0]


def _kept(rounds: Rounds, options: Options, a: list[float], b: list[float]) -> Rounds:
    """Drop the warm-up rounds' whole-run times (the transfer times come kept from interleave)."""
    for side in ("sftpgate", "openssh"):
        rounds.whole[side] = rounds.whole.get(side, [])[options.warmup :]
    rounds.sftpgate, rounds.openssh = a, b
    return rounds


def _upload_rounds(servers: Servers, options: Options, local: Path, flags: list[str]) -> Rounds:
    journal = _Journal(servers.config.parent / "state" / "journal.sqlite3")
    rounds = Rounds()
    transfer: dict[str, float] = {}

    def upload(endpoint: Endpoint) -> None:
        transfer[endpoint.name] = _timed_batch(
            servers, endpoint, f'put "{local}" "{local.name}"', flags
        )

    def same_bytes(endpoint: Endpoint) -> Callable[[], None]:
        return lambda: _compare(local, endpoint.home / local.name)

    def gateway_check() -> Callable[[], None]:
        since = journal.mark()

        def after() -> None:
            _compare(local, servers.sftpgate.home / local.name)
            journal.wait(since, local)

        return after

    def one(endpoint: Endpoint, check: RoundCheck) -> float:
        rounds.whole.setdefault(endpoint.name, []).append(
            run_round(endpoint, upload, [local], check)
        )
        return transfer[endpoint.name]

    a, b = interleave(
        lambda: one(servers.sftpgate, gateway_check),
        lambda: one(servers.openssh, lambda: same_bytes(servers.openssh)),
        rounds=options.rounds,
        warmup=options.warmup,
    )
    return _kept(rounds, options, a, b)


def _download_rounds(
    servers: Servers, options: Options, source: Path, dst: Path, flags: list[str]
) -> Rounds:
    # Both servers serve the one home (see running_servers): the file is put there once.
    home = servers.sftpgate.home
    remote = home / source.name
    shutil.copyfile(source, remote)
    st = home.stat()
    os.chown(remote, st.st_uid, st.st_gid)
    local = dst / source.name
    rounds = Rounds()

    def download(endpoint: Endpoint) -> float:
        os.sync()
        seconds: list[float] = []
        whole = timed(
            lambda: seconds.append(
                _timed_batch(servers, endpoint, f'get "{source.name}" "{local}"', flags)
            )
        )
        rounds.whole.setdefault(endpoint.name, []).append(whole)
        _compare(source, local)
        local.unlink()
        return seconds[0]

    try:
        a, b = interleave(
            lambda: download(servers.sftpgate),
            lambda: download(servers.openssh),
            rounds=options.rounds,
            warmup=options.warmup,
        )
    finally:
        remote.unlink()
    return _kept(rounds, options, a, b)


def _compare(want: Path, got: Path) -> None:
    if not got.exists():
        raise RuntimeError(f"missing: {got}")
    if not filecmp.cmp(want, got, shallow=False):
        raise RuntimeError(f"{got}: not the bytes of {want} ({got.stat().st_size} bytes)")


@dataclass
class _Journal:
    """The gateway's journal: one complete upload row per upload round."""

    path: Path

    def _query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        uri = f"file:{self.path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return db.execute(sql, params).fetchall()

    def mark(self) -> int:
        ((last,),) = self._query("SELECT COALESCE(MAX(id), 0) FROM uploads")
        return int(str(last))

    def wait(self, since: int, local: Path) -> None:
        want = [(f"/{local.name}", local.stat().st_size, "complete")]
        start = time.monotonic()
        while True:
            rows = self._query("SELECT path, bytes, state FROM uploads WHERE id > ?", since)
            if rows == want:
                return
            if rows:
                raise RuntimeError(f"journal {self.path}: upload rows {rows}, want {want}")
            if time.monotonic() - start > JOURNAL_TIMEOUT:
                raise RuntimeError(
                    f"journal {self.path}: upload rows {rows} after {JOURNAL_TIMEOUT:.0f} s, "
                    f"want {want}"
                )
            time.sleep(0.01)
