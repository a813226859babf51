"""The defender: scores addresses for what they do wrong, bans them, and guards the door's limits.

Models: SFTPGo's defender (a score over an observation window, a ban past a
threshold, longer bans for repeat offenders, safelist and blocklist, bans
shared through the data provider), OpenSSH's ``PerSourcePenalties`` and
``MaxStartups`` (random early drop), fail2ban and ProFTPD's mod_ban.

Everything here runs on the event loop and never blocks: scores live in
memory; bans are applied in memory at once and written to the journal
database by :class:`BanSync`'s thread, which also re-reads the table every
``defender.reload_interval`` seconds (bans made by ``sftpgate bans`` or by
another gateway on the same database). The clock and the random source are
arguments, so tests drive ban expiry and early drop without waiting.

An IPv6 client is scored, banned and counted by its /64 (one customer's
network): an attacker holds a whole /64 and could otherwise pick a fresh
address for every attempt.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DefenderConfig, DoorConfig
from .events import Event, EventSink, Op, SessionInfo

if TYPE_CHECKING:
    from .passwords import FairHasher
    from .storage.ports import BanStore as BanStorePort

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# A ban's strikes are remembered this long after it ends: an address banned
# again within it gets a longer ban.
STRIKE_MEMORY = 86400.0
# Refusal rows at most this many a second; the rest are counted in the next one.
REFUSALS_PER_SECOND = 5.0


class Offence(str, Enum):
    """What an address did wrong; each has a score in :class:`DefenderConfig`."""

    FAILED_LOGIN = "failed_login"
    UNKNOWN_USER = "unknown_user"
    NO_AUTH = "no_auth"
    PROTOCOL_ERROR = "protocol_error"
    LIMIT = "limit"


_SCORE_KEYS = {
    Offence.FAILED_LOGIN: "score_failed_login",
    Offence.UNKNOWN_USER: "score_unknown_user",
    Offence.NO_AUTH: "score_no_auth",
    Offence.PROTOCOL_ERROR: "score_protocol_error",
    Offence.LIMIT: "score_limit",
}


def source_of(address: str) -> str:
    """The key an address is scored, banned and counted by: itself, or an IPv6 /64. Pure."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


def _networks(items: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(item, strict=False) for item in items]


def _in(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if not networks:
        return False
    try:
        text = address.split("/", 1)[0].split("%", 1)[0]
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True, slots=True)
class Ban:
    """One row of the ``bans`` table."""

    address: str
    until: float
    strikes: int
    reason: str
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "until": self.until,
            "strikes": self.strikes,
            "reason": self.reason,
            "created_at": self.created_at,
        }


def ban_length(cfg: DefenderConfig, strikes: int) -> float:
    """How long the ``strikes``-th ban of an address lasts. Pure."""
    length = cfg.ban_time * cfg.ban_time_increment ** max(0, strikes - 1)
    return float(min(length, cfg.max_ban_time))


def defender_session(address: str) -> SessionInfo:
    """The session rows about an address (bans, refusals) are journaled under."""
    return SessionInfo(id="defender", remote_addr=address, remote_port=0)


class Defender:
    """Per-address scores, the ban table in memory, the safelist and the blocklist.

    ``emit`` journals (the gateway's sink); ``persist`` is called with each new
    ban (the gateway's :class:`BanSync` writes it from its thread).
    """

    def __init__(
        self,
        cfg: DefenderConfig,
        sink: EventSink,
        *,
        clock: Clock = time.time,
        persist: Callable[[Ban], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._sink = sink
        self._clock = clock
        self._persist = persist
        self._safe = _networks(cfg.safelist)
        self._blocked = _networks(cfg.blocklist)
        self._scores: dict[str, deque[tuple[float, int]]] = {}
        self.bans: dict[str, Ban] = {}
        # Bans made here and not yet seen back from the database.
        self._unsynced: dict[str, Ban] = {}
        self._refusals = _RefusalLog(sink, clock)

    def reconfigure(self, cfg: DefenderConfig) -> None:
        """Take new scores, lists and times (SIGHUP); scores and bans so far stay."""
        self.cfg = cfg
        self._safe = _networks(cfg.safelist)
        self._blocked = _networks(cfg.blocklist)

    # -- questions asked at every connection --------------------------------------

    def safelisted(self, address: str) -> bool:
        return _in(address, self._safe)

    def refusal(self, address: str) -> str | None:
        """Why a connection from ``address`` is refused (blocklisted, banned), or None."""
        if self.safelisted(address):
            return None
        if _in(address, self._blocked):
            return "blocklisted"
        ban = self.bans.get(source_of(address))
        if ban is not None and ban.until > self._clock():
            return f"banned until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(ban.until))} UTC"
        return None

    def refused(self, address: str, port: int, why: str, *, offence: Offence | None) -> None:
        """Journal (rate-limited) a refused connection and score it."""
        self._refusals.note(address, port, why)
        if offence is not None:
            self.record(address, offence, why)

    # -- scoring -------------------------------------------------------------------

    def score(self, address: str) -> int:
        """The address's score within the observation window now (0 once banned)."""
        horizon = self._clock() - self.cfg.observation_time
        window = self._scores.get(source_of(address), ())
        return sum(points for at, points in window if at >= horizon)

    def record(self, address: str, offence: Offence, why: str = "") -> Ban | None:
        """Add ``offence`` to the address's score; ban it past the threshold. Returns a new ban."""
        if not self.cfg.enabled or self.safelisted(address):
            return None
        points = int(getattr(self.cfg, _SCORE_KEYS[offence]))
        if points <= 0:
            return None
        source = source_of(address)
        now = self._clock()
        current = self.bans.get(source)
        if current is not None and current.until > now:
            return None  # already banned: its connections are refused anyway
        window = self._scores.setdefault(source, deque())
        window.append((now, points))
        horizon = now - self.cfg.observation_time
        while window and window[0][0] < horizon:
            window.popleft()
        score = sum(p for _, p in window)
        if score < self.cfg.threshold:
            return None
        del self._scores[source]
        strikes = 1
        if current is not None and now - current.until < STRIKE_MEMORY:
            strikes = current.strikes + 1
        reason = f"score {score} within {self.cfg.observation_time:g} s (last: {offence.value})"
        ban = Ban(source, now + ban_length(self.cfg, strikes), strikes, reason, now)
        self._apply(ban)
        return ban

    def ban(self, address: str, seconds: float, reason: str) -> Ban:
        """Ban ``address`` now for ``seconds`` (counts as a strike)."""
        source = source_of(address)
        now = self._clock()
        current = self.bans.get(source)
        strikes = current.strikes + 1 if current and now - current.until < STRIKE_MEMORY else 1
        ban = Ban(source, now + seconds, strikes, reason, now)
        self._apply(ban)
        return ban

    def _apply(self, ban: Ban) -> None:
        self.bans[ban.address] = ban
        self._unsynced[ban.address] = ban
        length = ban.until - ban.created_at
        log.warning(
            "banned %s for %.0f s (strike %d): %s", ban.address, length, ban.strikes, ban.reason
        )
        self._sink.emit(
            Event(
                Op.BAN,
                defender_session(ban.address),
                time=ban.created_at,
                status="ok",
                message=f"banned for {length:.0f} s (strike {ban.strikes}): {ban.reason}",
                attrs={"until": ban.until, "strikes": ban.strikes},
            )
        )
        if self._persist is not None:
            self._persist(ban)

    # -- the table, from the database ------------------------------------------------

    def synced(self, rows: list[Ban], written: list[Ban], lifted: list[Ban]) -> None:
        """Take the table as :class:`BanSync` read it (on the loop).

        ``written`` are bans of ours now in the database; ``lifted`` those whose
        expiry this gateway was first to see (journaled here, once).
        """
        for ban in written:
            if self._unsynced.get(ban.address) is ban:
                del self._unsynced[ban.address]
        table = {ban.address: ban for ban in rows}
        for address, ban in self._unsynced.items():
            known = table.get(address)
            if known is None or known.created_at < ban.created_at:
                table[address] = ban
        for address, old in self.bans.items():
            if old.until > self._clock() and address not in table:
                log.info("ban of %s removed from the table", address)
        self.bans = table
        for ban in lifted:
            log.info("ban of %s ended", ban.address)
            self._sink.emit(
                Event(
                    Op.UNBAN,
                    defender_session(ban.address),
                    status="ok",
                    message=f"ban ended (strike {ban.strikes})",
                )
            )


class _RefusalLog:
    """Journals refused connections, at most :data:`REFUSALS_PER_SECOND` rows a second."""

    def __init__(self, sink: EventSink, clock: Clock) -> None:
        self._sink = sink
        self._clock = clock
        self._tokens = REFUSALS_PER_SECOND
        self._last = clock()
        self._skipped = 0

    def note(self, address: str, port: int, why: str) -> None:
        now = self._clock()
        self._tokens = min(
            REFUSALS_PER_SECOND, self._tokens + (now - self._last) * REFUSALS_PER_SECOND
        )
        self._last = now
        if self._tokens < 1:
            self._skipped += 1
            return
        self._tokens -= 1
        skipped, self._skipped = self._skipped, 0
        message = f"connection refused: {why}"
        if skipped:
            message += f" ({skipped} more refusals since the last row)"
        session = SessionInfo(id="door", remote_addr=address, remote_port=port)
        self._sink.emit(
            Event(
                Op.REFUSED,
                session,
                status="refused",
                message=message,
                attrs={"skipped": skipped} if skipped else None,
            )
        )


# -- connection limits ---------------------------------------------------------------------


def early_drop_chance(count: int, start: int, rate: int, full: int) -> float:
    """OpenSSH's ``MaxStartups``: the chance a new connection is dropped with ``count``
    unauthenticated ones open. 0 below ``start``, ``rate``% at it, rising to 100% at
    ``full``. Pure."""
    if count < start:
        return 0.0
    if count >= full:
        return 1.0
    if full == start:
        return 1.0
    return (rate + (100 - rate) * (count - start) / (full - start)) / 100


def descriptor_limit() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Door:
    """Counts connections before and after authentication, and says which to refuse.

    All on the loop. ``chance`` is the random source of early drop (a test
    passes one that always or never drops).
    """

    def __init__(
        self,
        cfg: DoorConfig,
        *,
        descriptors: int | None = None,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self.descriptors = descriptors if descriptors is not None else descriptor_limit()
        self._chance = chance
        self.reconfigure(cfg)
        self.unauthenticated = 0
        self._pre: dict[str, int] = {}
        self.sessions = 0
        self._by_user: dict[str, int] = {}
        self._by_source: dict[str, int] = {}

    def reconfigure(self, cfg: DoorConfig) -> None:
        """Take new limits (SIGHUP); the counts stay."""
        self.cfg = cfg
        start, rate, full = (int(p) for p in cfg.max_startups.split(":"))
        # Descriptors for files, the journal, the pools: connections never take them all.
        budget = max(16, self.descriptors // 4)
        self.full = min(full, budget)
        self.start = min(start, self.full)
        self.rate = rate
        self.max_sessions = cfg.max_sessions or budget

    def arrive(self, address: str, *, trusted: bool = False) -> str | None:
        """A new connection: None and counted, or why it is refused (not counted).

        ``trusted`` (safelisted) addresses skip the per-address cap, not the total.
        """
        source = source_of(address)
        if not trusted and self._pre.get(source, 0) >= self.cfg.max_startups_per_address:
            return (
                f"too many unauthenticated connections from {source} "
                f"(at most {self.cfg.max_startups_per_address})"
            )
        drop = early_drop_chance(self.unauthenticated, self.start, self.rate, self.full)
        if drop > 0 and (drop >= 1 or self._chance() < drop):
            return (
                f"too many unauthenticated connections ({self.unauthenticated}; "
                f"dropping from {self.start}, all at {self.full})"
            )
        self.unauthenticated += 1
        self._pre[source] = self._pre.get(source, 0) + 1
        return None

    def leave_unauthenticated(self, address: str) -> None:
        source = source_of(address)
        self.unauthenticated -= 1
        left = self._pre.get(source, 0) - 1
        if left > 0:
            self._pre[source] = left
        else:
            self._pre.pop(source, None)

    def login(self, address: str, login: str, *, trusted: bool = False) -> str | None:
        """An authenticated connection: None and counted, or why it is refused.

        ``trusted`` (safelisted) addresses skip the per-address cap.
        """
        source = source_of(address)
        if self._by_user.get(login, 0) >= self.cfg.max_sessions_per_user:
            return f"too many sessions for {login} (at most {self.cfg.max_sessions_per_user})"
        if not trusted and self._by_source.get(source, 0) >= self.cfg.max_sessions_per_address:
            return f"too many sessions from {source} (at most {self.cfg.max_sessions_per_address})"
        if self.sessions >= self.max_sessions:
            return f"too many sessions (at most {self.max_sessions})"
        self.sessions += 1
        self._by_user[login] = self._by_user.get(login, 0) + 1
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return None

    def logout(self, address: str, login: str) -> None:
        source = source_of(address)
        self.sessions -= 1
        for table, name in ((self._by_user, login), (self._by_source, source)):
            left = table.get(name, 0) - 1
            if left > 0:
                table[name] = left
            else:
                table.pop(name, None)


@dataclass(slots=True)
class Guard:
    """What the SSH layer consults at every connection: the defender, the door, the hasher."""

    defender: Defender
    door: Door
    hasher: FairHasher


# -- the ban table in the database ---------------------------------------------------------


class BanSync:
    """A thread that writes new bans to the journal database and re-reads the table.

    Every ``interval`` seconds (and at once after a new ban) it upserts the bans
    handed to :meth:`persist`, reads every ban still within its strike memory,
    marks those that have ended as lifted (only the first gateway to do so
    journals it), and hands the lot to ``deliver`` (which the gateway runs on
    the loop). Database errors are logged and retried at the next round.
    """

    def __init__(
        self,
        path: Path,
        interval: float,
        deliver: Callable[[list[Ban], list[Ban], list[Ban]], None],
        *,
        synchronous: str = "normal",
        clock: Clock = time.time,
        opener: Callable[[], BanStorePort] | None = None,
    ) -> None:
        # ``opener``: the ban store of another backend (PostgreSQL); default SQLite at ``path``.
        self._opener = opener
        self._path = path
        self._interval = interval
        self._deliver = deliver
        self._synchronous = synchronous
        self._clock = clock
        self._pending: list[Ban] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bans", daemon=True)
        self._thread.start()

    def persist(self, ban: Ban) -> None:
        with self._lock:
            self._pending.append(ban)
        self._wake.set()

    def stop(self) -> None:
        """Write what is pending and end the thread. Blocking."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def first_round(self) -> tuple[list[Ban], list[Ban]]:
        """Read the table once, now (before the gateway listens). Blocking."""
        store = self._open()
        try:
            return store.load(self._clock(), STRIKE_MEMORY)
        finally:
            store.close()

    def _open(self) -> BanStorePort:
        if self._opener is not None:
            return self._opener()
        from .journal.bans import BanStore

        return BanStore(self._path, synchronous=self._synchronous)

    def _run(self) -> None:
        store: BanStorePort | None = None
        while True:
            stopping = self._stop.is_set()
            try:
                if store is None:
                    store = self._open()
                with self._lock:
                    pending, self._pending = self._pending, []
                try:
                    store.upsert(pending)
                except Exception:
                    with self._lock:
                        self._pending[:0] = pending
                    raise
                rows, lifted = store.load(self._clock(), STRIKE_MEMORY)
                self.rounds += 1
                if not stopping:
                    self._deliver(rows, pending, lifted)
            except Exception:
                log.exception("ban table: reading or writing failed; retrying")
            if stopping:
                break
            self._wake.wait(self._interval)
            self._wake.clear()
        if store is not None:
            store.close()
