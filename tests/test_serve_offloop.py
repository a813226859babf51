"""A slow filesystem call for one user must not stall anyone else.

Fault injection: a real NFS server that hangs on demand is not something a test
can start, so alice's filesystem layer is replaced by one whose ``write`` blocks
(a plain blocking call, as a hung NFS mount would) until the test releases it.
Everything else - server, client, bob's transfer - is real.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

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
