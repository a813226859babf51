"""``sftpgate`` entry point: ``main(args=None)`` is what tests call."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from .. import __version__
from ..errors import SftpgateError

# Each command module offers HELP, register(parser) and run(args) -> exit code.
# Modules are imported only for the command that runs: sshd starts `subsystem`
# for every OpenSSH session, and importing serve's world (asyncssh, the journal,
# the pipeline) would add ~0.25 s to each one.
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "check-config": "check_config",
    "users": "users",
    "journal": "journal",
    "jobs": "jobs",
    "bans": "bans",
    "db": "db",
    "worker": "worker",
    "subsystem": "subsystem",
}


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (a key of COMMANDS), imported now."""
    return importlib.import_module(f".{COMMANDS[name]}", __package__)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of command ``only`` alone (the others stay unimported)."""
    parser = argparse.ArgumentParser(
        prog="sftpgate", description="SFTP gateway with an audit journal and an upload pipeline."
    )
    parser.add_argument("--version", action="version", version=f"sftpgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [only] if only else COMMANDS:
        module = command_module(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.register(command)
        command.set_defaults(_run=module.run)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (2 for a bad config or usage)."""
    argv = list(sys.argv[1:] if args is None else args)
    # Top-level options (--help, --version) come before the command: a first
    # word that names a command needs that command's parser only.
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parsed = build_parser(only).parse_args(argv)
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
