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
        self._pipeline = config.pipeline
        self._max_attempts = config.jobs.max_attempts
        self._created = False
        # Set by the worker pool; called from the writer thread after a commit
        # that created jobs, so workers start at once instead of at their next poll.
        self.wake: Callable[[], None] | None = None

    def wants(self, path: str) -> bool:
        """True if an upload at ``path`` should go through the pipeline. Pure."""
        return self._pipeline.enabled and name_matches(path, self._pipeline.patterns)

    def on_upload(self, conn: sqlite3.Connection, upload_id: int, path: str, event: Event) -> None:
        if self.wants(path):
            enqueue(conn, upload_id, path, event, self._max_attempts)
            self._created = True

    def after_commit(self) -> None:
        if self._created:
            self._created = False
            if self.wake is not None:
                self.wake()
