"""The PROXY protocol (HAProxy's v1 text and v2 binary headers), in front of asyncssh.

A TCP load balancer hides the client: every connection comes from the balancer.
With ``server.proxy_protocol_from`` the balancer starts each connection with a
header naming the client, and that address becomes the session's address
everywhere (journal, xferlog, defender, door limits).

Trust is by the connecting address only: a connection from a listed balancer
must start with a valid header, read with a bounded buffer and a timeout, or it
is refused; a connection from anywhere else that starts with a header is
refused too (anyone could otherwise claim any address). The parser is pure;
:class:`ProxyGate` is the asyncio protocol that reads the header and then hands
the very same transport to asyncssh, so nothing sits between asyncssh and the
socket once the header is gone (the fast paths see the transport they expect).

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's longest v1 line, CRLF included
# v2: 16 fixed bytes and the address block; HAProxy adds TLVs (unique id, SSL facts,
# a few hundred bytes at most). More than this is refused rather than buffered.
V2_MAX_PAYLOAD = 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(ValueError):
    """Bytes that are not a valid PROXY header (the message says what is wrong)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. ``source`` is None for v2 LOCAL and v1 UNKNOWN (health checks):
    the connection's own address stands."""

    version: int
    length: int  # bytes the header took
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def might_be_header(data: bytes) -> bool:
    """Whether ``data`` (a connection's first bytes) is, or may become, a PROXY header. Pure."""
    return any(data[: len(p)] == p[: len(data)] for p in (V1_PREFIX, V2_SIGNATURE))


def is_header(data: bytes) -> bool:
    """Whether ``data`` starts with a PROXY header's signature (v1 or v2). Pure."""
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed. Pure.

    Raises :class:`ProxyHeaderError` for anything else: another protocol, a
    malformed or over-long header, a family other than TCP over IPv4 or IPv6.
    """
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data:
        raise ProxyHeaderError("no PROXY header")
    return None


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyHeaderError(f"v1: bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"v1: bad port {port}")
    return port


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if data[: len(V1_PREFIX)] != V1_PREFIX[: len(data)]:
        raise ProxyHeaderError("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1: no CRLF within {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("v1: a line not ended by CRLF")
        return None
    line = data[:end]
    length = end + 2
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, length)
    if len(parts) != 6:
        raise ProxyHeaderError("v1: expected PROXY TCP4|TCP6 src dst sport dport")
    _, family, src, dst, sport, dport = parts
    kinds = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}
    kind = kinds.get(family)
    if kind is None:
        raise ProxyHeaderError(f"v1: unknown family {family[:8]!r}")
    try:
        source = kind(src.decode("ascii"))
        destination = kind(dst.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("v1: bad address") from None
    return ProxyHeader(1, length, (str(source), _port(sport)), (str(destination), _port(dport)))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyHeaderError("no PROXY header")
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2: version {version}")
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2: command {command}")
    family = data[13]
    (payload,) = struct.unpack_from("!H", data, 14)
    if payload > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2: {payload} bytes of addresses, more than {V2_MAX_PAYLOAD}")
    length = 16 + payload
    if len(data) < length:
        return None
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return ProxyHeader(2, length)
    if family == 0x00:  # UNSPEC: the receiver keeps the connection's address
        return ProxyHeader(2, length)
    sizes = {0x11: (4, socket.AF_INET), 0x21: (16, socket.AF_INET6)}
    if family not in sizes:
        raise ProxyHeaderError(f"v2: family/protocol 0x{family:02x} is not TCP over IP")
    size, af = sizes[family]
    if payload < 2 * size + 4:
        raise ProxyHeaderError("v2: address block too short")
    src = socket.inet_ntop(af, data[16 : 16 + size])
    dst = socket.inet_ntop(af, data[16 + size : 16 + 2 * size])
    sport, dport = struct.unpack_from("!HH", data, 16 + 2 * size)
    return ProxyHeader(2, length, (src, sport), (dst, dport))


def networks(items: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(item, strict=False) for item in items]


def listed(address: str, nets: list[Network]) -> bool:
    """Whether ``address`` (an IPv4-mapped IPv6 address counts as IPv4) is in ``nets``. Pure."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in nets)


# refused(address, port, why, score): journal the refusal; score it against the address when
# ``score`` (never the balancer's own address: that would ban every customer behind it).
Refused = Callable[[str, int, str, bool], None]
# untrusted_header(inner_protocol, address, port, why): the inner connection is already up
# (its version line sent): it must refuse itself, so it is journaled and scored once.
UntrustedHeader = Callable[[asyncio.BaseProtocol, str, int, str], None]


class ProxyGate(asyncio.Protocol):
    """Reads a PROXY header (from a listed balancer), then hands the transport to ``inner``.

    From an unlisted address the inner protocol starts at once (no delay to
    the server's version line); the gate only watches the first bytes and steps
    aside as soon as they cannot be a PROXY header.
    """

    def __init__(
        self,
        inner: Callable[[], asyncio.Protocol],
        trusted: list[Network],
        timeout: float,
        refused: Refused,
        untrusted_header: UntrustedHeader,
    ) -> None:
        self._inner_factory = inner
        self._trusted = trusted
        self._timeout = timeout
        self._refused = refused
        self._untrusted_header = untrusted_header
        self._transport: asyncio.Transport | None = None
        self._inner: asyncio.Protocol | None = None
        self._buffer = b""
        self._peer: tuple[str, int] = ("?", 0)
        self._timer: asyncio.TimerHandle | None = None
        self._listed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self._peer = (str(peer[0]), int(peer[1]))
        self._listed = listed(self._peer[0], self._trusted)
        if self._listed:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._too_slow)
        else:
            self._inner = self._inner_factory()
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._buffer += data
        if not self._listed:
            self._watch()
            return
        try:
            header = parse(self._buffer)
        except ProxyHeaderError as exc:
            self._refuse(f"PROXY header from a listed balancer: {exc}")
            return
        if header is not None:
            self._hand_over(header)

    def _watch(self) -> None:
        """Unlisted address: step aside unless its first bytes are a PROXY header."""
        assert self._transport is not None and self._inner is not None
        if is_header(self._buffer):
            transport, self._transport = self._transport, None
            why = "PROXY header from an address not in server.proxy_protocol_from"
            log.warning("refused %s:%d: %s", self._peer[0], self._peer[1], why)
            self._untrusted_header(self._inner, self._peer[0], self._peer[1], why)
            transport.abort()
            return
        if might_be_header(self._buffer):
            return  # too few bytes to tell yet
        data, self._buffer = self._buffer, b""
        self._transport.set_protocol(self._inner)
        self._transport = None
        self._inner.data_received(data)

    def _hand_over(self, header: ProxyHeader) -> None:
        transport = self._transport
        assert transport is not None
        self._cancel_timer()
        rest = self._buffer[header.length :]
        self._buffer = b""
        inner = self._inner_factory()
        set_extra = getattr(inner, "set_extra_info", None)
        if header.source is not None and set_extra is not None:
            # asyncssh reads its extra info before the transport's: the session's address
            # (and everything keyed by it) is now the client's, not the balancer's.
            set_extra(peername=header.source, proxied_by=self._peer)
        self._inner = inner
        self._transport = None
        transport.set_protocol(inner)
        inner.connection_made(transport)
        if rest and not transport.is_closing():
            inner.data_received(rest)

    def _too_slow(self) -> None:
        self._timer = None
        self._refuse(f"no complete PROXY header within {self._timeout:g} s")

    def _refuse(self, why: str) -> None:
        transport, self._transport = self._transport, None
        self._cancel_timer()
        if transport is None:
            return
        log.warning("refused %s:%d: %s", self._peer[0], self._peer[1], why)
        self._refused(self._peer[0], self._peer[1], why, False)
        transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        if not self._buffer:
            # Connected and closed without a byte: a balancer's TCP health check.
            self._quiet_close()
            return None
        self._refuse("closed before a complete PROXY header")
        return None

    def _quiet_close(self) -> None:
        transport, self._transport = self._transport, None
        self._cancel_timer()
        if transport is not None:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class ProxyListener:
    """asyncssh's ``listen(tunnel=...)`` hook: the same listener, each connection behind a
    :class:`ProxyGate`. Only asyncssh's public tunnel interface is used."""

    def __init__(
        self,
        trusted: Iterable[str],
        timeout: float,
        refused: Refused,
        untrusted_header: UntrustedHeader,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.trusted = networks(trusted)
        self.timeout = timeout
        self.refused = refused
        self.untrusted_header = untrusted_header
        self.reuse_port = reuse_port

    async def create_server(
        self, session_factory: Callable[[str, int], Any], host: str, port: int
    ) -> asyncio.AbstractServer:
        def gate() -> ProxyGate:
            return ProxyGate(
                lambda: session_factory("", 0),
                self.trusted,
                self.timeout,
                self.refused,
                self.untrusted_header,
            )

        loop = asyncio.get_running_loop()
        return await loop.create_server(
            gate, host or None, port, reuse_address=True, reuse_port=self.reuse_port or None
        )
