"""Shared pieces for pipeline tests: a real SMTP server (aiosmtpd) and job polling."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from conftest import RunningGateway, free_port


class Inbox:
    """aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


@dataclass
class SmtpServer:
    port: int = field(default_factory=free_port)
    inbox: Inbox = field(default_factory=Inbox)
    controller: Controller | None = None

    def start(self) -> SmtpServer:
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def pipeline_settings(smtp_port: int, **pipeline: Any) -> dict[str, Any]:
    """Config sections for fast pipeline tests: small outputs, quick retries."""
    return {
        "smtp": {
            "host": "127.0.0.1",
            "port": smtp_port,
            "retries": 0,
            "retry_wait": 0,
            "timeout": 5,
            "from": "gateway@example.org",
        },
        "pipeline": {
            "enabled": True,
            "thumbnails": 3,
            "thumbnail_width": 160,
            "poster_width": 320,
            "preset": "ultrafast",
            **pipeline,
        },
        "jobs": {
            "workers": 2,
            "backoff_base": 0.5,
            "backoff_max": 2,
            "poll_interval": 0.2,
            "max_attempts": 20,
        },
    }


def wait_jobs(
    gateway_or_path: RunningGateway | Any, predicate: Any, timeout: float = 60
) -> list[dict[str, Any]]:
    """Poll the jobs table until ``predicate(rows)`` holds."""
    import sqlite3

    path = (
        gateway_or_path.config.journal_path
        if isinstance(gateway_or_path, RunningGateway)
        else gateway_or_path
    )
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            conn = sqlite3.connect(path)
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
            conn.close()
        except sqlite3.Error:
            rows = []
        if predicate(rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"jobs never matched: {rows}")


def settled(rows: list[dict[str, Any]], count: int = 1) -> bool:
    """True once ``count`` jobs exist and none is queued or running."""
    return len(rows) >= count and all(r["state"] not in ("queued", "running") for r in rows)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) for one test; import it as ``smtp as smtp``."""
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()
