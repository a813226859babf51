"""What the gateway sends per request: no debug formatting, no padding packets."""

from __future__ import annotations

import asyncio
import io
import logging

import asyncssh
import paramiko
import pytest

from conftest import PASSWORDS, RunningGateway, asyncssh_login
from sftpgate.frontdoor.ssh import _LevelCheckedLogger


class Counted:
    def __init__(self) -> None:
        self.formatted = 0

    def __str__(self) -> str:
        self.formatted += 1
        return "attrs"


def test_arguments_are_not_formatted_below_the_level(caplog: pytest.LogCaptureFixture) -> None:
    logger = _LevelCheckedLogger(logging.getLogger("asyncssh.test-quiet"))
    arg = Counted()
    with caplog.at_level(logging.WARNING, logger="asyncssh.test-quiet"):
        logger.debug1("Received stat request for %s", arg)
    assert arg.formatted == 0
    assert caplog.records == []


def test_debug_logging_still_works_when_enabled(caplog: pytest.LogCaptureFixture) -> None:
    logger = _LevelCheckedLogger(logging.getLogger("asyncssh.test-loud"), context="conn=1")
    with caplog.at_level(logging.DEBUG, logger="asyncssh.test-loud"):
        logger.debug1("Received stat request for %s", Counted())
    assert [r.getMessage() for r in caplog.records] == ["[conn=1] Received stat request for attrs"]


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-ctr"])
def test_no_ignore_packet_goes_before_each_reply(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture, cipher: str
) -> None:
    # asyncssh logs each packet it sends at debug level 3; the test reads that log.
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            t = paramiko.Transport(("127.0.0.1", gateway.port))
            t.get_security_options().ciphers = (cipher,)
            t.connect(username="alice", password=PASSWORDS["alice"])
            try:
                sftp = paramiko.SFTPClient.from_transport(t)
                assert sftp is not None
                sftp.putfo(io.BytesIO(b"x" * 5000), "f.bin")
                with sftp.open("f.bin") as f:
                    assert f.read() == b"x" * 5000
                assert t.remote_cipher == cipher
            finally:
                t.close()
    finally:
        asyncssh.set_debug_level(1)
    sent = [r.getMessage() for r in caplog.records if "] Sent MSG_" in r.getMessage()]
    assert any("MSG_CHANNEL_DATA" in m for m in sent)
    assert not [m for m in sent if "MSG_IGNORE" in m]


async def _largest_write(port: int) -> int:
    async with (
        asyncssh_login(port) as conn,
        conn.start_sftp_client() as sftp,
    ):
        return int(sftp.limits.max_write_len)


def test_the_largest_write_offered_fits_in_one_ssh_packet(gateway: RunningGateway) -> None:
    # Clients that follow limits@openssh.com (asyncssh's, OpenSSH's) write that
    # much per request; if the request and its header don't fit in the packet
    # size the server advertises, every WRITE travels as two packets.
    largest = asyncio.run(_largest_write(gateway.port))
    assert largest == 256 * 1024
    t = paramiko.Transport(("127.0.0.1", gateway.port))
    t.connect(username="alice", password=PASSWORDS["alice"])
    try:
        chan = t.open_session()
        # WRITE: length, type, id, handle (string), offset, data (string)
        header = 4 + 1 + 4 + (4 + 16) + 8 + 4
        assert chan.out_max_packet_size >= largest + header
        chan.close()
    finally:
        t.close()
