"""Hostile customers racing the jail with SFTP alone (and a host-side flipper).

Each attack first proves that it is real — the link it builds does point
outside on the host — then runs, and checks that nothing outside the home
was read, written, listed, renamed or removed, and that the gateway refused
(so the race was actually hit, not just missed).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

from conftest import RunningGateway
from sftpgate.beneath import RENAME_EXCHANGE, renameat2

SECRET = b"SECRET-OUTSIDE-THE-HOME\n"
INSIDE = b"inside the home\n"
FLIP_SECONDS = 4.0  # each race runs this long at most (and stops early when done)
MAX_FLIPS = 2_000


@pytest.fixture
def outside(gateway: RunningGateway) -> Iterator[Path]:
    """<tmp>/outside beside <tmp>/homes/: a secret and a marker only it holds."""
    base = gateway.home("alice").parent.parent / "outside"
    base.mkdir()
    (base / "passwd").write_bytes(SECRET)
    (base / "only-outside").write_bytes(SECRET)
    yield base


def _outside_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["only-outside", "passwd"]
    assert (outside / "passwd").read_bytes() == SECRET
    assert (outside / "only-outside").read_bytes() == SECRET


def _plant_escape(sftp: paramiko.SFTPClient, home: Path, outside: Path, name: str) -> None:
    """The deep-link trick: a link made two folders down, then renamed up to the top.

    Made at /a/b, "/outside" in the user's view is stored as ../../outside;
    at the top of the home the same text climbs two levels: to the real
    <tmp>/outside on the host.
    """
    sftp.mkdir("a")
    sftp.mkdir("a/b")
    sftp.symlink("/outside", "a/b/link")
    sftp.rename("a/b/link", name)
    assert os.path.realpath(home / name) == str(outside)  # the attack is real


def test_a_deep_link_renamed_up_to_the_top_reaches_nothing_outside(
    gateway: RunningGateway, outside: Path
) -> None:
    home = gateway.home("alice")
    sftp = gateway.sftp("alice")
    _plant_escape(sftp, home, outside, "l")
    sftp.putfo(io.BytesIO(b"x"), "x")
    attempts: list[Callable[[], object]] = [
        lambda: sftp.open("l/passwd").read(),
        lambda: sftp.stat("l/passwd"),
        lambda: sftp.stat("l"),
        lambda: sftp.listdir("l"),
        lambda: sftp.putfo(io.BytesIO(b"planted"), "l/planted"),
        lambda: sftp.mkdir("l/dir"),
        lambda: sftp.rename("x", "l/x"),
        lambda: sftp.posix_rename("l/passwd", "stolen"),
        lambda: sftp.remove("l/only-outside"),
        lambda: sftp.symlink("x", "l/s"),
        lambda: sftp.chmod("l/passwd", 0o777),
        lambda: sftp.truncate("l/passwd", 0),
    ]
    for attempt in attempts:
        with pytest.raises(PermissionError):
            attempt()
    _outside_untouched(outside)
    # The link itself is the user's: it can be removed; where it points is not shown.
    with pytest.raises(PermissionError):
        sftp.readlink("l")
    sftp.remove("l")
    assert not os.path.lexists(home / "l")
    refused = gateway.wait_rows(
        lambda rs: sum(r["status"] == "permission_denied" for r in rs) >= 10
    )
    messages = {r["message"] for r in refused if r["status"] == "permission_denied"}
    assert messages and all(str(outside) not in m for m in messages), messages


@dataclass
class Tally:
    """What the attacking session managed and was refused while the names flipped."""

    ok: int = 0
    refused: int = 0
    other: int = 0
    leaks: list[str] = field(default_factory=list)

    def attempt(self, what: str, fn: Callable[[], object]) -> object:
        try:
            result = fn()
        except PermissionError:
            self.refused += 1
            return None
        except OSError:  # the name was away at that moment, and the like
            self.other += 1
            return None
        self.ok += 1
        return result


def _attack_through(sftp: paramiko.SFTPClient, tally: Tally, done: threading.Event) -> None:
    """Open, create, list, rename and remove through "d" until ``done``."""
    i = 0
    while not done.is_set():
        i += 1
        data = tally.attempt("read", lambda: sftp.open("d/passwd").read())
        if isinstance(data, bytes) and data != INSIDE:
            tally.leaks.append(f"read {data[:40]!r}")
        names = tally.attempt("list", lambda: sftp.listdir("d"))
        if isinstance(names, list) and "only-outside" in names:
            tally.leaks.append("listed the outside folder")
        tally.attempt("create", lambda n=i: sftp.putfo(io.BytesIO(b"new"), f"d/new-{n}"))
        tally.attempt("rename", lambda n=i: sftp.posix_rename(f"d/new-{n}", f"d/moved-{n}"))
        tally.attempt("remove", lambda n=i: sftp.remove(f"d/moved-{n}"))
        tally.attempt("mkdir", lambda n=i: sftp.mkdir(f"d/dir-{n}"))


def _race(
    gateway: RunningGateway, outside: Path, flip: Callable[[threading.Event], int]
) -> tuple[Tally, int]:
    home = gateway.home("alice")
    attacker = gateway.sftp("alice")
    attacker.mkdir("d")
    attacker.putfo(io.BytesIO(INSIDE), "d/passwd")
    _plant_escape(attacker, home, outside, "evil")
    tally = Tally()
    done = threading.Event()
    flips: list[int] = []

    def flipper() -> None:
        try:
            flips.append(flip(done))
        finally:
            done.set()

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        _attack_through(attacker, tally, done)
    finally:
        done.set()
        thread.join()
    assert not tally.leaks, tally.leaks[:5]
    _outside_untouched(outside)
    return tally, flips[0]


def test_a_second_session_flipping_names_never_lets_the_first_out(
    gateway: RunningGateway, outside: Path
) -> None:
    flipper = gateway.sftp("alice")

    def flip(done: threading.Event) -> int:
        deadline = time.monotonic() + FLIP_SECONDS
        n = 0
        while n < MAX_FLIPS and time.monotonic() < deadline:
            # d (the real folder) and evil (the link out) trade names
            for old, new in (("d", "tmp"), ("evil", "d"), ("d", "evil"), ("tmp", "d")):
                with contextlib.suppress(OSError):
                    flipper.posix_rename(old, new)
            n += 1
        return n

    tally, flips = _race(gateway, outside, flip)
    assert flips > 100
    # The race was hit both ways: work done inside, and refusals through the link.
    assert tally.ok > 20 and tally.refused > 0, tally


def test_a_host_side_exchange_flipper_never_lets_a_session_out(
    gateway: RunningGateway, outside: Path
) -> None:
    home = gateway.home("alice")

    def flip(done: threading.Event) -> int:
        fd = os.open(home, os.O_PATH | os.O_DIRECTORY)
        deadline = time.monotonic() + FLIP_SECONDS
        n = 0
        try:
            while not done.is_set() and time.monotonic() < deadline and n < 200_000:
                renameat2(fd, b"d", fd, b"evil", RENAME_EXCHANGE)
                n += 1
        finally:
            os.close(fd)
        return n

    tally, flips = _race(gateway, outside, flip)
    assert flips > 1_000
    assert tally.ok > 20 and tally.refused > 0, tally
