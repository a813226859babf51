"""SIGHUP: users, rules and pipeline/email settings come from one re-read config, or none do.

A real `sftpgate serve` process gets the signal, as systemd's `reload` sends it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from test_serve_process import ServeProcess

from conftest import PASSWORDS, free_port, write_config
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.config import RESTART_KEYS, load_config, restart_keys_changed
from sftpgate.passwords import hash_password

DAVE = "dave-secret"


def add_dave(config: Path, **sections: dict[str, Any]) -> None:
    """Add user dave (password login) to the YAML file, and change ``sections``."""
    data = yaml.safe_load(config.read_text())
    data["users"].append(
        {
            "login": "dave",
            "name": "Dave",
            "surname": "Bowman",
            "email": "dave@example.org",
            "home": "homes/dave",
            "password_hash": hash_password(DAVE, log_n=10),
        }
    )
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    config.write_text(yaml.safe_dump(data))


def sftp_as(port: int, login: str, password: str) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    t = paramiko.Transport(("127.0.0.1", port))
    t.connect(username=login, password=password)
    client = paramiko.SFTPClient.from_transport(t)
    assert client is not None
    return t, client


def test_user_added_by_sighup_uploads_a_clip_and_gets_the_email_with_new_settings(
    tmp_path: Path, user_keys: dict[str, Path], smtp: SmtpServer
) -> None:
    config = write_config(tmp_path, user_keys, pipeline_settings(smtp.port))
    clip = make_clip(tmp_path / "clip.mp4", "mp4", seconds=1)
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    try:
        # A new user and new email settings, in one reload.
        add_dave(config, smtp={"from": "reloaded@example.org"})
        line = serve.hup_and_wait("reloaded")
        assert "4 users" in line
        t, client = sftp_as(port, "dave", DAVE)
        try:
            client.put(str(clip), "clip.mp4")
        finally:
            t.close()
        (job,) = wait_jobs(config.parent / "state" / "journal.sqlite3", settled)
        assert (job["login"], job["state"], job["outcome"]) == ("dave", "succeeded", "converted")
        (message,) = smtp.inbox.to("dave@example.org")
        assert message["From"] == "reloaded@example.org"
        assert (tmp_path / "homes" / "dave" / "converted" / "clip.flv").is_file()
    finally:
        assert serve.stop() == 0
    assert "no longer in the config" not in "".join(serve.lines)


def test_reload_changing_a_restart_key_is_refused_whole_and_names_the_key(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    config = write_config(tmp_path, user_keys)
    port = free_port()
    serve = ServeProcess(config, {"SFTPGATE_SERVER__PORT": str(port)})
    try:
        started = load_config(config, environ={})
        before = started.journal.batch_max, started.server.io_threads
        add_dave(config, journal={"batch_max": 5}, server={"io_threads": 3})
        line = serve.hup_and_wait("reload refused")
        assert "journal.batch_max" in line and "server.io_threads" in line, line
        assert "restart" in line
        # Nothing of that file was taken: dave is unknown, alice still works.
        with pytest.raises(paramiko.AuthenticationException):
            sftp_as(port, "dave", DAVE)
        t, client = sftp_as(port, "alice", PASSWORDS["alice"])
        client.mkdir("still-here")
        t.close()

        # Put the restart keys back: the same new user now comes in.
        data = yaml.safe_load(config.read_text())
        data["journal"]["batch_max"], data["server"]["io_threads"] = before
        config.write_text(yaml.safe_dump(data))
        serve.hup_and_wait("reloaded")
        t, client = sftp_as(port, "dave", DAVE)
        t.close()
    finally:
        assert serve.stop() == 0


def test_restart_keys_changed_names_each_changed_key_and_nothing_else(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    old = load_config(write_config(tmp_path, user_keys), environ={})
    same = dataclasses.replace(
        old,
        users=old.users[:1],
        smtp=dataclasses.replace(old.smtp, host="mail.example.org"),
        pipeline=dataclasses.replace(old.pipeline, patterns=("*.mov",), output_dir="out"),
        jobs=dataclasses.replace(old.jobs, max_attempts=9, backoff_base=1.0),
    )
    assert restart_keys_changed(old, same) == []
    new = dataclasses.replace(
        same,
        server=dataclasses.replace(old.server, port=2300, create_homes=False),
        journal=dataclasses.replace(old.journal, synchronous="full"),
        subsystem=dataclasses.replace(old.subsystem, enabled=True),
        jobs=dataclasses.replace(same.jobs, workers=7),
    )
    assert restart_keys_changed(old, new) == [
        "server.port",
        "journal.synchronous",
        "jobs.workers",
        "subsystem.enabled",
    ]
    # Every named key exists (a renamed key would silently never be compared).
    for key in RESTART_KEYS:
        section, _, name = key.partition(".")
        assert hasattr(old, section) and (not name or hasattr(getattr(old, section), name)), key
