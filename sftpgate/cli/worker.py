"""``sftpgate worker``: run pipeline workers without the SSH server."""

from __future__ import annotations

import argparse
import asyncio
import logging

from .. import metrics
from ..config import load_config, restart_keys_changed
from ..errors import ConfigError
from ..gateway import start_workers
from ..lifecycle import Lifecycle, keep_status, plural
from ..logsetup import announce, setup_logging
from ..metrics_http import start_listener
from ..sdnotify import Notifier
from .common import config_from

HELP = "Run only the pipeline workers (no SSH server) on the journal's job rows."

log = logging.getLogger("sftpgate")


def register(parser: argparse.ArgumentParser) -> None:
    """Nothing but --config, which main adds to every command."""


def run(args: argparse.Namespace) -> int:
    """Until SIGTERM/SIGINT: running jobs are then released at once (ffmpeg stopped, the
    lease given back, the attempt not counted) and it exits 0; a second signal during that
    exits at once (128 + the signal). SIGHUP re-reads the config (pipeline, email, SMTP)."""
    config = config_from(args)
    setup_logging(config.log.level, config.log.json, node=config.server.node)
    notifier = Notifier.from_environ()  # out of the environment: ffmpeg never inherits it

    async def main() -> int:
        life = Lifecycle(notifier)
        metrics.configure(None)
        pool = await start_workers(config)
        served = None
        if config.metrics.worker_listen:  # its own key: a gateway on this host has the other
            served = await start_listener(
                config, config.metrics.worker_listen, "worker", workers=lambda: pool
            )

        def status() -> str:
            return f"{plural(config.jobs.workers, 'worker')}, {plural(pool.running, 'job')} running"

        def reload() -> None:
            notifier.reloading()
            try:
                new = load_config(args.config)
                changed = restart_keys_changed(pool.config, new)
                if changed:
                    raise ConfigError(f"{', '.join(changed)}: changed; restart to apply it")
            except ConfigError as exc:
                log.error("reload refused, keeping the old config: %s", exc)
            else:
                pool.config = new
                pool.pipeline.config = new
                log.info("reloaded %s", new.path)
            notifier.ready(status())

        life.install(reload)
        # Never the URL: it may hold a password.
        database = "PostgreSQL (Procrastinate)" if config.database.url else config.journal_path
        announce(f"sftpgate: {config.jobs.workers} workers ({pool.worker_id}) on {database}")
        notifier.ready(status())
        background = [
            asyncio.create_task(notifier.watchdog()),
            asyncio.create_task(keep_status(notifier, status)),
        ]
        try:
            await life.stop.wait()
            notifier.stopping(f"stopping: releasing {plural(pool.running, 'job')}")
            log.info("stopping: releasing %s", plural(pool.running, "running job"))
            await pool.stop()
            await asyncio.to_thread(pool.store.close)
            log.info("stopped")
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if served is not None:
                await served.stop()
            life.done()
        return life.exit_code

    return asyncio.run(main())
