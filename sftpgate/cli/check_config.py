"""``sftpgate check-config``."""

from __future__ import annotations

import argparse
import sys

from ..config import check_homes
from .common import add_config_option, config_from

HELP = "Validate config.yaml and say what is wrong, naming the file and the key."


def register(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    problems = check_homes(config)
    for problem in problems:
        print(f"sftpgate: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"{args.config}: ok ({len(config.users)} users, port {config.server.port})")
    return 0
