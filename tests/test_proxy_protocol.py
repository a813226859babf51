"""The PROXY protocol: the parser on bytes, then real headers on real sockets to a real gateway
(paramiko logs in over the same socket once the header is sent), and HAProxy in front."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from conftest import PASSWORDS, RunningGateway, free_port, need_tool, start_gateway
from sftpgate.proxyproto import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    is_header,
    might_be_header,
    parse,
)

LISTED = "127.0.0.1"
UNLISTED = "127.0.0.2"  # loopback too, but not a balancer
TIMEOUT = 1.0


def v2(command: int, family: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp4(src: str, sport: int, dst: str = "192.0.2.1", dport: int = 22) -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, addresses)


# -- the parser ----------------------------------------------------------------------------


def test_v1_tcp4_tcp6_and_unknown_headers_parse_with_their_length() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 22\r\n"
    assert parse(line + b"SSH-2.0-x\r\n") == ProxyHeader(
        1, len(line), ("203.0.113.7", 51000), ("192.0.2.1", 22)
    )
    line6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n"
    header = parse(line6)
    assert header is not None and header.source == ("2001:db8::7", 1)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, 15)


def test_v2_proxy_tcp4_tcp6_local_and_tlvs_parse() -> None:
    raw = v2_tcp4("198.51.100.9", 40000)
    assert parse(raw + b"SSH-") == ProxyHeader(
        2, len(raw), ("198.51.100.9", 40000), ("192.0.2.1", 22)
    )
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::9") * 2 + struct.pack("!HH", 5, 6)
    header = parse(v2(1, 0x21, six, tlvs=b"\x05\x00\x02ab"))
    assert (
        header is not None and header.source == ("2001:db8::9", 5) and header.length == 16 + 36 + 5
    )
    local = v2(0, 0x00, b"")
    assert parse(local) == ProxyHeader(2, 16)  # a health check: the connection's own address


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n",  # a port missing
        b"PROXY TCP4 203.0.113.999 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",  # the wrong family
        b"PROXY TCP4 203.0.113.7 192.0.2.1 051000 22\r\n",  # a leading zero
        b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 22\r\n",
        b"PROXY UDP4 203.0.113.7 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\n",  # LF alone
        b"PROXY " + b"9" * 200,  # no CRLF within 107 bytes
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
        V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216),  # a Unix socket
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # too short for two IPv4 addresses
        V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000),  # would buffer 60 kB
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c",
    ],
)
def test_malformed_or_foreign_bytes_are_not_a_header(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_a_partial_header_asks_for_more_bytes() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 22\r\n"
    raw = v2_tcp4("198.51.100.9", 40000)
    for cut in range(len(line)):
        assert parse(line[:cut]) is None
    for cut in range(len(raw)):
        assert parse(raw[:cut]) is None
    assert might_be_header(b"PRO") and might_be_header(b"\r\n\r\n") and not might_be_header(b"SSH")
    assert is_header(b"PROXY TCP4") and not is_header(b"PROX")


# -- a real gateway ------------------------------------------------------------------------


@pytest.fixture
def gate(tmp_path: Path, user_keys: dict[str, Path]) -> Iterator[RunningGateway]:
    running = start_gateway(
        tmp_path,
        user_keys,
        extra={
            "server": {"proxy_protocol_from": [f"{LISTED}/32"], "proxy_protocol_timeout": TIMEOUT},
            # The refusal rows below are not merged into one a second.
            "defender": {"score_protocol_error": 5},
        },
    )
    try:
        yield running
    finally:
        running.stop()


def connect(port: int, source: str, header: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if header:
        sock.sendall(header)
    return sock


def login_over(sock: socket.socket) -> None:
    t = paramiko.Transport(sock)
    try:
        t.connect(username="alice", password=PASSWORDS["alice"])
        client = paramiko.SFTPClient.from_transport(t)
        assert client is not None
        client.listdir(".")
    finally:
        t.close()


def closed_without_banner(sock: socket.socket, within: float) -> float:
    """Seconds until the gateway closed ``sock`` (having sent nothing); fails past ``within``."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        data = sock.recv(256)
    except ConnectionResetError:
        data = b""
    finally:
        sock.close()
    assert data == b"", f"the gateway answered: {data!r}"
    return time.monotonic() - start


def sessions(gate: RunningGateway, count: int) -> list[dict[str, object]]:
    return gate.wait_rows(
        lambda rows: len(rows) >= count,
        "SELECT * FROM sessions WHERE login = 'alice' ORDER BY rowid",
    )


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 22\r\n", ("203.0.113.7", 51000)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 22\r\n", ("2001:db8::7", 4242)),
        (v2_tcp4("198.51.100.9", 40000), ("198.51.100.9", 40000)),
    ],
)
def test_a_listed_balancers_header_names_the_client_in_the_journal(
    gate: RunningGateway, header: bytes, client: tuple[str, int]
) -> None:
    login_over(connect(gate.port, LISTED, header))
    (row,) = sessions(gate, 1)
    assert (row["remote_addr"], row["remote_port"]) == client
    ops = gate.op_rows("logout")
    assert ops[0]["remote_addr"] == client[0]


def test_v2_local_keeps_the_balancers_own_address(gate: RunningGateway) -> None:
    login_over(connect(gate.port, LISTED, v2(0, 0x00, b"")))
    (row,) = sessions(gate, 1)
    assert row["remote_addr"] == LISTED


def test_a_header_from_an_unlisted_address_is_refused_journaled_and_scored(
    gate: RunningGateway,
) -> None:
    sock = connect(gate.port, UNLISTED, b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 22\r\n")
    sock.settimeout(10)
    try:
        while sock.recv(
            4096
        ):  # our version line may come first (it goes out at once); then the close
            pass
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    rows = gate.op_rows("refused")
    assert rows[0]["remote_addr"] == UNLISTED
    assert "proxy_protocol_from" in (rows[0]["message"] or "")
    assert gate.gateway.guard is not None
    assert gate.gateway.guard.defender.score(UNLISTED) == 5
    # Without a header the same address is an ordinary client.
    login_over(connect(gate.port, UNLISTED))
    (row,) = sessions(gate, 1)
    assert row["remote_addr"] == UNLISTED


@pytest.mark.parametrize(
    "first",
    [
        b"SSH-2.0-OpenSSH_9.2p1\r\n",  # no header at all
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c" + bytes(12),
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_a_listed_balancer_without_a_valid_header_is_refused_unscored(
    gate: RunningGateway, first: bytes
) -> None:
    assert closed_without_banner(connect(gate.port, LISTED, first), TIMEOUT + 5) < TIMEOUT
    rows = gate.op_rows("refused")
    assert rows[0]["remote_addr"] == LISTED and "PROXY" in (rows[0]["message"] or "")
    assert gate.gateway.guard is not None
    assert gate.gateway.guard.defender.score(LISTED) == 0  # a ban would shut out every client


def test_a_slow_header_is_cut_off_at_the_timeout(gate: RunningGateway) -> None:
    sock = connect(gate.port, LISTED, b"PROXY TCP4 203.0.113.7 ")  # and nothing more
    took = closed_without_banner(sock, TIMEOUT + 10)
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 5
    rows = gate.op_rows("refused")
    assert "within" in (rows[0]["message"] or "")


# -- HAProxy in front ----------------------------------------------------------------------


def test_haproxy_send_proxy_v2_puts_the_clients_address_in_the_journal(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    haproxy = need_tool("haproxy", "haproxy")
    running = start_gateway(
        tmp_path,
        user_keys,
        extra={"server": {"proxy_protocol_from": [LISTED]}},
    )
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 100\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        f"frontend sftp\n  bind 127.0.0.3:{front}\n  default_backend gateways\n"
        "backend gateways\n"
        f"  server gw1 127.0.0.1:{running.port} send-proxy-v2\n"
    )
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.3", front), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "haproxy did not start"
                time.sleep(0.1)
        # The client comes from 127.0.0.4; the gateway sees only HAProxy (127.0.0.1).
        sock = socket.create_connection(
            ("127.0.0.3", front), timeout=10, source_address=("127.0.0.4", 0)
        )
        login_over(sock)
        rows = running.wait_rows(
            lambda rows: any(r["login"] == "alice" for r in rows),
            "SELECT * FROM sessions ORDER BY rowid",
        )
        alice = [r for r in rows if r["login"] == "alice"]
        assert [r["remote_addr"] for r in alice] == ["127.0.0.4"]
    finally:
        proc.terminate()
        proc.wait(10)
        running.stop()


def test_the_defender_scores_the_proxied_client_not_the_balancer(gate: RunningGateway) -> None:
    sock = connect(gate.port, LISTED, b"PROXY TCP4 203.0.113.50 192.0.2.1 40000 22\r\n")
    t = paramiko.Transport(sock)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            t.connect(username="alice", password="wrong")
    finally:
        t.close()
    assert gate.gateway.guard is not None
    defender = gate.gateway.guard.defender
    deadline = time.monotonic() + 10
    while defender.score("203.0.113.50") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert defender.score("203.0.113.50") >= 1
    assert defender.score(LISTED) == 0
    rows = gate.op_rows("login_failed")
    assert rows[0]["remote_addr"] == "203.0.113.50"


def test_balancer_health_checks_are_neither_journaled_nor_scored(gate: RunningGateway) -> None:
    connect(gate.port, LISTED).close()  # a TCP check: connect, close, not a byte
    local = connect(gate.port, LISTED, v2(0, 0x00, b""))  # check-send-proxy: LOCAL, then close
    local.settimeout(10)
    assert local.recv(4096).startswith(b"SSH-")  # past the gate: our version line
    local.close()
    # A barrier: a refusal after both, then every refusal row so far.
    closed_without_banner(connect(gate.port, LISTED, b"GET / HTTP/1.0\r\n"), TIMEOUT + 5)
    rows = gate.op_rows("refused")
    assert len(rows) == 1 and "no PROXY header" in (rows[0]["message"] or ""), rows
    assert gate.gateway.guard is not None
    assert gate.gateway.guard.defender.score(LISTED) == 0
