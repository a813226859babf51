"""The quarantine of asyncssh's internals: checked at start, one warning, then the public path."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from sftpgate.frontdoor import asyncssh_fast


def _copy_of_asyncssh(**changes: Any) -> types.SimpleNamespace:
    """A stand-in for the asyncssh package: its real modules, some replaced by ``changes``."""
    package = types.SimpleNamespace(
        __version__=asyncssh.__version__,
        connection=asyncssh.connection,  # type: ignore[attr-defined]
        channel=asyncssh.channel,  # type: ignore[attr-defined]
        packet=asyncssh.packet,  # type: ignore[attr-defined]
        logging=asyncssh.logging,
        constants=asyncssh.constants,  # type: ignore[attr-defined]
    )
    for name, value in changes.items():
        setattr(package, name, value)
    return package


def _without(cls: type, name: str) -> type:
    """A subclass of ``cls`` whose code no longer has ``name`` (method hidden, field unused)."""
    body: dict[str, Any] = {}
    if callable(getattr(cls, name, None)):
        body[name] = None  # no longer callable
    sub = type(cls.__name__, (cls,), body)
    if name not in body:  # a field: a class whose code never names it
        sub = type(cls.__name__, (), {"__init__": lambda self: None})
    return sub


def test_the_installed_asyncssh_has_everything_the_fast_paths_use() -> None:
    assert asyncssh.__version__.startswith(asyncssh_fast.TESTED + ".")
    assert asyncssh_fast.missing() == []


def test_a_missing_private_method_means_one_warning_and_the_public_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = types.SimpleNamespace(
        SSHChannel=_without(asyncssh.channel.SSHChannel, "process_packet")  # type: ignore[attr-defined]
    )
    fake = _copy_of_asyncssh(channel=channel)
    with caplog.at_level(logging.WARNING, logger=asyncssh_fast.__name__):
        assert asyncssh_fast.available(fake, refresh=True) is False
        assert asyncssh_fast.available(fake) is False  # decided once: no second warning
    try:
        (record,) = caplog.records
        assert "asyncssh.channel.SSHChannel.process_packet" in record.getMessage()
        assert "public API" in record.getMessage()
    finally:
        asyncssh_fast.available(refresh=True)


def test_a_missing_private_field_is_named() -> None:
    connection = types.SimpleNamespace(
        SSHConnection=_without(asyncssh.connection.SSHConnection, "_send_encryption")  # type: ignore[attr-defined]
    )
    problems = asyncssh_fast.missing(_copy_of_asyncssh(connection=connection))
    assert "asyncssh.connection.SSHConnection._send_encryption" in problems


def test_a_method_taking_other_arguments_is_refused() -> None:
    class Changed(asyncssh.channel.SSHChannel):  # type: ignore[name-defined,misc]
        def process_packet(self, pkttype: int, packet: Any) -> None:  # one argument fewer
            pass

    fake = _copy_of_asyncssh(channel=types.SimpleNamespace(SSHChannel=Changed))
    assert asyncssh_fast.missing(fake) == [
        "asyncssh.channel.SSHChannel.process_packet (arguments changed)"
    ]


def test_another_asyncssh_line_means_one_warning_and_the_public_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = _copy_of_asyncssh(__version__="2.25.0")
    with caplog.at_level(logging.WARNING, logger=asyncssh_fast.__name__):
        assert asyncssh_fast.available(fake, refresh=True) is False
    try:
        (record,) = caplog.records
        assert f"asyncssh 2.25.0 (tested: {asyncssh_fast.TESTED}.x)" in record.getMessage()
    finally:
        assert asyncssh_fast.available(refresh=True) is True


def test_an_object_without_the_fields_is_left_unpatched(caplog: pytest.LogCaptureFixture) -> None:
    class Channel:
        def process_packet(self, *args: Any) -> None:
            pass

    chan = Channel()
    original = chan.process_packet
    with caplog.at_level(logging.WARNING, logger=asyncssh_fast.__name__):
        assert asyncssh_fast.install_channel(chan, lambda data, datatype: None) is False
    assert chan.process_packet == original
    assert "_send_state" in caplog.records[0].getMessage()


def test_fast_paths_off_or_a_failed_check_serves_on_the_public_path(
    tmp_path: Path, user_keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import start_gateway

    monkeypatch.setattr(asyncssh_fast, "available", lambda *a, **k: False)
    running = start_gateway(tmp_path, user_keys)
    try:
        assert running.gateway.fast_paths is False
        sftp = running.sftp("alice")
        with sftp.open("f.bin", "wb") as f:
            f.write(b"public path")
        with sftp.open("f.bin", "rb") as f:
            assert f.read() == b"public path"
    finally:
        running.stop()
    (tmp_path / "off").mkdir()
    running = start_gateway(tmp_path / "off", user_keys, extra={"server": {"fast_paths": "off"}})
    try:
        assert running.gateway.fast_paths is False
    finally:
        running.stop()
