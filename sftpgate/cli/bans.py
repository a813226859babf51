"""``sftpgate bans``: list, add and remove the defender's bans in the journal database."""

from __future__ import annotations

import argparse
import ipaddress
import json
import time
from datetime import UTC, datetime
from typing import Any

from ..defender import STRIKE_MEMORY, Ban, defender_session, source_of
from ..errors import NothingThere, UsageError
from ..events import Event, Op
from ..storage import open_backend
from .common import add_config_option, add_json_option, config_from

HELP = "List, add or remove banned addresses (a running gateway takes changes within seconds)."


def register(parser: argparse.ArgumentParser) -> None:
    add_json_option(parser)
    sub = parser.add_subparsers(dest="bans_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="List bans still in force.", description="List bans.")
    ls.add_argument("--all", action="store_true", help="also bans that ended within a day")
    add_config_option(ls)
    add_json_option(ls)
    add = sub.add_parser("add", help="Ban an address.", description="Ban an address now.")
    add.add_argument("address", help="an IPv4 or IPv6 address (IPv6 is banned by its /64)")
    add.add_argument(
        "--time", type=float, metavar="SECONDS", help="how long (default: defender.ban_time)"
    )
    add.add_argument("--reason", default="banned by an administrator")
    add_config_option(add)
    add_json_option(add)
    rm = sub.add_parser("remove", help="Lift a ban.", description="Lift the ban of an address.")
    rm.add_argument("address")
    add_config_option(rm)
    add_json_option(rm)


def _source(text: str) -> str:
    """The ban key of an address (an IPv6 address: its /64; a /64 as ``list`` shows it)."""
    address, _, prefix = text.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"not an IP address: {text!r}") from None
    if prefix and not (ip.version == 6 and prefix == "64"):
        raise UsageError("ban one address; networks go in defender.blocklist")
    return source_of(address)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run(args: argparse.Namespace) -> int:
    from ..journal.bans import BanStore

    config = config_from(args)
    path = config.journal_path
    store: Any
    if config.database.url is not None:
        store = open_backend(config).bans()
    else:
        if args.bans_command == "list" and not path.exists():
            raise NothingThere(f"no journal at {path} yet")
        store = BanStore(path, synchronous=config.journal.synchronous)
    try:
        now = time.time()
        if args.bans_command == "list":
            for ban in store.list():
                if ban.until <= now and not args.all:
                    continue
                if args.json:
                    print(json.dumps({**ban.as_dict(), "active": ban.until > now}))
                else:
                    state = f"until {_when(ban.until)}" if ban.until > now else "ended"
                    print(f"{ban.address:<24} {state:<28} strike {ban.strikes:<3} {ban.reason}")
            return 0
        address = _source(args.address)
        if args.bans_command == "add":
            seconds = args.time if args.time is not None else config.defender.ban_time
            if seconds <= 0:
                raise UsageError("--time must be greater than 0")
            old = next((b for b in store.list() if b.address == address), None)
            strikes = old.strikes + 1 if old and now - old.until < STRIKE_MEMORY else 1
            ban = Ban(address, now + seconds, strikes, args.reason, now)
            store.upsert([ban])
            store.journal(
                Event(
                    Op.BAN,
                    defender_session(address),
                    message=f"banned for {seconds:.0f} s by sftpgate bans add: {args.reason}",
                    attrs={"until": ban.until, "strikes": strikes},
                )
            )
            if args.json:
                print(json.dumps(ban.as_dict()))
            else:
                print(f"banned {address} until {_when(ban.until)}")
            return 0
        removed = store.remove(address)
        if removed is None:
            raise NothingThere(f"{address} is not banned")
        store.journal(
            Event(Op.UNBAN, defender_session(address), message="ban lifted by sftpgate bans remove")
        )
        if args.json:
            print(json.dumps({"address": address, "lifted": True}))
        else:
            print(f"lifted the ban of {address}")
        return 0
    finally:
        store.close()
