"""Which completed uploads start a job. Pure: the journal adapter writes the job row."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from ..events import Event
from ..patterns import name_matches
from ..storage.ports import JobSpec


class Rules:
    """The job rule of the journal writer: a matching upload gets a :class:`JobSpec`."""

    def __init__(self, config: Config) -> None:
        # One reference, replaced whole on reload (the writer thread reads it).
        self.config = config
        # Set by the worker pool; called from the writer thread after a commit
        # that created jobs, so workers start at once instead of at their next poll.
        self.wake: Callable[[], None] | None = None

    def wants(self, path: str) -> bool:
        """True if an upload at ``path`` should go through the pipeline. Pure."""
        pipeline = self.config.pipeline
        return pipeline.enabled and name_matches(path, pipeline.patterns)

    def on_upload(self, path: str, event: Event) -> JobSpec | None:
        """The job a complete upload at ``path`` starts, or None. Pure (a JobRule)."""
        config = self.config  # one config for the decision and the job's limits
        pipeline = config.pipeline
        if not (pipeline.enabled and name_matches(path, pipeline.patterns)):
            return None
        return JobSpec(max_attempts=config.jobs.max_attempts, queue_cap=config.jobs.per_user_queue)

    def after_commit(self) -> None:
        """The writer committed jobs: wake the workers."""
        if self.wake is not None:
            self.wake()
