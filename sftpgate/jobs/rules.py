"""Which completed uploads start a job. Runs inside the journal's transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..config import Config
from ..events import Event
from ..patterns import name_matches
from .store import enqueue


class Rules:
    """The upload hook of the journal writer: a matching upload gets a job row."""

    def __init__(self, config: Config) -> None:
        # One reference, replaced whole on reload (the writer thread reads it).
        self.config = config
        self._created = False
        # Set by the worker pool; called from the writer thread after a commit
        # that created jobs, so workers start at once instead of at their next poll.
        self.wake: Callable[[], None] | None = None

    def wants(self, path: str) -> bool:
        """True if an upload at ``path`` should go through the pipeline. Pure."""
        pipeline = self.config.pipeline
        return pipeline.enabled and name_matches(path, pipeline.patterns)

    def on_upload(self, conn: sqlite3.Connection, upload_id: int, path: str, event: Event) -> None:
        config = self.config  # one config for the decision and the job row
        pipeline = config.pipeline
        if pipeline.enabled and name_matches(path, pipeline.patterns):
            jobs = config.jobs
            enqueue(conn, upload_id, path, event, jobs.max_attempts, jobs.per_user_queue)
            self._created = True

    def after_commit(self) -> None:
        if self._created:
            self._created = False
            if self.wake is not None:
                self.wake()
