"""``sftpgate api``: make an admin API token (docs/api.md)."""

from __future__ import annotations

import argparse
import json
import re

from ..errors import UsageError
from .common import add_config_option, add_json_option

HELP = "Make a token for the admin HTTP API: prints it once, and the line for api.tokens."


def register(parser: argparse.ArgumentParser) -> None:
    add_json_option(parser)
    sub = parser.add_subparsers(dest="api_command", required=True, metavar="ACTION")
    text = "Print a new random token and its api.tokens entry (the config keeps only the hash)."
    token = sub.add_parser("token", help=text, description=text)
    token.add_argument("--name", required=True, help="who or what uses it (journaled)")
    token.add_argument(
        "--role",
        required=True,
        choices=("read", "admin"),
        help="read: GET endpoints; admin: also disconnect, retry, cancel, replay, reload, ban",
    )
    add_config_option(token)  # read by no one; accepted so that every action takes it
    add_json_option(token)


def run(args: argparse.Namespace) -> int:
    from ..api.auth import new_token, token_hash

    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", args.name):
        raise UsageError("--name: 1-64 letters, digits, _ . @ -")
    token = new_token()
    entry = {"name": args.name, "hash": token_hash(token), "role": args.role}
    if args.json:
        print(json.dumps({"token": token, **entry}))
        return 0
    print(f"token (shown once; send it as `Authorization: Bearer <token>`):\n  {token}")
    print("add to config.yaml under api.tokens:")
    print(f'  - {{name: {args.name}, hash: "{entry["hash"]}", role: {args.role}}}')
    return 0
