"""``sftpgate worker``: run pipeline workers without the SSH server."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from ..gateway import start_workers
from ..logsetup import setup_logging
from .common import config_from

HELP = "Run only the pipeline workers (no SSH server) on the journal's job rows."


def register(parser: argparse.ArgumentParser) -> None:
    """Nothing but --config, which main adds to every command."""


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    setup_logging(config.log.level, config.log.json, node=config.server.node)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        pool = await start_workers(config)
        # Never the URL: it may hold a password.
        database = "PostgreSQL (Procrastinate)" if config.database.url else config.journal_path
        print(
            f"sftpgate: {config.jobs.workers} workers ({pool.worker_id}) on {database}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        await pool.stop()
        await asyncio.to_thread(pool.store.close)
        return 0

    return asyncio.run(main())
