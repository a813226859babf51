"""``sftpgate users``: helpers for the users section of config.yaml."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from ..errors import SftpgateError
from ..passwords import hash_password
from .common import add_config_option, add_json_option, config_from

HELP = "Manage users: hash a password to paste into config.yaml, list configured users."


def register(parser: argparse.ArgumentParser) -> None:
    add_json_option(parser)
    sub = parser.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    hp = sub.add_parser(
        "hash-password",
        help="Print a password hash for users[].password_hash.",
        description="Print a password hash for users[].password_hash.",
    )
    hp.add_argument(
        "--stdin", action="store_true", help="read the password from standard input (one line)"
    )
    add_config_option(hp)  # read by no one; accepted so that every action takes it
    add_json_option(hp)
    ls = sub.add_parser("list", help="List the users in config.yaml.", description="List users.")
    add_config_option(ls)
    add_json_option(ls)


def run(args: argparse.Namespace) -> int:
    if args.users_command == "hash-password":
        if args.stdin or not sys.stdin.isatty():
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                raise SftpgateError("passwords differ")
        if not password:
            raise SftpgateError("empty password")
        hashed = hash_password(password)
        print(json.dumps({"password_hash": hashed}) if args.json else hashed)
        return 0
    config = config_from(args)
    for user in config.users:
        row = {
            "login": user.login,
            "name": user.name,
            "surname": user.surname,
            "email": user.email,
            "home": str(user.home),
            "auth": "+".join(
                m
                for m, on in (("password", user.password_hash), ("publickey", user.authorized_keys))
                if on
            ),
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"{row['login']:<16} {row['name']} {row['surname']} <{row['email']}>  "
                f"{row['home']}  [{row['auth']}]"
            )
    return 0
