"""serve's one error translation, end to end: a client is told a status and safe words,
never an internal error's text; the journal and the log keep the detail."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import paramiko
import pytest

from conftest import RunningGateway
from sftpgate.frontdoor.fsops import UserFS
from sftpgate.frontdoor.sftp import GatewaySFTPServer

SECRET = "database is locked (journal.sqlite3, page 7)"


def _locked(*args: Any, **kwargs: Any) -> Any:
    raise sqlite3.OperationalError(SECRET)


def told(exc: BaseException) -> str:
    return str(exc)


def test_an_unexpected_error_in_a_pooled_hook_is_a_generic_failure_for_the_client(
    gateway: RunningGateway,
    sftp: paramiko.SFTPClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(UserFS, "mkdir", _locked)
    with caplog.at_level(logging.ERROR), pytest.raises(OSError) as raised:
        sftp.mkdir("newdir")
    assert "Failure" in told(raised.value)
    assert "database" not in told(raised.value) and "OperationalError" not in told(raised.value)
    (row,) = gateway.op_rows("mkdir")
    assert (row["status"], row["message"]) == (
        "failure",
        f"internal error: OperationalError: {SECRET}",
    )
    assert SECRET in caplog.text


@pytest.mark.parametrize("hook", ["readlink", "stat"])
def test_an_exception_a_hook_lets_through_is_translated_on_either_request_path(
    gateway: RunningGateway,
    sftp: paramiko.SFTPClient,
    monkeypatch: pytest.MonkeyPatch,
    hook: str,
) -> None:
    # readlink goes through asyncssh's dispatch (which said "Uncaught exception: ..."),
    # stat through serve's fast path.
    async def broken(self: GatewaySFTPServer, path: bytes) -> Any:
        raise KeyError(SECRET)

    monkeypatch.setattr(GatewaySFTPServer, hook, broken)
    with pytest.raises(OSError) as raised:
        getattr(sftp, hook)("anything")
    text = told(raised.value)
    assert "Failure" in text
    assert "Uncaught" not in text and "KeyError" not in text and "database" not in text
