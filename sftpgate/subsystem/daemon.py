"""The daemon side of the OpenSSH front door, run inside ``sftpgate serve``.

Taps connect to a Unix socket. Who they are comes from the kernel
(``SO_PEERCRED``), never from what they send: the uid is mapped to the
config user of the same login, the event is re-stamped with that login, and
every path must lie in that user's home (it is then journaled as the user
sees it, home = ``/``, like ``serve`` does). Anything else is refused and the
refusal journaled. Spool files left by taps that could not reach us are
replayed with the same checks, attributed to the file's owner.
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..config import Config, User
from ..events import Event, EventSink, Op, SessionInfo
from .wire import ack_line, decode_line

log = logging.getLogger(__name__)

MAX_SPOOL = 64 * 1024 * 1024
# path2 of these ops is a path too; a symlink's target is free text.
_PATH2_OPS = {Op.RENAME, Op.LINK}


class Refused(Exception):
    """An event a tap may not send for its uid."""


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
        message=f"refused event from the OpenSSH tap: {why}",
    )


class TapDaemon:
    def __init__(
        self, config: Config, sink: EventSink, user_for_login: Callable[[str], User | None]
    ) -> None:
        self.config = config
        self.sink = sink
        self._user_for_login = user_for_login
        self._server: asyncio.AbstractServer | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    def user_for_uid(self, uid: int) -> User | None:
        try:
            login = pwd.getpwuid(uid).pw_name
        except KeyError:
            return None
        return self._user_for_login(login)

    async def start(self) -> None:
        cfg = self.config.subsystem
        await asyncio.to_thread(self._prepare_dirs)
        self._server = await asyncio.start_unix_server(self._serve_tap, path=str(cfg.socket))
        # Anyone may connect; SO_PEERCRED, not the socket mode, says who they are.
        os.chmod(cfg.socket, 0o666)  # noqa: S103
        self._replayer = asyncio.create_task(self._replay_loop())
        log.info("OpenSSH tap socket on %s, spool %s", cfg.socket, cfg.spool_dir)

    def _prepare_dirs(self) -> None:
        cfg = self.config.subsystem
        cfg.socket.parent.mkdir(parents=True, exist_ok=True)
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

    async def _serve_tap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        uid = peer_uid(writer.get_extra_info("socket"))
        user = self.user_for_uid(uid)
        pending: collections.deque[tuple[int, asyncio.Task[None]]] = collections.deque()
        try:
            while line := await reader.readline():
                try:
                    seq, event = decode_line(line)
                except ValueError as exc:
                    self.sink.emit(refusal(None, uid, user, str(exc)))
                    continue
                pending.append((seq, asyncio.create_task(self._record(event, uid, user))))
                await self._ack_done(pending, writer, wait=False)
            await self._ack_done(pending, writer, wait=True)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.warning("tap uid %d: %s", uid, exc)
        finally:
            writer.close()
            self._clients.discard(task)

    async def _record(self, event: Event, uid: int, user: User | None) -> None:
        try:
            admitted = admit(event, uid, user)
        except Refused as exc:
            log.warning("tap uid %d: %s", uid, exc)
            self.sink.emit(refusal(event, uid, user, str(exc)))
            return
        await self.sink.emit_durable(admitted)

    @staticmethod
    async def _ack_done(
        pending: collections.deque[tuple[int, asyncio.Task[None]]],
        writer: asyncio.StreamWriter,
        *,
        wait: bool,
    ) -> None:
        # Acks go out in order, each once its event is committed; those ready
        # together go in one write (taps send events in bursts: one send, not one each).
        acks: list[bytes] = []
        while pending and (wait or pending[0][1].done()):
            seq, task = pending.popleft()
            try:
                await task
            except Exception as exc:  # not committed: no ack, the tap spools it
                log.error("tap event %d not journaled: %s", seq, exc)
                continue
            acks.append(ack_line(seq))
        if acks:
            writer.write(b"".join(acks))
        await writer.drain()

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
                except ValueError as exc:
                    self.sink.emit(refusal(None, uid, user, f"spool {path.name}: {exc}"))
                    continue
                await self._record(event, uid, user)
                count += 1
            await asyncio.to_thread(os.unlink, path)
            log.info("replayed %d spooled events from %s", count, path.name)
            return count
        finally:
            os.close(fd)


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
