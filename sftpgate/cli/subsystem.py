"""``sftpgate subsystem``: what sshd runs as ``Subsystem sftp``."""

from __future__ import annotations

import argparse
import os

from ..config import DEFAULT_TEMP_PATTERNS, SubsystemConfig, load_config
from ..errors import ConfigError

HELP = "Relay an OpenSSH session to sftp-server and journal it (sshd's Subsystem sftp)."


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "server_args",
        nargs=argparse.REMAINDER,
        help="after --: arguments for sftp-server (e.g. -- -l INFO -u 022)",
    )


def run(args: argparse.Namespace) -> int:
    server_args = list(args.server_args)
    if server_args[:1] == ["--"]:
        server_args = server_args[1:]
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # Never break a transfer over our own problem: serve it untapped. The
        # reason goes to the system log, not to stderr, which sshd relays to
        # the client: a user must not read the config's paths and keys.
        tell_the_admin(f"sftpgate subsystem: {exc}; running sftp-server without the journal")
        server = SubsystemConfig().sftp_server
        os.execv(server, [server, *server_args])  # noqa: S606 - an argument list, no shell
    from ..subsystem.tap import quiet_logging, run_tap

    quiet_logging()

    cfg = config.subsystem
    return run_tap(
        cfg.sftp_server,
        server_args,
        socket_path=cfg.socket,
        spool_dir=cfg.spool_dir,
        temp_patterns=config.pipeline.temp_patterns or DEFAULT_TEMP_PATTERNS,
        ack_timeout=cfg.ack_timeout,
    )


def tell_the_admin(message: str, address: str = "/dev/log") -> None:
    """Send ``message`` to syslog (journald), never to the client; silent where there is none."""
    import socket

    # <11>: facility user (1), severity error (3), as RFC 3164 local sockets take it.
    line = f"<11>sftpgate: {message}".encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
            log.sendto(line, address)
    except OSError:
        pass
