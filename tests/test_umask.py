"""Users' new files follow server.umask, not the process umask (systemd's UMask=0077)."""

from __future__ import annotations

import io
import stat
import sys
from pathlib import Path

import paramiko
import pytest
import yaml
from test_serve_process import start_serve, stop_serve

from conftest import PASSWORDS, free_port, write_config
from sftpgate.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("server_umask", "file_mode", "dir_mode"),
    [
        ("022", 0o644, 0o755),
        ("027", 0o640, 0o750),
        ("077", 0o600, 0o700),
    ],
)
def test_new_files_and_folders_follow_server_umask_under_a_private_process_umask(
    tmp_path: Path,
    user_keys: dict[str, Path],
    server_umask: str,
    file_mode: int,
    dir_mode: int,
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        user_keys,
        {"server": {"port": port, "umask": server_umask}},
    )
    data = yaml.safe_load(config.read_text())
    for section in ("state_dir", "host_keys_dir"):
        data["server"][section] = str(tmp_path / data["server"][section])
    for user in data["users"]:
        user["home"] = str(tmp_path / user["home"])
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "sftpgate", "serve", "--config", str(config)]
    proc = start_serve(config, {}, command=command, umask=0o077)
    try:
        transport = paramiko.Transport(("127.0.0.1", port))
        transport.connect(username="alice", password=PASSWORDS["alice"])
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        with sftp.open("wide.txt", "w") as f:  # no mode given: 0666 asked
            f.write(b"y")
        sftp.mkdir("folder", 0o777)
        home = tmp_path / "homes" / "alice"
        assert stat.S_IMODE((home / "wide.txt").stat().st_mode) == file_mode & 0o666
        assert stat.S_IMODE((home / "folder").stat().st_mode) == dir_mode
        # A file that was already there keeps its mode when overwritten.
        (home / "kept.txt").write_bytes(b"old")
        (home / "kept.txt").chmod(0o604)
        sftp.putfo(io.BytesIO(b"new"), "kept.txt")
        assert stat.S_IMODE((home / "kept.txt").stat().st_mode) == 0o604
        transport.close()
    finally:
        assert stop_serve(proc) == 0


@pytest.mark.parametrize(("value", "expected"), [(18, 0o022), ("027", 0o027), ("0o077", 0o077)])
def test_umask_is_read_as_octal(
    tmp_path: Path, user_keys: dict[str, Path], value: object, expected: int
) -> None:
    config = load_config(write_config(tmp_path, user_keys, {"server": {"umask": value}}), {})
    assert config.server.umask == expected


@pytest.mark.parametrize("value", ["abc", "0999", 0o1777, -1])
def test_a_bad_umask_names_the_key(
    tmp_path: Path, user_keys: dict[str, Path], value: object
) -> None:
    with pytest.raises(ConfigError, match=r"server\.umask|umask"):
        load_config(write_config(tmp_path, user_keys, {"server": {"umask": value}}), {})
