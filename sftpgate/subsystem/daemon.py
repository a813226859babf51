"""The daemon side of the OpenSSH front door, run inside ``sftpgate serve``.

Taps connect to a Unix socket. Who they are comes from the kernel
(``SO_PEERCRED``), never from what they send: the uid is mapped to the
config user of the same login, the event is re-stamped with that login, and
every path must lie in that user's home (it is then journaled as the user
sees it, home = ``/``, like ``serve`` does). Anything else is refused and the
refusal journaled. Spool files left by taps that could not reach us are
replayed with the same checks, attributed to the file's owner.

The socket is open to every local user, so each line is parsed into a typed
schema (``wire.decode_line``) before anything else looks at it, and a user
who floods it slows only their own connections: every line costs a token
from the uid's bucket (:data:`EVENTS_PER_SECOND`, :data:`EVENT_BURST`) and
an empty bucket means we stop reading that connection for a while; a
connection holds at most :data:`MAX_IN_FLIGHT` events not yet committed;
a uid has at most :data:`MAX_CONNECTIONS_PER_UID` connections; a line longer
than ``wire.MAX_LINE`` ends its connection. Refusals are journaled at most
:data:`REFUSALS_PER_SECOND` per uid (the rest are counted in the next one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from ..config import Config, User
from ..events import Event, EventSink, Op, SessionInfo
from ..logsetup import session_extra
from .wire import MAX_LINE, SchemaError, ack_line, decode_line

log = logging.getLogger(__name__)

MAX_SPOOL = 64 * 1024 * 1024
# Per uid, over all its connections (so opening more of them buys nothing).
# An OpenSSH session makes two or three events per file, and sftp-server
# stores ~1,500 small files a second on this 2-core VM: 1,000/s throttled
# honest uploads to a third of their speed (bench figure 11). 10,000/s still
# bounds what one local user can pour into the journal (the writer takes
# ~100,000/s); a burst of 20,000 covers a tap's backlog.
EVENTS_PER_SECOND = 10_000.0
EVENT_BURST = 20_000.0
MAX_CONNECTIONS_PER_UID = 32  # one per OpenSSH session of that user
MAX_IN_FLIGHT = 256  # events of one connection read but not yet committed
REFUSALS_PER_SECOND = 5.0
REFUSAL_BURST = 50.0
MAX_WHY = 300  # characters of a refusal's reason
# path2 of these ops is a path too; a symlink's target is free text.
_PATH2_OPS = {Op.RENAME, Op.LINK}


class Refused(Exception):
    """An event a tap may not send for its uid."""


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved. Pure but for ``clock``."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens = burst
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self) -> float:
        """Take a token, owing it if there is none; return seconds to wait before using it."""
        self._refill()
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self) -> bool:
        """Take a token if there is one."""
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _virtual(path: str, home: str) -> str:
    """The path as the user sees it (home = /); raises Refused outside the home. Pure."""
    normal = os.path.normpath(path)
    if not os.path.isabs(normal):
        raise Refused(f"relative path {path!r}")
    if normal == home:
        return "/"
    if normal.startswith(home.rstrip("/") + "/"):
        return normal[len(home.rstrip("/")) :]
    raise Refused(f"path outside the home of the user: {path!r}")


def admit(event: Event, uid: int, user: User | None) -> Event:
    """The event as the journal should record it for peer ``uid``; raises Refused."""
    if user is None:
        raise Refused(f"uid {uid} is not a configured user")
    if event.session.login != user.login:
        raise Refused(f"uid {uid} ({user.login}) sent an event for {event.session.login!r}")
    home = os.path.normpath(str(user.home))
    path = _virtual(event.path, home) if event.path is not None else None
    path2 = event.path2
    if path2 is not None and event.op in _PATH2_OPS:
        path2 = _virtual(path2, home)
    # Session ids and de-duplication keys are namespaced by the kernel's uid,
    # so nobody can touch another user's session rows or pre-empt their keys.
    session = replace(event.session, id=f"ssh-{uid}-{event.session.id}"[:64], login=user.login)
    key = f"{uid}:{event.key}" if event.key else None
    return replace(event, session=session, path=path, path2=path2, key=key)


def refusal(event: Event | None, uid: int, user: User | None, why: str) -> Event:
    """What the journal records for a refused event."""
    login = user.login if user else f"uid:{uid}"
    claimed = event.session if event else None
    session = SessionInfo(
        id=f"ssh-{uid}-{claimed.id if claimed else 'unknown'}"[:64],
        remote_addr=claimed.remote_addr if claimed else "local",
        remote_port=claimed.remote_port if claimed else 0,
        login=login,
        auth_method="openssh",
    )
    return Event(
        op=event.op if event else Op.PROTOCOL_ERROR,
        session=session,
        path=event.path if event else None,
        path2=event.path2 if event else None,
        status="refused",
        message=f"refused event from the OpenSSH tap (uid {uid}): {why[:MAX_WHY]}",
    )


class TapDaemon:
    """The daemon's socket: taps' events in, checked, journaled as their uid; acks out.

    The limits are the module's constants unless given (tests make them small).
    """

    def __init__(
        self,
        config: Config,
        sink: EventSink,
        user_for_login: Callable[[str], User | None],
        *,
        events_per_second: float = EVENTS_PER_SECOND,
        event_burst: float = EVENT_BURST,
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.sink = sink
        self._user_for_login = user_for_login
        self._server: asyncio.AbstractServer | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._rate, self._burst = events_per_second, event_burst
        self._max_connections = max_connections_per_uid
        self._max_in_flight = max_in_flight
        self._clock, self._sleep = clock, sleep
        self._buckets: dict[int, TokenBucket] = {}
        self._refusal_buckets: dict[int, TokenBucket] = {}
        self._suppressed: collections.Counter[int] = collections.Counter()
        self._connections: collections.Counter[int] = collections.Counter()
        self.refused = 0  # lines and events refused, journaled or not

    def user_for_uid(self, uid: int) -> User | None:
        try:
            login = pwd.getpwuid(uid).pw_name
        except KeyError:
            return None
        return self._user_for_login(login)

    async def start(self) -> None:
        cfg = self.config.subsystem
        await asyncio.to_thread(self._prepare_dirs)
        self._server = await asyncio.start_unix_server(
            self._serve_tap, path=str(cfg.socket), limit=MAX_LINE
        )
        # Anyone may connect; SO_PEERCRED, not the socket mode, says who they are.
        os.chmod(cfg.socket, 0o666)  # noqa: S103
        self._replayer = asyncio.create_task(self._replay_loop())
        log.info("OpenSSH tap socket on %s, spool %s", cfg.socket, cfg.spool_dir)

    def _prepare_dirs(self) -> None:
        cfg = self.config.subsystem
        if not cfg.socket.parent.is_dir():
            cfg.socket.parent.mkdir(parents=True)
            # Every user's tap must reach the socket, whatever the umask
            # (systemd's UMask=0077; its RuntimeDirectoryMode=0755 does the same).
            os.chmod(cfg.socket.parent, 0o755)  # noqa: S103
        if cfg.socket.exists() or cfg.socket.is_symlink():
            cfg.socket.unlink()
        cfg.spool_dir.mkdir(parents=True, exist_ok=True)
        # Like /tmp without listing: users create spool files, cannot see or touch others.
        os.chmod(cfg.spool_dir, 0o1733)  # noqa: S103

    async def stop(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    def _refuse(self, event: Event | None, uid: int, user: User | None, why: str) -> None:
        """Journal a refusal, unless this uid has had its share: then count it for the next."""
        self.refused += 1
        bucket = self._refusal_buckets.get(uid)
        if bucket is None:
            bucket = TokenBucket(REFUSALS_PER_SECOND, REFUSAL_BURST, self._clock)
            self._refusal_buckets[uid] = bucket
        if not bucket.try_take():
            self._suppressed[uid] += 1
            return
        more = self._suppressed.pop(uid, 0)
        if more:
            why = f"{why[:MAX_WHY]} (and {more} more refusals not journaled one by one)"
        refused = refusal(event, uid, user, why)
        info = refused.session  # the line names the session its journal row has
        log.warning(
            "tap uid %d: %s",
            uid,
            why[: MAX_WHY + 80],
            extra=session_extra(info.id, info.login, info.remote_addr, info.remote_port),
        )
        self.sink.emit(refused)

    async def _serve_tap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        uid = peer_uid(writer.get_extra_info("socket"))
        try:
            user = self.user_for_uid(uid)
            if self._connections[uid] >= self._max_connections:
                # Closed at once: that tap spools, and its events are replayed later.
                self._refuse(None, uid, user, f"over {self._max_connections} connections")
                return
            self._connections[uid] += 1
            try:
                await self._read_events(reader, writer, uid, user)
            finally:
                self._connections[uid] -= 1
                if self._connections[uid] <= 0:
                    del self._connections[uid]
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.warning("tap uid %d: %s", uid, exc)
        finally:
            writer.close()
            self._clients.discard(task)

    async def _read_events(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        uid: int,
        user: User | None,
    ) -> None:
        bucket = self._buckets.get(uid)
        if bucket is None:
            bucket = self._buckets[uid] = TokenBucket(self._rate, self._burst, self._clock)
        acks = _Acks(writer, self._max_in_flight)
        acker = asyncio.create_task(acks.run())
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # no newline within MAX_LINE bytes: garbage, or an attack
                    self._refuse(None, uid, user, f"line longer than {MAX_LINE} bytes; cut off")
                    break
                if not line:
                    break
                # Over its rate, this connection waits (we stop reading it); no one else does.
                delay = bucket.take()
                if delay > 0:
                    await self._sleep(delay)
                try:
                    seq, event = decode_line(line)
                except SchemaError as exc:
                    self._refuse(None, uid, user, str(exc))
                    if exc.seq is not None:  # journaled: a resend would only be refused again
                        await acks.add(exc.seq, None)
                else:
                    await acks.add(seq, asyncio.create_task(self._record(event, uid, user)))
            acks.finish()
            await acker
        finally:
            acker.cancel()

    async def _record(self, event: Event, uid: int, user: User | None) -> None:
        try:
            admitted = admit(event, uid, user)
        except Refused as exc:
            self._refuse(event, uid, user, str(exc))
            return
        await self.sink.emit_durable(admitted)

    async def _replay_loop(self) -> None:
        while True:
            try:
                await self.replay_spool()
            except Exception:
                log.exception("spool replay failed; will try again")
            await asyncio.sleep(self.config.subsystem.replay_interval)

    async def replay_spool(self) -> int:
        """Journal every spool file nobody is writing, then remove it. Returns events replayed."""
        replayed = 0
        spool = self.config.subsystem.spool_dir
        names = await asyncio.to_thread(lambda: sorted(os.listdir(spool)))
        for name in names:
            if name.endswith(".jsonl"):
                replayed += await self._replay_file(spool / name)
        return replayed

    async def _replay_file(self, path: Path) -> int:
        opened = await asyncio.to_thread(_open_spool, path)
        if opened is None:
            return 0
        fd, uid, data = opened
        try:
            user = self.user_for_uid(uid)
            count = 0
            for line in data.splitlines():
                if not line.strip():
                    continue
                try:
                    _, event = decode_line(line)
                except SchemaError as exc:
                    self._refuse(None, uid, user, f"spool {path.name[:80]}: {exc}")
                    continue
                await self._record(event, uid, user)
                count += 1
            await asyncio.to_thread(os.unlink, path)
            log.info("replayed %d spooled events from %s", count, path.name)
            return count
        finally:
            os.close(fd)


class _Acks:
    """One connection's events in flight, acknowledged in order as each is committed.

    At most ``limit`` wait: :meth:`add` waits for room, so a tap that sends
    faster than its events commit (or never reads its acks) is no longer read.
    """

    def __init__(self, writer: asyncio.StreamWriter, limit: int) -> None:
        self._writer, self._limit = writer, limit
        # (seq, task); task None: refused, acknowledged as soon as its turn comes.
        self._pending: collections.deque[tuple[int, asyncio.Task[None] | None]] = (
            collections.deque()
        )
        self._changed = asyncio.Event()  # an entry came, went, or the stream ended
        self._done = False
        self._broken = False  # the tap went away: nobody reads acks any more

    async def add(self, seq: int, task: asyncio.Task[None] | None) -> None:
        while len(self._pending) >= self._limit and not self._broken:
            self._changed.clear()
            await self._changed.wait()
        self._pending.append((seq, task))
        self._changed.set()

    def finish(self) -> None:
        self._done = True
        self._changed.set()

    async def run(self) -> None:
        try:
            await self._run()
        except ConnectionError:
            self._broken = True
            self._changed.set()
            raise

    async def _run(self) -> None:
        pending = self._pending
        while pending or not self._done:
            if not pending:
                self._changed.clear()
                await self._changed.wait()
                continue
            head = pending[0][1]
            if head is not None:
                await asyncio.wait([head])
            # Those ready together go in one write (taps send events in bursts).
            acks: list[bytes] = []
            while pending and (pending[0][1] is None or pending[0][1].done()):
                seq, task = pending.popleft()
                if task is not None and (task.cancelled() or task.exception() is not None):
                    # Not committed: no ack, the tap spools it.
                    log.error(
                        "tap event %d not journaled",
                        seq,
                        exc_info=not task.cancelled() and task.exception(),
                    )
                    continue
                acks.append(ack_line(seq))
            self._changed.set()  # room for add()
            if acks:
                self._writer.write(b"".join(acks))
                await self._writer.drain()


def _open_spool(path: Path) -> tuple[int, int, bytes] | None:
    """Open a spool file that is not being written (no lock held); None to skip it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SPOOL:
            raise OSError("not a regular spool file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a tap still writing holds it
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
        return fd, st.st_uid, data
    except OSError:
        os.close(fd)
        return None
