"""The sshd harness itself, proven with Debian's plain sftp-server as the subsystem."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import paramiko
import pytest

from sshd_kit import (
    UserFactory,
    need_sshd,
    openssh_sftp_batch,
    paramiko_sftp,
    start_sshd,
    temp_users,
    user_exists,
    write_key_pair,
)
from sshd_kit import make_user as make_user
from sshd_kit import shared_dir as shared_dir


def test_paramiko_upload_and_download_as_the_user(shared_dir: Path, make_user: UserFactory) -> None:
    _, sftp_server = need_sshd()
    alice = make_user()
    payload = bytes(range(256)) * 1000
    with start_sshd(shared_dir / "sshd", [sftp_server], users=[alice]) as sshd:
        transport, sftp = paramiko_sftp(sshd, alice)
        try:
            assert sftp.normalize(".") == str(alice.home)
            sftp.putfo(io.BytesIO(payload), "upload.bin")
            back = io.BytesIO()
            sftp.getfo("upload.bin", back)
            remote_uid = sftp.stat("upload.bin").st_uid
        finally:
            sftp.close()
            transport.close()
    assert back.getvalue() == payload
    on_disk = alice.home / "upload.bin"
    assert on_disk.read_bytes() == payload
    assert (on_disk.stat().st_uid, on_disk.stat().st_gid) == (alice.uid, alice.gid)
    assert remote_uid == alice.uid
    assert alice.uid != 0


def test_openssh_sftp_batch_put_ls_rm(
    shared_dir: Path, make_user: UserFactory, tmp_path: Path
) -> None:
    _, sftp_server = need_sshd()
    bob = make_user()
    (tmp_path / "local note.txt").write_text("hello from the batch\n")
    with start_sshd(shared_dir / "sshd", [sftp_server], users=[bob]) as sshd:
        put = openssh_sftp_batch(
            sshd, bob, 'put "local note.txt" note.txt\nls -l note.txt\n', tmp_path
        )
        assert put.returncode == 0, put.stderr + sshd.log_tail()
        assert "note.txt" in put.stdout
        assert (bob.home / "note.txt").read_text() == "hello from the batch\n"
        assert (bob.home / "note.txt").stat().st_uid == bob.uid

        rm = openssh_sftp_batch(sshd, bob, "rm note.txt\nls -1\n", tmp_path)
        assert rm.returncode == 0, rm.stderr + sshd.log_tail()
    assert not (bob.home / "note.txt").exists()


def test_unknown_key_and_unlisted_user_are_refused(
    shared_dir: Path, make_user: UserFactory, tmp_path: Path
) -> None:
    _, sftp_server = need_sshd()
    alice = make_user()
    outsider = make_user()  # a real account with a key, but not given to this sshd
    stranger_key = tmp_path / "stranger_ed25519"
    write_key_pair(stranger_key, "stranger")
    with start_sshd(shared_dir / "sshd", [sftp_server], users=[alice]) as sshd:
        with pytest.raises(paramiko.AuthenticationException):
            paramiko_sftp(sshd, alice, key_path=stranger_key)
        with pytest.raises(paramiko.AuthenticationException):
            paramiko_sftp(sshd, outsider)
        refused = openssh_sftp_batch(sshd, outsider, "ls\n", tmp_path)
        assert refused.returncode != 0
        assert "Permission denied" in refused.stderr

        # the same sshd still lets alice in with her own key
        transport, sftp = paramiko_sftp(sshd, alice)
        try:
            assert sftp.normalize(".") == str(alice.home)
        finally:
            sftp.close()
            transport.close()
        log = sshd.log()
    assert f"User {outsider.login} from 127.0.0.1 not allowed" in log
    assert f"Accepted publickey for {alice.login}" in log


def test_subsystem_command_runs_as_the_logged_in_user(
    shared_dir: Path, make_user: UserFactory
) -> None:
    _, sftp_server = need_sshd()
    carol = make_user()
    script = shared_dir / "whoami sftp.sh"  # a space forces the exec wrapper path
    script.write_text(
        "#!/bin/sh\n"
        'id -u > "$HOME/subsystem-uid"\n'
        'printf %s "$1" > "$HOME/subsystem-arg"\n'
        f"exec {sftp_server}\n"
    )
    script.chmod(0o755)
    with start_sshd(shared_dir / "sshd", [str(script), "two words"], users=[carol]) as sshd:
        transport, sftp = paramiko_sftp(sshd, carol)
        try:
            names = sftp.listdir(".")
        finally:
            sftp.close()
            transport.close()
    assert "subsystem-uid" in names  # the SFTP session went through the script
    assert (carol.home / "subsystem-uid").read_text().strip() == str(carol.uid)
    assert (carol.home / "subsystem-uid").stat().st_uid == carol.uid
    assert (carol.home / "subsystem-arg").read_text() == "two words"


def test_users_are_removed_afterwards_even_when_the_test_fails(shared_dir: Path) -> None:
    made = []
    with pytest.raises(RuntimeError, match="test body failed"), temp_users(shared_dir) as make:
        made = [make(), make()]
        assert all(user_exists(u.login) for u in made)
        assert all(u.home.is_dir() and u.key_path.is_file() for u in made)
        raise RuntimeError("test body failed")
    assert len(made) == 2
    for user in made:
        assert not user_exists(user.login)
        got = subprocess.run(["getent", "group", user.login], capture_output=True, check=False)
        assert got.returncode == 2  # the user's own group is gone too
        assert not user.home.exists()
        assert not user.key_path.exists()


def test_invalid_config_fails_with_sshds_words(shared_dir: Path, make_user: UserFactory) -> None:
    _, sftp_server = need_sshd()
    dave = make_user()
    with pytest.raises(pytest.fail.Exception, match="NoSuchOption"):
        start_sshd(
            shared_dir / "sshd", [sftp_server], users=[dave], extra_config={"NoSuchOption": "1"}
        )
