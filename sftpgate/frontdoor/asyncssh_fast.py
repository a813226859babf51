"""Every use of asyncssh's internals, in one place: checked at start, with an off switch.

``sftpgate serve`` runs on asyncssh's public API (``SSHServer``,
``SSHServerSession.data_received``, the channel's ``write``; see handler.py).
Four speed-ups reach further, into asyncssh's private send and receive state
(measured in docs/benchmarks.md):

- :func:`skip_cbc_ignores`: no empty MSG_IGNORE before every packet of a
  non-CBC cipher (it doubled the packets of every reply);
- :func:`feed_whole_packets`: asyncssh's packet parser gets each received
  byte once, not re-sliced after every packet;
- :func:`deliver_data_directly` and :func:`quieten_packet_logs`: CHANNEL_DATA
  reaches the session in one call, without building log lines nobody reads;
- :func:`send_at_once`: a reply that fits the window goes out as one
  CHANNEL_DATA packet, not through the channel's send queue.

Each reads (and, where noted, keeps as asyncssh does) private attributes of
asyncssh 2.24. :func:`available` checks once, at start, that asyncssh is that
line and that every name below exists with the kind used here; if anything is
missing it logs ONE warning naming it and every session uses the public path
only, which serves the same SFTP (slower). ``server.fast_paths: off`` skips
them all. Nothing else in sftpgate touches a private asyncssh name.
"""

from __future__ import annotations

import inspect
import logging
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import asyncssh

from .bytequeue import ByteQueue

log = logging.getLogger(__name__)

# The asyncssh line these internals were read from and tested with (pyproject pins it).
TESTED = "2.24"

_U32 = struct.Struct(">I")


def _constant(name: str) -> int:
    # Read once here, not imported: a missing one is reported by missing(), not an ImportError.
    return int(getattr(getattr(asyncssh, "constants", None), name, -1))


MSG_IGNORE = _constant("MSG_IGNORE")
MSG_CHANNEL_DATA = _constant("MSG_CHANNEL_DATA")
MSG_CHANNEL_WINDOW_ADJUST = _constant("MSG_CHANNEL_WINDOW_ADJUST")

# (module attribute path, kind, detail): kind "method" = callable on the class
# taking ``detail`` positional arguments after self (None: not checked);
# "field" = a name asyncssh's own code of that class uses (an instance
# attribute); "int" = a module constant.
_NEEDED: tuple[tuple[str, str | None, str, Any], ...] = (
    ("connection", "SSHConnection", "send_packet", ("method", None)),
    ("connection", "SSHConnection", "data_received", ("method", 2)),
    ("connection", "SSHConnection", "_recv_pkthdr", ("method", 0)),
    ("connection", "SSHConnection", "_recv_packet", ("method", 0)),
    ("connection", "SSHConnection", "_send_encryption", ("field", None)),
    ("connection", "SSHConnection", "_recv_handler", ("field", None)),
    ("connection", "SSHConnection", "_recv_blocksize", ("field", None)),
    ("connection", "SSHConnection", "_recv_macsize", ("field", None)),
    ("connection", "SSHConnection", "_inpbuf", ("field", None)),
    ("connection", "SSHConnection", "_pktlen", ("field", None)),
    ("connection", "SSHConnection", "_transport", ("field", None)),
    ("channel", "SSHChannel", "process_packet", ("method", 3)),
    ("channel", "SSHChannel", "send_packet", ("method", None)),
    ("channel", "SSHChannel", "log_sent_packet", ("method", None)),
    ("channel", "SSHChannel", "log_received_packet", ("method", None)),
    ("channel", "SSHChannel", "_send_state", ("field", None)),
    ("channel", "SSHChannel", "_send_buf", ("field", None)),
    ("channel", "SSHChannel", "_send_paused", ("field", None)),
    ("channel", "SSHChannel", "_send_window", ("field", None)),
    ("channel", "SSHChannel", "_send_pktsize", ("field", None)),
    ("channel", "SSHChannel", "_send_chan", ("field", None)),
    ("channel", "SSHChannel", "_conn", ("field", None)),
    ("channel", "SSHChannel", "_recv_state", ("field", None)),
    ("channel", "SSHChannel", "_recv_paused", ("field", None)),
    ("channel", "SSHChannel", "_recv_window", ("field", None)),
    ("channel", "SSHChannel", "_init_recv_window", ("field", None)),
    ("channel", "SSHChannel", "_encoding", ("field", None)),
    ("packet", "SSHPacket", "get_string", ("method", 0)),
    ("packet", "SSHPacket", "check_end", ("method", 0)),
    ("logging", "SSHLogger", "_debug_level", ("int", None)),
    ("constants", None, "MSG_IGNORE", ("int", None)),
    ("constants", None, "MSG_CHANNEL_DATA", ("int", None)),
    ("constants", None, "MSG_CHANNEL_WINDOW_ADJUST", ("int", None)),
)

# Instance attributes install_connection/install_channel look for on the real objects.
_CONN_FIELDS = tuple(n for m, c, n, (k, _) in _NEEDED if c == "SSHConnection" and k == "field")
_CHAN_FIELDS = tuple(n for m, c, n, (k, _) in _NEEDED if c == "SSHChannel" and k == "field")


def _names_used(cls: type) -> set[str]:
    """Every attribute name the code of ``cls`` (and its bases) refers to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            code = getattr(value, "__code__", None)
            if code is not None:
                names.update(code.co_names)
    return names


def _arity(fn: Callable[..., Any]) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) - 1


def missing(package: ModuleType | Any = asyncssh) -> list[str]:
    """What the speed-ups need and ``package`` (asyncssh) lacks; empty when all is there.

    Checks the version line (:data:`TESTED`) and each private name of
    :data:`_NEEDED`: methods are callable with the expected arity, fields
    are used by the class's own code, constants are ints.
    """
    problems: list[str] = []
    version = str(getattr(package, "__version__", "?"))
    if version != TESTED and not version.startswith(TESTED + "."):
        problems.append(f"asyncssh {version} (tested: {TESTED}.x)")
    used: dict[str, set[str]] = {}
    for module_name, class_name, name, (kind, detail) in _NEEDED:
        where = f"asyncssh.{module_name}" + (f".{class_name}" if class_name else "")
        module = getattr(package, module_name, None)
        owner = module if class_name is None else getattr(module, class_name, None)
        if owner is None:
            problems.append(f"{where} (absent)")
            continue
        if kind == "field":
            if where not in used:
                used[where] = _names_used(owner) if isinstance(owner, type) else set()
            if name not in used[where]:
                problems.append(f"{where}.{name}")
            continue
        value = getattr(owner, name, None)
        if kind == "int" and not isinstance(value, int):
            problems.append(f"{where}.{name}")
        elif kind == "method":
            if not callable(value):
                problems.append(f"{where}.{name}")
            elif detail is not None and _arity(value) != detail:
                problems.append(f"{where}.{name} (arguments changed)")
    return problems


@dataclass(slots=True)
class _State:
    checked: bool = False
    ok: bool = False


_state = _State()


def available(package: ModuleType | Any = asyncssh, *, refresh: bool = False) -> bool:
    """Whether the speed-ups may be used; checked once (again with ``refresh``).

    When they may not, logs one warning naming what is missing: the gateway
    then runs every session on asyncssh's public API.
    """
    if refresh or not _state.checked:
        problems = missing(package)
        _state.checked, _state.ok = True, not problems
        if problems:
            log.warning(
                "server.fast_paths: asyncssh internals not as tested (%s); serving on "
                "asyncssh's public API only (slower, same SFTP)",
                ", ".join(problems),
            )
    return _state.ok


def _has_fields(obj: object, names: tuple[str, ...]) -> bool:
    absent = [name for name in names if not hasattr(obj, name)]
    if absent:
        log.warning(
            "server.fast_paths: %s has no %s; this one stays on the public path",
            type(obj).__name__,
            ", ".join(absent),
        )
    return not absent


# -- the connection -------------------------------------------------------------


_EMPTY_STRING = b"\0\0\0\0"
# A read this small goes to asyncssh's parser at once (see feed_whole_packets).
SMALL_READ = 16 * 1024


def install_connection(conn: asyncssh.SSHServerConnection) -> bool:
    """Apply the connection's speed-ups; False (and unchanged) if its fields are not there."""
    if not _has_fields(conn, _CONN_FIELDS):
        return False
    skip_cbc_ignores(conn)
    feed_whole_packets(conn)
    return True


def skip_cbc_ignores(conn: asyncssh.SSHServerConnection) -> None:
    """Don't send asyncssh's MSG_IGNORE before every packet unless the cipher is CBC.

    asyncssh puts an empty MSG_IGNORE ahead of each packet it encrypts: RFC 4251
    §9.3.1's countermeasure for CBC, whose IV is the previous ciphertext block.
    CTR and AEAD ciphers (aes-gcm, chacha20-poly1305, what clients pick) don't
    need it, and OpenSSH never sends it; it doubled the packets, encryptions
    and send calls of every SFTP reply. The connection's own send_packet is
    wrapped; every other packet passes unchanged.
    """
    send_packet = conn.send_packet
    c: Any = conn  # asyncssh's send state is private: read here, never written
    # The decision for the current send keys (they change at each rekey).
    decided: list[Any] = [None, False]

    def send(pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY_STRING,) and not kwargs:
            keys = c._send_encryption
            if keys is not decided[0]:
                cipher = conn.get_extra_info("send_cipher") or ""
                decided[:] = [keys, bool(cipher) and "-cbc" not in cipher]
            if decided[1]:
                return
        send_packet(pkttype, *args, **kwargs)

    conn.send_packet = send  # type: ignore[method-assign]


def feed_whole_packets(conn: asyncssh.SSHServerConnection) -> None:
    """Hand asyncssh's packet parser only the bytes it is waiting for.

    asyncssh appends each read to one bytes buffer and re-slices what is left
    after every packet, so a 256 KiB read holding eight 32 KiB packets (what
    OpenSSH's client sends) is copied many times over: ~45% of the event loop
    during a 1 GiB upload. Received bytes wait here instead, in a
    :class:`ByteQueue` (each read kept as it came, see bytequeue.py), and
    asyncssh gets exactly the header or packet body it needs next, so each
    byte is copied once (interleaved A/B, 512 MiB: 1.13-1.22x with OpenSSH's
    sftp client). Before packets start (the version line), or in any state not
    recognised here, everything is passed on at once, as asyncssh expects.

    A read of at most :data:`SMALL_READ` bytes with nothing waiting before
    it is handed on whole too: re-slicing a few KiB costs nothing, and a
    small request (header and body, usually one read) then takes one trip
    through asyncssh's receive entry instead of two.
    """
    received = conn.data_received
    pending = ByteQueue()
    _PENDING[conn] = pending
    c: Any = conn  # asyncssh's receive state is private: read here, never written

    def needed() -> int:
        handler = c._recv_handler
        if handler == c._recv_pkthdr:
            return int(c._recv_blocksize) - len(c._inpbuf)
        if handler == c._recv_packet:
            rest = 4 + c._pktlen + c._recv_macsize - c._recv_blocksize
            return int(rest) - len(c._inpbuf)
        return 0  # not parsing packets: pass everything on

    def data_received(data: bytes, datatype: Any = None) -> None:
        if not pending and len(data) <= SMALL_READ:
            received(data)
            return
        pending.append(data)
        while pending:
            want = needed()
            if want > len(pending):
                return  # wait for the rest of this header or packet
            chunk = pending.take(len(pending) if want <= 0 else want)
            received(chunk)
            if c._transport is None:  # the connection closed while parsing
                pending.clear()
                return

    conn.data_received = data_received  # type: ignore[method-assign]


# -- the channel ------------------------------------------------------------------


def install_channel(chan: Any, deliver: Callable[[bytes, Any], None]) -> bool:
    """Apply the channel's receive speed-ups (``deliver``: the session's data_received).

    False (and the channel unchanged) if its fields are not there; then
    :func:`send_at_once` must not be used on it either.
    """
    if not _has_fields(chan, _CHAN_FIELDS):
        return False
    quieten_packet_logs(chan)
    deliver_data_directly(chan, deliver)
    return True


def quieten_packet_logs(chan: Any) -> None:
    """Skip asyncssh's packet log line for each data packet unless it will be written.

    asyncssh logs packets only at its debug level 3, but the channel built
    the line first (packet name, a plural of the size) for every packet sent
    and received: two per request.
    """
    logger: Any = asyncssh.logging.SSHLogger
    log_sent, log_received = chan.log_sent_packet, chan.log_received_packet

    def log_sent_packet(*args: Any) -> None:
        if logger._debug_level >= 3:
            log_sent(*args)

    def log_received_packet(*args: Any) -> None:
        if logger._debug_level >= 3:
            log_received(*args)

    chan.log_sent_packet = log_sent_packet
    chan.log_received_packet = log_received_packet


def deliver_data_directly(chan: Any, deliver: Callable[[bytes, Any], None]) -> None:
    """Hand CHANNEL_DATA to the session in one call instead of asyncssh's five.

    asyncssh dispatches each data packet through a handler table, then
    ``_process_data``, ``_accept_data`` and ``_deliver_data``, logging at
    debug level on the way. Here, while the channel is open, not paused and
    without an encoding (always so for sftp), the same checks and window
    bookkeeping run in one function; anything else takes asyncssh's path.
    """
    c: Any = chan  # asyncssh's receive state is private: kept here as asyncssh does
    process_packet = chan.process_packet

    def process(pkttype: int, pktid: int, packet: Any) -> Any:
        if (
            pkttype != MSG_CHANNEL_DATA
            or c._recv_state != "open"
            or c._recv_paused
            or c._encoding
            or c._send_state in ("close_pending", "closed")
        ):
            return process_packet(pkttype, pktid, packet)
        data = packet.get_string()
        packet.check_end()
        size = len(data)
        if size > c._recv_window:
            raise asyncssh.ProtocolError("Window exceeded")
        if size:
            c._recv_window -= size
            if c._recv_window < c._init_recv_window / 2:
                adjust = c._init_recv_window - c._recv_window
                chan.send_packet(MSG_CHANNEL_WINDOW_ADJUST, _U32.pack(adjust))
                c._recv_window = c._init_recv_window
            deliver(data, None)
        return True

    chan.process_packet = process


def send_at_once(chan: Any, data: bytes) -> bool:
    """Send ``data`` as one channel data packet now, if it may go at once; else False.

    What ``channel.write`` ends in when nothing waits to be sent and the
    reply fits the peer's window and packet size (every reply but a big
    READ's, when the client keeps its window open): the window shrinks by
    the reply, and the connection sends one CHANNEL_DATA packet. The
    channel's own path copied each reply into a bytearray, queued it, and
    took it off again through four more calls, for every request. Only for
    a channel :func:`install_channel` accepted.
    """
    c: Any = chan  # asyncssh's send state is private: read here, the window kept as it does
    size = len(data)
    if (
        c._send_state != "open"
        or c._send_buf
        or c._send_paused
        or size > c._send_window
        or size > c._send_pktsize
        or c._send_chan is None
    ):
        return False
    c._send_window -= size
    c._conn.send_packet(
        MSG_CHANNEL_DATA, _U32.pack(c._send_chan) + _U32.pack(size) + data, handler=chan
    )
    return True


# -- the connection's socket, paused for the memory budget -------------------------

# Most bytes asyncio reads from the socket at once, once a connection has waited for
# the memory budget (asyncio's own: 256 KiB; its transport's ``max_size``).
PRESSED_READ = 64 * 1024

# Channels of a connection that asked for its socket to stop being read (usually one).
_PAUSED: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# Each connection's bytes read and not yet parsed (see feed_whole_packets).
_PENDING: weakref.WeakKeyDictionary[Any, ByteQueue] = weakref.WeakKeyDictionary()


def pause_transport(chan: Any) -> None:
    """Stop reading the socket of ``chan``'s connection (for the memory budget; see channel.py).

    Pausing only the channel stops it re-opening its SSH window, but a
    window already granted (8 MiB) still arrives and is held by asyncssh;
    with the socket unread, a client's bytes wait in the kernel instead.
    asyncssh itself never pauses a connection's transport, so the count
    here is the only one. Only for a channel :func:`install_channel` accepted.
    """
    c: Any = chan
    conn = c._conn
    transport = getattr(conn, "_transport", None) if conn is not None else None
    if transport is None:
        return
    count = _PAUSED.get(conn, 0)
    _PAUSED[conn] = count + 1
    if count == 0 and transport.is_reading():
        transport.pause_reading()
        # asyncio reads up to 256 KiB at a time, and a read stays alive while any
        # packet of it waits (here, in asyncssh's channel buffer): under load, with
        # hundreds of connections, that was most of the gateway's memory (256
        # sessions x 16 MiB: ~400 MB peak, ~170 MB with 64 KiB reads, same MB/s). A
        # connection that once had to wait for the budget reads less at a time.
        if getattr(transport, "max_size", 0) > PRESSED_READ:
            transport.max_size = PRESSED_READ
        # The part of a packet waiting for the rest keeps its whole socket read
        # (up to 256 KiB) alive while paused: keep a copy of just that part.
        pending = _PENDING.get(conn)
        if pending:
            pending.append(pending.take(len(pending)))


def resume_transport(chan: Any) -> None:
    """Undo one :func:`pause_transport` of ``chan``; read the socket again when none is left."""
    c: Any = chan
    conn = c._conn
    if conn is None or conn not in _PAUSED:
        return
    count = _PAUSED[conn] - 1
    if count > 0:
        _PAUSED[conn] = count
        return
    del _PAUSED[conn]
    transport = getattr(conn, "_transport", None)
    if transport is not None and not transport.is_closing() and not transport.is_reading():
        transport.resume_reading()
