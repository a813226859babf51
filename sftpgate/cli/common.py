"""Options and helpers shared by the commands."""

from __future__ import annotations

import argparse
import os

from ..config import Config, load_config

DEFAULT_CONFIG = os.environ.get("SFTPGATE_CONFIG", "/etc/sftpgate/config.yaml")


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        help="path to config.yaml (default: $SFTPGATE_CONFIG or /etc/sftpgate/config.yaml)",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object a line, for scripts")


def config_from(args: argparse.Namespace) -> Config:
    """Load the config named by ``--config``; raises ConfigError."""
    return load_config(args.config)
