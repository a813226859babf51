"""The defender and the door without sockets: scores, bans, lists, early drop, fair hashing.

The clock is injected (no test waits for a ban to end), and so is early
drop's random source. Events go to a list: these tests are about what the
defender decides, the journal rows are checked by the integration tests
(tests/test_hostile_door.py) through the real writer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sftpgate.config import DefenderConfig, DoorConfig, load_config
from sftpgate.defender import (
    STRIKE_MEMORY,
    Ban,
    BanSync,
    Defender,
    Door,
    Offence,
    ban_length,
    early_drop_chance,
    source_of,
)
from sftpgate.errors import ConfigError
from sftpgate.events import Event, Op
from sftpgate.journal.bans import BanStore
from sftpgate.passwords import FairHasher, HashQueueFull, hash_password


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Events(list[Event]):
    """Collects what the defender journals (a list standing in for the journal writer)."""

    def emit(self, event: Event) -> None:
        self.append(event)

    async def emit_durable(self, event: Event) -> None:
        self.append(event)

    def ops(self, op: Op) -> list[Event]:
        return [e for e in self if e.op is op]


CFG = DefenderConfig(
    threshold=10, observation_time=60.0, ban_time=100.0, max_ban_time=300.0, safelist=()
)


def test_failed_logins_past_the_threshold_ban_the_address_until_its_time() -> None:
    clock, events = Clock(), Events()
    d = Defender(CFG, events, clock=clock)
    for _ in range(9):
        assert d.record("198.51.100.7", Offence.FAILED_LOGIN) is None
    assert d.refusal("198.51.100.7") is None
    ban = d.record("198.51.100.7", Offence.FAILED_LOGIN)
    assert ban is not None and ban.until == clock.now + 100
    assert "banned until" in (d.refusal("198.51.100.7") or "")
    assert d.refusal("198.51.100.8") is None  # a neighbour is not
    assert len(events.ops(Op.BAN)) == 1
    clock.now += 99.9
    assert d.refusal("198.51.100.7") is not None
    clock.now += 0.2
    assert d.refusal("198.51.100.7") is None


def test_offences_older_than_the_window_no_longer_count() -> None:
    clock = Clock()
    d = Defender(CFG, Events(), clock=clock)
    for _ in range(9):
        d.record("198.51.100.7", Offence.FAILED_LOGIN)
        clock.now += 10  # 9 offences over 90 s: never 10 within 60 s
    assert d.record("198.51.100.7", Offence.FAILED_LOGIN) is None
    assert d.refusal("198.51.100.7") is None


def test_each_offence_has_its_own_score() -> None:
    d = Defender(CFG, Events(), clock=Clock())
    for _ in range(3):
        assert d.record("198.51.100.7", Offence.LIMIT) is None  # 3 each: 9
    assert d.record("198.51.100.7", Offence.LIMIT) is not None  # 12
    d2 = Defender(replace(CFG, score_no_auth=0), Events(), clock=Clock())
    for _ in range(50):
        assert d2.record("198.51.100.9", Offence.NO_AUTH) is None


def test_repeat_offenders_get_longer_bans_up_to_the_cap() -> None:
    assert [ban_length(CFG, n) for n in (1, 2, 3, 4)] == [100.0, 150.0, 225.0, 300.0]
    clock = Clock()
    d = Defender(CFG, Events(), clock=clock)
    lengths = []
    for _ in range(4):
        ban = None
        while ban is None:
            ban = d.record("198.51.100.7", Offence.UNKNOWN_USER)
        lengths.append(ban.until - ban.created_at)
        clock.now = ban.until + 1
    assert lengths == [100.0, 150.0, 225.0, 300.0]
    clock.now += STRIKE_MEMORY  # forgiven after a day
    ban = None
    while ban is None:
        ban = d.record("198.51.100.7", Offence.UNKNOWN_USER)
    assert ban.strikes == 1


def test_safelisted_addresses_are_never_banned_and_blocklisted_always_refused() -> None:
    cfg = replace(CFG, safelist=("203.0.113.0/24",), blocklist=("192.0.2.66", "2001:db8:bad::/48"))
    d = Defender(cfg, Events(), clock=Clock())
    for _ in range(100):
        assert d.record("203.0.113.9", Offence.FAILED_LOGIN) is None
    assert d.refusal("203.0.113.9") is None
    assert d.refusal("192.0.2.66") == "blocklisted"
    assert d.refusal("::ffff:192.0.2.66") == "blocklisted"
    assert d.refusal("2001:db8:bad:1::5") == "blocklisted"
    assert d.refusal("2001:db8:bad0::5") is None


def test_ipv6_is_scored_and_banned_by_its_64() -> None:
    assert source_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_of("::ffff:198.51.100.7") == "198.51.100.7"
    d = Defender(CFG, Events(), clock=Clock())
    for n in range(10):  # a fresh address of the same /64 for every attempt
        d.record(f"2001:db8:1:2::{n + 1:x}", Offence.FAILED_LOGIN)
    assert d.refusal("2001:db8:1:2::ffff") is not None
    assert d.refusal("2001:db8:1:3::1") is None


def test_refusals_are_journaled_at_a_bounded_rate_with_a_count_of_the_rest() -> None:
    clock, events = Clock(), Events()
    d = Defender(replace(CFG, score_limit=0), events, clock=clock)
    for _ in range(1000):
        d.refused("198.51.100.7", 4000, "too many", offence=Offence.LIMIT)
    assert len(events.ops(Op.REFUSED)) == 5
    clock.now += 1
    d.refused("198.51.100.7", 4000, "too many", offence=Offence.LIMIT)
    last = events.ops(Op.REFUSED)[-1]
    assert last.attrs == {"skipped": 995} and "995 more" in (last.message or "")


def test_early_drop_follows_openssh_maxstartups() -> None:
    assert early_drop_chance(9, 10, 30, 100) == 0
    assert early_drop_chance(10, 10, 30, 100) == pytest.approx(0.30)
    assert early_drop_chance(55, 10, 30, 100) == pytest.approx(0.65)
    assert early_drop_chance(100, 10, 30, 100) == 1


def test_the_door_caps_unauthenticated_connections_per_address_and_in_all() -> None:
    cfg = DoorConfig(max_startups="4:50:6", max_startups_per_address=2)
    never = Door(cfg, descriptors=1024, chance=lambda: 0.99)
    assert never.arrive("198.51.100.1") is None
    assert never.arrive("198.51.100.1") is None
    assert "from 198.51.100.1" in (never.arrive("198.51.100.1") or "")
    assert never.arrive("198.51.100.1", trusted=True) is None  # a safelisted address
    never.leave_unauthenticated("198.51.100.1")
    assert never.arrive("198.51.100.2") is None
    assert never.arrive("198.51.100.2") is None
    # 4 open: from now on half are dropped; this source never draws below 0.5
    assert never.arrive("198.51.100.3") is None
    assert never.arrive("198.51.100.4") is None
    assert "dropping from 4" in (never.arrive("198.51.100.5") or "")  # 6: full
    never.leave_unauthenticated("198.51.100.1")
    always = Door(cfg, descriptors=1024, chance=lambda: 0.0)
    for n in range(4):
        assert always.arrive(f"198.51.100.{n}") is None
    assert always.arrive("198.51.100.9") is not None
    # a small descriptor limit shrinks "full": connections never take them all
    small = Door(DoorConfig(max_startups="64:30:256"), descriptors=1024)
    assert (small.start, small.full, small.max_sessions) == (64, 256, 256)
    tiny = Door(DoorConfig(max_startups="64:30:256"), descriptors=128)
    assert (tiny.start, tiny.full, tiny.max_sessions) == (32, 32, 32)


def test_the_door_caps_sessions_per_user_per_address_and_in_all() -> None:
    door = Door(
        DoorConfig(max_sessions_per_user=2, max_sessions_per_address=2, max_sessions=4),
        descriptors=1024,
    )
    assert door.login("198.51.100.1", "alice") is None
    assert door.login("198.51.100.2", "alice") is None
    assert "for alice" in (door.login("198.51.100.3", "alice") or "")
    assert door.login("198.51.100.1", "bob") is None
    assert "from 198.51.100.1" in (door.login("198.51.100.1", "carol") or "")
    assert door.login("198.51.100.1", "carol", trusted=True) is None
    door.logout("198.51.100.1", "carol")
    assert door.login("198.51.100.5", "carol") is None
    assert "at most 4" in (door.login("198.51.100.6", "dave") or "")
    door.logout("198.51.100.2", "alice")
    assert door.login("198.51.100.6", "alice") is None


def test_password_checks_are_served_round_robin_between_addresses() -> None:
    hashed = hash_password("right", log_n=13)  # ~20 ms a check

    async def scenario() -> tuple[list[str], bool]:
        hasher = FairHasher(threads=1, per_source=20)
        done: list[str] = []

        async def attempt(source: str) -> None:
            await hasher.verify(source, "wrong", hashed)
            done.append(source)

        try:
            spray = [asyncio.create_task(attempt("198.51.100.66")) for _ in range(12)]
            await asyncio.sleep(0)
            await attempt("192.0.2.1")  # queued behind 12 of the sprayer's
            ok = await hasher.verify("192.0.2.1", "right", hashed)
            await asyncio.gather(*spray)
            return done, ok
        finally:
            hasher.close()

    done, ok = asyncio.run(scenario())
    assert ok
    # the bystander's check ran after at most two of the sprayer's, not after twelve
    assert done.index("192.0.2.1") <= 2, done


def test_an_address_over_its_queue_fails_at_once() -> None:
    hashed = hash_password("right", log_n=12)

    async def scenario() -> int:
        hasher = FairHasher(threads=1, per_source=3)
        try:
            tasks = [
                asyncio.ensure_future(hasher.verify("198.51.100.66", "x", hashed))
                for _ in range(10)
            ]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return sum(isinstance(r, HashQueueFull) for r in results)
        finally:
            hasher.close()

    assert asyncio.run(scenario()) == 6  # one running, three waiting, six refused


def test_bans_go_to_the_database_and_each_end_is_seen_once(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "journal.sqlite3"
    delivered: list[tuple[list[Ban], list[Ban], list[Ban]]] = []
    sync = BanSync(path, 3600, lambda *got: delivered.append(got), clock=clock)
    sync.start()
    try:
        ban = Ban("198.51.100.7", clock.now + 100, 1, "test", clock.now)
        sync.persist(ban)
        deadline = time.monotonic() + 10
        while not any(ban in written for _, written, _ in delivered):
            assert time.monotonic() < deadline, delivered
            time.sleep(0.01)
    finally:
        sync.stop()
    other = BanStore(path)  # a second gateway on the same database
    try:
        rows, lifted = other.load(clock.now, STRIKE_MEMORY)
        assert rows == [ban] and lifted == []
        rows, lifted = other.load(clock.now + 101, STRIKE_MEMORY)
        assert lifted == [ban]
        assert other.load(clock.now + 102, STRIKE_MEMORY)[1] == []  # journaled by one only
        assert other.load(clock.now + 101 + STRIKE_MEMORY, STRIKE_MEMORY)[0] == []
    finally:
        other.close()


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("algorithms", {"kex": ["curve25519-sha256", "dh-made-up"]}, "algorithms.kex[1]"),
        ("algorithms", {"macs": []}, "algorithms.macs: must name at least one"),
        ("defender", {"safelist": ["10.0.0.0/8", "nonsense"]}, "defender.safelist[1]"),
        ("door", {"max_startups": "10:30"}, "door.max_startups: must be start:rate:full"),
        ("door", {"max_startups": "50:30:10"}, "door.max_startups: needs 0 < start"),
        ("defender", {"ban_time_increment": 0.5}, "defender.ban_time_increment"),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, section: str, values: dict[str, object], message: str
) -> None:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({section: values}))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, environ={})
