"""``sftpgate check-config``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import check_homes, reference_markdown
from ..configschema import splice
from ..errors import ConfigError, UsageError
from .common import config_from

HELP = "Validate config.yaml and say what is wrong, naming the file and the key."


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--docs",
        nargs="?",
        const="-",
        metavar="FILE",
        help="print the reference of every key (no config is read); with FILE, rewrite the "
        "generated part of FILE (docs/configuration.md) instead",
    )


def run(args: argparse.Namespace) -> int:
    if args.docs is not None:
        return _docs(args.docs)
    config = config_from(args)
    problems = check_homes(config)
    if problems:
        raise ConfigError("\nsftpgate: ".join(problems))
    print(f"{args.config}: ok ({len(config.users)} users, port {config.server.port})")
    return 0


def _docs(target: str) -> int:
    if target == "-":
        print(reference_markdown(), end="")
        return 0
    path = Path(target)
    try:
        path.write_text(splice(path.read_text(encoding="utf-8"), reference_markdown()))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    print(f"{path}: reference rewritten")
    return 0
