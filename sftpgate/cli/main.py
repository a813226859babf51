"""``sftpgate`` entry point: ``main(args=None)`` is what tests call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from .. import __version__
from ..errors import SftpgateError
from . import check_config, jobs, journal, serve, subsystem, users, worker

# Each command module offers HELP, register(parser) and run(args) -> exit code.
COMMANDS: dict[str, ModuleType] = {
    "serve": serve,
    "check-config": check_config,
    "users": users,
    "journal": journal,
    "jobs": jobs,
    "worker": worker,
    "subsystem": subsystem,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftpgate", description="SFTP gateway with an audit journal and an upload pipeline."
    )
    parser.add_argument("--version", action="version", version=f"sftpgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.register(command)
        command.set_defaults(_run=module.run)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (2 for a bad config or usage)."""
    parsed = build_parser().parse_args(args)
    run: Callable[[argparse.Namespace], int] = parsed._run
    try:
        return run(parsed)
    except SftpgateError as exc:
        print(f"sftpgate: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
