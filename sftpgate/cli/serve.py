"""``sftpgate serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from ..config import check_homes, load_config
from ..errors import ConfigError, SftpgateError
from ..gateway import Gateway
from ..logsetup import setup_logging
from .common import config_from

HELP = "Run the SFTP gateway (SSH server offering SFTP only) and journal what users do."

log = logging.getLogger("sftpgate")


def register(parser: argparse.ArgumentParser) -> None:
    # Set by the supervisor (server.processes > 1) on the gateway processes it starts:
    # which one this is, and the pipe to say "listening" on. Not for people.
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    problems = check_homes(config)
    if problems:
        raise ConfigError("; ".join(problems))
    setup_logging(config.log.level, config.log.json, node=config.server.node)
    child: int | None = args.child
    if child is None and config.server.processes > 1:
        from ..supervisor import Supervisor  # only when supervising

        return asyncio.run(Supervisor(args.config, config).run())
    gateway = Gateway(
        config,
        reuse_port=child is not None,
        embedded_workers=child is None,  # the supervisor runs them
        tap=child in (None, 0),  # one process serves the tap's socket
    )
    return asyncio.run(_serve(args.config, gateway, child, args.ready_fd))


async def _serve(
    config_file: str, gateway: Gateway, child: int | None = None, ready_fd: int | None = None
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        # SIGHUP: users, rules, pipeline, email and SMTP settings from one re-read file.
        try:
            gateway.reload(load_config(config_file))
        except ConfigError as exc:
            log.error("reload refused, keeping the old config: %s", exc)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.stop()
        raise SftpgateError(
            f"cannot listen on {gateway.config.server.listen}:"
            f"{gateway.config.server.port}: {exc.strerror or exc}"
        ) from None
    if ready_fd is not None:
        # The supervisor prints the one "listening" line once every process is up.
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    else:
        print(
            f"sftpgate: listening on {gateway.config.server.listen}:{gateway.port}",
            file=sys.stderr,
            flush=True,
        )
    await stop.wait()
    log.info("stopping%s", f" (process {child})" if child is not None else "")
    await gateway.stop()
    return 0
