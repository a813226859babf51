"""Figures 10, 11 and 12: the OpenSSH front door against plain OpenSSH.

Both sides are a private Debian sshd with the same options, the same bench user
and home, and OpenSSH's ``sftp`` client; one runs ``Subsystem sftp`` =
sftp-server, the other ``sftpgate subsystem``, which relays to the same
sftp-server and sends events to the daemon in ``sftpgate serve`` (journal
``synchronous: full``), as packaging/openssh sets it up.

10. one big file, MB/s, tapped ÷ plain
11. many small files in one session, files/s
12. many short sessions one after another (one ``sftp`` run, one small upload
    each), sessions/s: here every session pays the tap's start-up

Rounds are timed from the client's side (until ``sftp`` exits). After each
round, untimed: every file must have arrived whole and, on the tapped side, the
daemon's journal must hold one complete upload row per file (figure 12: one
ended session per session); how long after the client those rows were all in
is reported as the journal lag. Then the home is emptied.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..common import Figure, Options, median
from ..servers import Endpoint, Servers, SubsystemSite, subsystem_site
from .transfer import BIG, CIPHER, MB, MIB, _make_file, _sftp_batch, _small_upload, measure_rates

JOURNAL_TIMEOUT = 60.0  # seconds the daemon may take to journal a round after the client ends
TITLE = "OpenSSH front door (sftpgate subsystem): "
NOT_SLOWER = (
    "Target ours (the issue sets none): the tap relays bytes unchanged and must not "
    "slow a transfer (DESIGN.md §10); 0.9 as for figure 3."
)

SIDES = ("subsystem", "openssh")  # endpoint names: tapped, plain

Upload = Callable[[Endpoint], object]


def run(servers: Servers, options: Options) -> list[Figure]:
    src = servers.workdir / "subsystem-src"
    src.mkdir()
    size = options.small_kib * 1024
    figures: list[Figure] = []
    try:
        with subsystem_site(servers) as site:
            if options.wants(10):
                big = _make_file(src / BIG, options.big_mib * MIB)
                figures.append(_figure10(servers, site, options, big))
                big.unlink()
            if options.wants(11):
                small = [
                    _make_file(src / f"small-{i:05d}", size) for i in range(options.small_files)
                ]
                figures.append(_figure11(servers, site, options, small))
            if options.wants(12):
                short = [
                    _make_file(src / f"session-{i:05d}", size)
                    for i in range(options.short_sessions)
                ]
                figures.append(_figure12(servers, site, options, short))
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return figures


# ------------------------------------------------------------------- the figures


def _figure10(servers: Servers, site: SubsystemSite, options: Options, big: Path) -> Figure:
    def upload(endpoint: Endpoint) -> None:
        _sftp_batch(servers, endpoint, f'put "{big}" "{BIG}"\n')

    return _rate_figure(
        10,
        f"{options.big_mib} MiB upload, OpenSSH sftp client",
        site,
        servers.openssh,
        upload,
        [big],
        options,
        unit="MB/s",
        per=big.stat().st_size / MB,
        target=">= 0.9",
        notes=NOT_SLOWER,
    )


def _figure11(servers: Servers, site: SubsystemSite, options: Options, small: list[Path]) -> Figure:
    return _rate_figure(
        11,
        f"{options.small_files} x {options.small_kib} KiB uploads, OpenSSH sftp client "
        "(one session)",
        site,
        servers.openssh,
        _small_upload(servers, small),
        small,
        options,
        unit="files/s",
        per=len(small),
        target=">= 0.9",
        notes=NOT_SLOWER,
    )


def _figure12(servers: Servers, site: SubsystemSite, options: Options, short: list[Path]) -> Figure:
    def upload(endpoint: Endpoint) -> None:
        for local in short:
            _sftp_batch(servers, endpoint, f'put "{local}" "{local.name}"\n')

    figure = _rate_figure(
        12,
        f"{options.short_sessions} short sessions one after another, each one "
        f"{options.small_kib} KiB upload, OpenSSH sftp client",
        site,
        servers.openssh,
        upload,
        short,
        options,
        unit="sessions/s",
        per=len(short),
        target=">= 0.7",
        sessions=len(short),
    )
    tapped, plain = (median(figure.extra[name]) / len(short) * 1000 for name in SIDES)
    figure.notes = (
        f"{tapped:.0f} vs {plain:.0f} ms a session (sftp starting ssh, key exchange, login, "
        "sshd starting the subsystem through /bin/sh, one put, exit): the difference is "
        "what starting `sftpgate subsystem` costs (a Python interpreter, its imports, "
        "sftp-server behind it, a connection to the daemon). Target ours (the issue sets "
        "none): at most ~40% more time a session. " + figure.notes
    )
    return figure


# ---------------------------------------------------------------- measuring


@dataclass
class _Journal:
    """Checks the daemon's journal after each tapped round; keeps how long it took."""

    site: SubsystemSite
    sessions: int = 0  # ended sessions each round must add (0: not checked)
    lags: list[float] = field(default_factory=list)

    def _query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        uri = f"file:{self.site.journal}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return db.execute(sql, params).fetchall()

    def mark(self) -> tuple[int, int]:
        """(last upload id, sessions ended) now."""
        ((last,),) = self._query("SELECT COALESCE(MAX(id), 0) FROM uploads")
        ((ended,),) = self._query("SELECT COUNT(*) FROM sessions WHERE ended_at IS NOT NULL")
        return int(str(last)), int(str(ended))

    def wait(self, since: tuple[int, int], files: list[Path]) -> None:
        """Wait until the upload rows after ``since`` are exactly ``files``, complete; or raise."""
        want = sorted(f"/{local.name}" for local in files)
        start = time.monotonic()
        while True:
            rows = self._query("SELECT path, state FROM uploads WHERE id > ?", since[0])
            bad = [(path, state) for path, state in rows if state != "complete"]
            if bad:
                raise RuntimeError(f"journal {self.site.journal}: uploads not complete: {bad[:5]}")
            got = sorted(str(path) for path, _ in rows)
            ended = self.mark()[1] - since[1]
            if got == want and ended >= self.sessions:
                self.lags.append(time.monotonic() - start)
                return
            if time.monotonic() - start > JOURNAL_TIMEOUT:
                spooled = sorted(p.name for p in self.site.spool_dir.iterdir())
                raise RuntimeError(
                    f"journal {self.site.journal}: {len(got)} upload rows for {len(want)} files "
                    f"({sorted(set(got) ^ set(want))[:5]} differ), {ended} of "
                    f"{self.sessions} ended sessions after {JOURNAL_TIMEOUT:.0f} s; "
                    f"spool files: {spooled}"
                )
            time.sleep(0.01)


def _rate_figure(
    number: int,
    title: str,
    site: SubsystemSite,
    plain: Endpoint,
    upload: Upload,
    files: list[Path],
    options: Options,
    *,
    unit: str,
    per: float,
    target: str,
    sessions: int = 0,
    notes: str = "",
) -> Figure:
    """Interleave ``upload`` on the tapped sshd and the plain one; median rate ratio."""
    tapped = site.endpoint
    journal = _Journal(site, sessions)

    def check_journal() -> Callable[[], None]:
        since = journal.mark()
        return lambda: journal.wait(since, files)

    rates = measure_rates(tapped, plain, upload, files, options, per=per, check_a=check_journal)
    lag_ms = [lag * 1000 for lag in journal.lags]
    checked = (
        f"sshd + `sftpgate subsystem` ÷ sshd + sftp-server, cipher {CIPHER}. Every round "
        f"checked the files and their {len(files)} complete upload rows in the daemon's "
        f"journal (synchronous=full), all there at most {max(lag_ms):.0f} ms (median "
        f"{median(lag_ms):.0f} ms) after the client ended."
    )
    return Figure(
        number,
        TITLE + title,
        rates.measured(unit),
        rates.ratio,
        target,
        f"{checked} {notes}".strip(),
        extra={
            "unit": unit,
            tapped.name: rates.seconds_a,
            plain.name: rates.seconds_b,
            "seconds": "per round",
            "journal_lag_ms": lag_ms,
        },
    )
