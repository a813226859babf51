"""A slow filesystem call for one user must not stall anyone else.

Fault injection: a real NFS server that hangs on demand is not something a test
can start, so alice's filesystem layer is replaced by one whose ``write`` blocks
(a plain blocking call, as a hung NFS mount would) until the test releases it.
Everything else - server, client, bob's transfer - is real.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asyncssh.channel import SSHChannel

from conftest import start_gateway
from sftpgate.frontdoor.fsops import UserFS
from sftpgate.frontdoor.sftp import GatewaySFTPServer
from sftpgate.frontdoor.ssh import GatewaySSHServer
from sftpgate.frontdoor.writebehind import write_chunks

entered = threading.Event()
release = threading.Event()


class HungFS(UserFS):
    @staticmethod
    def write_chunks(fd: int, chunks: list[tuple[int, bytes]]) -> tuple[int, OSError | None]:
        entered.set()
        release.wait(60)  # blocks this worker thread, as a hung NFS write does
        return write_chunks(fd, chunks)


class SlowForAlice(GatewaySSHServer):
    def _make_sftp_server(self, chan: SSHChannel[bytes]) -> GatewaySFTPServer:
        server = super()._make_sftp_server(chan)
        if server.ctx.user.login == "alice":
            server.fs.__class__ = HungFS
            server._local = False  # her home stands for NFS: nothing runs inline
        return server


def test_one_users_hung_write_does_not_stall_another_users_transfer(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    running = start_gateway(tmp_path, user_keys, server_class=SlowForAlice)
    try:
        alice = running.sftp("alice")
        bob = running.sftp("bob", key=True)
        alice_done = threading.Event()

        def alice_upload() -> None:
            alice.putfo(io.BytesIO(b"a" * 100_000), "stuck.mp4")
            alice_done.set()

        thread = threading.Thread(target=alice_upload, daemon=True)
        thread.start()
        assert entered.wait(10), "alice's write never reached the filesystem"

        payload = b"b" * (2 * 1024 * 1024)
        bob.putfo(io.BytesIO(payload), "moving.mp4")  # would hang if the loop were blocked
        listing = bob.listdir(".")

        assert not alice_done.is_set(), "alice's write should still be hung"
        assert listing == ["moving.mp4"]
        assert (running.home("bob") / "moving.mp4").stat().st_size == len(payload)

        release.set()
        thread.join(10)
        assert alice_done.is_set()
        assert (running.home("alice") / "stuck.mp4").stat().st_size == 100_000
    finally:
        release.set()
        running.stop()


stat_entered = threading.Event()
stat_release = threading.Event()


class HungStatFS(UserFS):
    def stat(self, path: bytes) -> os.stat_result:
        stat_entered.set()
        stat_release.wait(60)  # a metadata call hung, as on an NFS server that went away
        return super().stat(path)


servers: list[GatewaySFTPServer] = []


class StatHangsForAlice(GatewaySSHServer):
    def _make_sftp_server(self, chan: SSHChannel[bytes]) -> GatewaySFTPServer:
        server = super()._make_sftp_server(chan)
        servers.append(server)
        if server.ctx.user.login == "alice":
            server.fs.__class__ = HungStatFS
        return server


def test_metadata_calls_stay_in_the_pool_when_inline_is_off(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    # What every NFS home gets: inline_local_metadata only applies to local disks.
    running = start_gateway(
        tmp_path,
        user_keys,
        extra={"server": {"inline_local_metadata": False, "inline_local_changes": False}},
        server_class=StatHangsForAlice,
    )
    alice = running.sftp("alice")
    thread = threading.Thread(target=lambda: alice.stat("."), daemon=True)
    try:
        bob = running.sftp("bob", key=True)
        thread.start()
        assert stat_entered.wait(10), "alice's stat never reached the filesystem"

        bob.putfo(io.BytesIO(b"b" * 65536), "moving.mp4")  # would hang if the loop were blocked
        assert bob.stat("moving.mp4").st_size == 65536
        assert thread.is_alive(), "alice's stat should still be hung"
        assert [s._local for s in servers] == [False, False]
    finally:
        stat_release.set()
        thread.join(10)  # alice's stat completes before her connection goes
        running.stop()
        servers.clear()


def test_homes_on_local_disks_make_metadata_calls_inline(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    running = start_gateway(tmp_path, user_keys, server_class=StatHangsForAlice)
    try:
        bob = running.sftp("bob", key=True)
        bob.putfo(io.BytesIO(b"b" * 100), "small.mp4")
        assert [s._local for s in servers] == [True]  # decided at bob's first request
    finally:
        running.stop()
        servers.clear()


def test_a_hung_home_at_session_start_does_not_stall_other_users(
    tmp_path: Path, user_keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: calls that look at alice's home (realpath, stat) hang,
    # as they would on an NFS server that went away. A session resolves its
    # home and its files' owner when it starts: that must happen in the pool,
    # where it stalls alice alone, not on the loop every session shares.
    running = start_gateway(tmp_path, user_keys)
    home = os.fspath(running.home("alice"))
    entered, release = threading.Event(), threading.Event()

    def hangs_for_alice(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(home):
                entered.set()
                release.wait(30)
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os.path, "realpath", hangs_for_alice(os.path.realpath))
    monkeypatch.setattr(os, "stat", hangs_for_alice(os.stat))
    alice_listing: list[list[str]] = []

    def alice_session() -> None:
        alice = running.sftp("alice")  # the SFTP session starts here
        alice_listing.append(alice.listdir("."))  # its first request

    def bob_session() -> None:
        bob = running.sftp("bob", key=True)
        bob.putfo(io.BytesIO(b"b" * 65536), "moving.mp4")
        assert bob.stat("moving.mp4").st_size == 65536

    alice = threading.Thread(target=alice_session, daemon=True)
    bob = threading.Thread(target=bob_session, daemon=True)
    try:
        alice.start()
        assert entered.wait(10), "nothing looked at alice's home"
        bob.start()
        bob.join(15)  # would hang if the loop were blocked
        assert not bob.is_alive(), "bob's session stalled behind alice's hung home"
        assert (running.home("bob") / "moving.mp4").stat().st_size == 65536
        assert alice.is_alive() and not alice_listing, "alice's request should still be hung"
        release.set()
        alice.join(10)
        assert alice_listing == [[]]
    finally:
        release.set()
        monkeypatch.undo()
        running.stop()
