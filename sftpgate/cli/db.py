"""``sftpgate db``: create or upgrade the database schema; say which version it has."""

from __future__ import annotations

import argparse
import json

from ..storage import open_backend
from .common import add_json_option, config_from

HELP = "Create or upgrade the database schema (migrate), or show its version (status)."


def register(parser: argparse.ArgumentParser) -> None:
    add_json_option(parser)
    parser.add_argument(
        "action",
        choices=("migrate", "status"),
        help="migrate: create the schema or upgrade it to this sftpgate's; "
        "status: the database's schema version and this sftpgate's",
    )


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    backend = open_backend(config)
    if args.action == "migrate":
        applied = backend.migrate()
        if args.json:
            done = {"backend": backend.name, "applied": applied, "version": backend.latest}
            print(json.dumps(done))
        elif applied:
            steps = ", ".join(str(v) for v in applied)
            print(f"sftpgate: {backend.name} schema migrated to version {backend.latest} ({steps})")
        else:
            print(f"sftpgate: {backend.name} schema is current (version {backend.latest})")
        return 0
    version = backend.schema_version()
    if args.json:
        print(json.dumps({"backend": backend.name, "version": version, "latest": backend.latest}))
    else:
        state = "current"
        if version > backend.latest:
            state = "ahead: upgrade sftpgate"
        elif version < backend.latest:
            state = "behind: run `sftpgate db migrate`"
        print(f"{backend.name} schema version {version}, this sftpgate's {backend.latest}: {state}")
    # Scripts (a deploy step) can test it: 0 current, 1 otherwise.
    return 0 if version == backend.latest else 1
