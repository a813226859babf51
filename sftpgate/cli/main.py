"""``sftpgate`` entry point: ``main(args=None)`` is what tests call."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from .. import __version__
from ..errors import SftpgateError
from .common import CONFIG_HELP, DEFAULT_CONFIG, add_config_option

EXIT_CODES = """\
exit codes:
  0    done (also when the reader of the output went away, as with | head)
  1    it failed: nothing there to read (no journal yet, no such job or ban),
       the database cannot be reached, the gateway cannot listen;
       `db status`: the schema differs from this sftpgate's
  2    bad usage (an unknown option, a bad value) or a bad config (the
       message names the file and the key), or a schema to migrate first
  130  interrupted (Ctrl-C); serve, worker and journal --follow take Ctrl-C
       (and SIGTERM) as their way to stop, and exit 0 (serve after its drain);
       a second Ctrl-C during serve's or worker's stop: 130, at once
  143  a second SIGTERM during serve's or worker's stop: stopped at once,
       without draining (docs/deploy.md, "Stop, drain and reload")

--config (-c) goes anywhere (sftpgate -c FILE jobs show 1, sftpgate jobs
show 1 -c FILE); --json anywhere after the command (sftpgate jobs --json,
sftpgate bans list --json), one JSON object a line (JSON Lines)."""

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
    "api": "api",
}


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (a key of COMMANDS), imported now."""
    return importlib.import_module(f".{COMMANDS[name]}", __package__)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of command ``only`` alone (the others stay unimported)."""
    parser = argparse.ArgumentParser(
        prog="sftpgate",
        description="SFTP gateway with an audit journal and an upload pipeline.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sftpgate {__version__}")
    # The only defaults of --config and --json: every lower level declares them SUPPRESSed
    # (common.py), so that a value given before the command survives its subparser.
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    parser.set_defaults(json=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [only] if only else COMMANDS:
        module = command_module(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        add_config_option(command)
        module.register(command)
        command.set_defaults(_run=module.run)
    return parser


def command_word(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` past the top-level options (``-c FILE``), or None."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-c", "--config"):
            i += 2
        elif word.startswith(("--config=", "-c")):
            i += 1
        else:
            return word if word in COMMANDS else None
    return None


def main(args: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (2 for a bad config or usage)."""
    argv = list(sys.argv[1:] if args is None else args)
    # A command word needs that command's parser only (--help and --version, which
    # come before any command, need them all).
    only = command_word(argv)
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
