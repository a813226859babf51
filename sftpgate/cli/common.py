"""Options and helpers shared by the commands.

``--config`` is accepted anywhere on the line: at the top (``sftpgate -c f
jobs``), after the command (``sftpgate jobs -c f show 1``) and after the action
(``sftpgate jobs show 1 -c f``); ``--json`` anywhere after the command of a
listing (``sftpgate jobs --json``, ``sftpgate jobs list --json``), nowhere a
command lists nothing, so it is never silently ignored. Every level declares them
with ``default=argparse.SUPPRESS``: argparse copies a subparser's namespace over
its parent's, so a default at a lower level would undo a value given higher up.
The one default of each lives in ``main.build_parser``.
"""

from __future__ import annotations

import argparse
import os

from ..config import Config, load_config

DEFAULT_CONFIG = os.environ.get("SFTPGATE_CONFIG", "/etc/sftpgate/config.yaml")

CONFIG_HELP = "path to config.yaml (default: $SFTPGATE_CONFIG or /etc/sftpgate/config.yaml)"
JSON_HELP = "one JSON object a line (JSON Lines), for scripts"


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=argparse.SUPPRESS, help=CONFIG_HELP)


def add_json_option(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)


def config_from(args: argparse.Namespace) -> Config:
    """Load the config named by ``--config``; raises ConfigError."""
    return load_config(args.config)
