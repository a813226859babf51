"""``sftpgate serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..config import check_homes, load_config
from ..errors import ConfigError, SftpgateError
from ..gateway import Gateway
from ..logsetup import setup_logging
from .common import add_config_option, config_from

HELP = "Run the SFTP gateway (SSH server offering SFTP only) and journal what users do."

log = logging.getLogger("sftpgate")


def register(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    problems = check_homes(config)
    if problems:
        raise ConfigError("; ".join(problems))
    setup_logging(config.log.level, config.log.json)
    return asyncio.run(_serve(args.config, Gateway(config)))


async def _serve(config_file: str, gateway: Gateway) -> int:
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
    print(
        f"sftpgate: listening on {gateway.config.server.listen}:{gateway.port}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    log.info("stopping")
    await gateway.stop()
    return 0
