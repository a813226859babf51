"""Logins, the SFTP-only rule, and the journal rows each SFTP action produces (paramiko)."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import stat
from pathlib import Path

import asyncssh
import paramiko
import pytest

from conftest import RunningGateway, start_gateway


def test_password_login_is_journaled_with_address_and_client_version(
    gateway: RunningGateway,
) -> None:
    gateway.sftp("alice").listdir(".")
    gateway.close_clients()
    rows = gateway.wait_rows(lambda rs: any(r["op"] == "logout" for r in rs))
    login = next(r for r in rows if r["op"] == "login")
    assert (login["login"], login["remote_addr"], login["status"]) == ("alice", "127.0.0.1", "ok")
    (session,) = gateway.rows("SELECT * FROM sessions")
    assert session["login"] == "alice"
    assert session["auth_method"] == "password"
    assert session["result"] == "ok"
    assert session["client_version"].startswith("SSH-2.0-paramiko")
    assert session["remote_port"] > 0
    assert session["ended_at"] >= session["started_at"]


def test_key_login_is_journaled_as_publickey(gateway: RunningGateway) -> None:
    gateway.sftp("bob", key=True).listdir(".")
    rows = gateway.op_rows("login")
    assert rows[0]["login"] == "bob"
    gateway.wait_rows(lambda rs: True, sql="SELECT * FROM sessions")
    (session,) = gateway.rows("SELECT * FROM sessions")
    assert session["auth_method"] == "publickey"


def test_wrong_password_is_refused_and_journaled_with_address(gateway: RunningGateway) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        gateway.transport("alice", password="wrong")
    (row,) = gateway.op_rows("login_failed")
    assert row["login"] == "alice"
    assert row["remote_addr"] == "127.0.0.1"
    assert row["status"] == "permission_denied"
    assert row["message"] == "wrong password"
    session = gateway.wait_rows(lambda rs: len(rs) == 1, sql="SELECT * FROM sessions")[0]
    assert session["result"] == "failed"


def test_unknown_login_is_refused_and_journaled(gateway: RunningGateway) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        gateway.transport("mallory", password="x")
    (row,) = gateway.op_rows("login_failed")
    assert (row["login"], row["message"]) == ("mallory", "unknown user")


def test_key_only_user_cannot_log_in_with_a_password(gateway: RunningGateway) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        gateway.transport("bob", password="anything")
    assert gateway.op_rows("login_failed")[0]["login"] == "bob"


def test_wrong_key_is_journaled_as_failed_login_when_client_gives_up(
    gateway: RunningGateway,
) -> None:
    t = paramiko.Transport(("127.0.0.1", gateway.port))
    gateway.transports.append(t)
    t.start_client()
    with pytest.raises(paramiko.AuthenticationException):
        t.auth_publickey(
            "alice", paramiko.Ed25519Key.from_private_key_file(str(gateway.keys["bob"]))
        )
    t.close()
    (row,) = gateway.op_rows("login_failed")
    assert (row["login"], row["remote_addr"]) == ("alice", "127.0.0.1")


def test_only_sftp_is_offered_no_shell_exec_or_forwarding(gateway: RunningGateway) -> None:
    t = gateway.transport("alice")
    for request in ("exec", "shell"):
        chan = t.open_session()
        with pytest.raises(paramiko.SSHException):
            if request == "exec":
                chan.exec_command("id")
            else:
                chan.invoke_shell()
    with pytest.raises(paramiko.ChannelException):
        t.open_channel("direct-tcpip", ("127.0.0.1", gateway.port), ("127.0.0.1", 1))
    with pytest.raises(paramiko.SSHException):
        t.request_port_forward("127.0.0.1", 0)
    # ...while SFTP on the same connection works.
    client = paramiko.SFTPClient.from_transport(t)
    assert client is not None
    assert client.listdir(".") == []


def test_upload_and_download_journal_open_close_bytes_and_a_complete_upload(
    gateway: RunningGateway, sftp: paramiko.SFTPClient
) -> None:
    payload = bytes(range(256)) * 400  # 100 KiB
    sftp.putfo(io.BytesIO(payload), "clip one.mp4")
    assert (gateway.home("alice") / "clip one.mp4").read_bytes() == payload
    out = io.BytesIO()
    sftp.getfo("clip one.mp4", out, prefetch=False)  # paramiko's prefetch may ask twice
    assert out.getvalue() == payload
    closes = gateway.op_rows("close", count=2)
    upload, download = closes
    assert (upload["path"], upload["bytes_written"], upload["status"]) == (
        "/clip one.mp4",
        len(payload),
        "ok",
    )
    assert download["bytes_read"] == len(payload)
    assert download["bytes_written"] == 0
    opens = gateway.op_rows("open", count=2)
    assert opens[0]["flags"] & 0x2 and opens[0]["flags"] & 0x8  # WRITE | CREAT
    assert opens[1]["flags"] == 0x1  # READ
    uploads = gateway.rows("SELECT * FROM uploads")
    assert [(u["path"], u["bytes"], u["state"]) for u in uploads] == [
        ("/clip one.mp4", len(payload), "complete")
    ]
    assert uploads[0]["operation_id"] == upload["id"]


def test_zero_byte_upload_is_journaled_but_is_not_an_upload(
    gateway: RunningGateway, sftp: paramiko.SFTPClient
) -> None:
    sftp.putfo(io.BytesIO(b""), "empty.mp4")
    (close,) = gateway.op_rows("close")
    assert close["bytes_written"] == 0
    assert close["message"] == "nothing written: not an upload"
    assert gateway.rows("SELECT * FROM uploads") == []


def test_rename_remove_mkdir_rmdir_chmod_and_listing_each_leave_a_row(
    gateway: RunningGateway, sftp: paramiko.SFTPClient
) -> None:
    sftp.putfo(io.BytesIO(b"x"), "a.txt")
    sftp.mkdir("dir", 0o750)
    sftp.rename("a.txt", "dir/b.txt")
    sftp.chmod("dir/b.txt", 0o640)
    assert sftp.listdir("dir") == ["b.txt"]
    sftp.remove("dir/b.txt")
    sftp.rmdir("dir")
    rows = gateway.wait_rows(lambda rs: any(r["op"] == "rmdir" for r in rs))
    by_op = {r["op"]: r for r in rows}
    assert (by_op["mkdir"]["path"], by_op["mkdir"]["mode"]) == ("/dir", 0o750)
    assert (by_op["rename"]["path"], by_op["rename"]["path2"]) == ("/a.txt", "/dir/b.txt")
    assert by_op["setstat"]["path"] == "/dir/b.txt"
    assert '"mode": "0640"' in by_op["setstat"]["attrs"]
    assert by_op["list"]["path"] == "/dir"
    assert by_op["list"]["attrs"] == '{"entries": 1}'
    assert by_op["remove"]["path"] == "/dir/b.txt"
    assert by_op["rmdir"]["path"] == "/dir"
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["login"] == "alice" for r in rows)


def test_failed_operations_are_journaled_with_their_status(
    gateway: RunningGateway, sftp: paramiko.SFTPClient
) -> None:
    with pytest.raises(FileNotFoundError):
        sftp.remove("nope.txt")
    sftp.mkdir("d")
    sftp.putfo(io.BytesIO(b"x"), "d/f")
    with pytest.raises(OSError):
        sftp.rmdir("d")
    sftp.putfo(io.BytesIO(b"y"), "other")
    with pytest.raises(OSError):
        sftp.rename("other", "d/f")  # SFTP v3 rename never overwrites
    rows = gateway.wait_rows(lambda rs: sum(r["status"] != "ok" for r in rs) >= 3)
    failed = [(r["op"], r["path"], r["status"]) for r in rows if r["status"] != "ok"]
    assert ("remove", "/nope.txt", "no_such_file") in failed
    assert ("rmdir", "/d", "dir_not_empty") in failed
    assert ("rename", "/other", "file_already_exists") in failed
    assert (gateway.home("alice") / "d" / "f").read_bytes() == b"x"


def test_posix_rename_overwrites_and_says_so(
    gateway: RunningGateway, sftp: paramiko.SFTPClient
) -> None:
    sftp.putfo(io.BytesIO(b"new"), "a")
    sftp.putfo(io.BytesIO(b"old"), "b")
    sftp.posix_rename("a", "b")
    assert (gateway.home("alice") / "b").read_bytes() == b"new"
    (row,) = gateway.op_rows("rename")
    assert row["attrs"] == '{"overwrite": true}'


def test_changing_owner_is_refused(gateway: RunningGateway, sftp: paramiko.SFTPClient) -> None:
    sftp.putfo(io.BytesIO(b"x"), "f")
    with pytest.raises(PermissionError):
        sftp.chown("f", 12345, 12345)
    rows = gateway.wait_rows(lambda rs: any(r["op"] == "setstat" for r in rs))
    assert [r["status"] for r in rows if r["op"] == "setstat"] == ["permission_denied"]


def test_setuid_bits_are_never_set(gateway: RunningGateway, sftp: paramiko.SFTPClient) -> None:
    sftp.putfo(io.BytesIO(b"#!/bin/sh\n"), "run")
    sftp.chmod("run", 0o6755)
    assert stat.S_IMODE((gateway.home("alice") / "run").stat().st_mode) == 0o755


def _cut_off_upload(
    gateway: RunningGateway, name: str
) -> tuple[paramiko.Transport, paramiko.SFTPFile]:
    """Start an upload and leave it open. The caller must keep the file object:
    paramiko's SFTPFile.__del__ would otherwise send a CLOSE."""
    t = gateway.transport("alice")
    client = paramiko.SFTPClient.from_transport(t)
    assert client is not None
    f = client.open(name, "w")
    for _ in range(4):
        f.write(b"x" * 32768)
    f.flush()
    return t, f


def test_upload_cut_off_by_a_dropped_tcp_connection_is_incomplete(
    gateway: RunningGateway,
) -> None:
    t, _file = _cut_off_upload(gateway, "cut.mp4")
    sock = t.sock
    assert isinstance(sock, socket.socket)
    # Drop the connection under the client: no SFTP CLOSE, no SSH disconnect.
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    (close,) = gateway.op_rows("close")
    assert close["path"] == "/cut.mp4"
    assert close["bytes_written"] == 4 * 32768
    assert close["message"] == "session ended with the file open"
    uploads = gateway.wait_rows(lambda rs: len(rs) == 1, sql="SELECT * FROM uploads")
    assert [(u["path"], u["state"], u["bytes"]) for u in uploads] == [
        ("/cut.mp4", "incomplete", 4 * 32768)
    ]
    logout = gateway.op_rows("logout")[0]
    assert logout["login"] == "alice"


def test_session_closed_with_a_write_handle_open_is_incomplete(
    gateway: RunningGateway,
) -> None:
    t, _file = _cut_off_upload(gateway, "left-open.mp4")
    t.close()  # an orderly SSH close, but the file was never closed
    uploads = gateway.wait_rows(lambda rs: len(rs) == 1, sql="SELECT * FROM uploads")
    assert uploads[0]["state"] == "incomplete"


def test_a_finished_upload_then_a_dropped_connection_stays_complete(
    gateway: RunningGateway,
) -> None:
    t = gateway.transport("alice")
    client = paramiko.SFTPClient.from_transport(t)
    assert client is not None
    client.putfo(io.BytesIO(b"z" * 1000), "done.mp4")
    sock = t.sock
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    gateway.op_rows("logout")
    uploads = gateway.rows("SELECT * FROM uploads")
    assert [(u["path"], u["state"]) for u in uploads] == [("/done.mp4", "complete")]


def test_names_with_spaces_quotes_newlines_unicode_and_leading_dash_work(
    gateway: RunningGateway, sftp: paramiko.SFTPClient
) -> None:
    names = ["a b.mp4", 'it\'s "q".mov', "line\nbreak.avi", "vidéo 東京.mkv", "-rf.mp4"]
    for name in names:
        sftp.putfo(io.BytesIO(name.encode()), name)
    assert sorted(sftp.listdir(".")) == sorted(names)
    for name in names:
        assert (gateway.home("alice") / name).read_bytes() == name.encode()
    gateway.wait_rows(lambda rs: len(rs) == len(names), sql="SELECT * FROM uploads")
    rows = gateway.rows("SELECT path FROM uploads ORDER BY id")
    assert [r["path"] for r in rows] == ["/" + n for n in names]


class _StubbornClient(asyncssh.SSHClient):
    """Answers every password prompt with a wrong password, counting the tries."""

    tries = 0

    def password_auth_requested(self) -> str:
        type(self).tries += 1
        return "wrong"


def test_too_many_wrong_passwords_disconnect_the_client(gateway: RunningGateway) -> None:
    async def attempt() -> None:
        await asyncssh.connect(
            "127.0.0.1",
            gateway.port,
            username="alice",
            known_hosts=None,
            client_factory=_StubbornClient,
            client_keys=None,
            preferred_auth="password",
        )

    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        asyncio.run(attempt())
    limit = gateway.config.server.max_auth_attempts
    rows = gateway.op_rows("login_failed", count=limit)
    assert len(rows) == limit
    assert _StubbornClient.tries == limit


def test_new_files_get_the_users_owner_and_overwritten_ones_keep_theirs(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    if os.geteuid() != 0:
        pytest.fail("run as root (CI does): only root acts as another user")
    running = start_gateway(tmp_path, user_keys, users={"alice": {"uid": 4242, "gid": 4343}})
    try:
        home = running.home("alice")
        os.chown(home, 4242, 4343)
        theirs = home / "theirs.bin"
        theirs.write_bytes(b"old")
        os.chown(theirs, 5151, 5252)
        theirs.chmod(0o666)
        private = home / "private.bin"
        private.write_bytes(b"not yours")
        os.chown(private, 5151, 5252)
        private.chmod(0o600)
        sftp = running.sftp("alice")
        sftp.putfo(io.BytesIO(b"new"), "new.bin")
        sftp.putfo(io.BytesIO(b"replaced"), "theirs.bin")  # opened with create + truncate
        with sftp.open("excl.bin", "wx") as f:  # an exclusive create
            f.write(b"x")
        for name in ("new.bin", "excl.bin"):
            st = (home / name).stat()
            assert (st.st_uid, st.st_gid) == (4242, 4343), name
        st = theirs.stat()
        assert (st.st_uid, st.st_gid, theirs.read_bytes()) == (5151, 5252, b"replaced")
        with pytest.raises(OSError):
            sftp.open("excl.bin", "wx")  # exclusive create of an existing file
        # The kernel, not the gateway, says no: the user acts as uid 4242.
        with pytest.raises(PermissionError):
            sftp.open("private.bin").read()
        assert private.read_bytes() == b"not yours"
        opens = running.op_rows("open", count=5)
        assert [r["status"] for r in opens] == [
            "ok",
            "ok",
            "ok",
            "file_already_exists",
            "permission_denied",
        ]
    finally:
        running.stop()
