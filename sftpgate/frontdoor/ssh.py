"""The SSH side of ``sftpgate serve``: host keys, authentication, SFTP-only sessions.

Only the ``sftp`` subsystem is offered: shell, exec, pty, X11, agent and port
forwarding requests are all refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from ..config import DEFAULT_TEMP_PATTERNS, User
from ..defender import Guard, Offence, source_of
from ..events import Event, EventSink, Op, SessionInfo
from ..identity import Identity, identity_for
from ..logsetup import SessionTag, enter_session, in_session, peer_name, tagged
from ..passwords import DUMMY_HASH, HashQueueFull, verify_password
from ..private import private_dir, private_file, write_private
from . import asyncssh_fast
from .channel import SFTPSession
from .inline import InlineGuard
from .limits import DoorLimits
from .requests import TOO_MANY_HANDLES
from .sftp import GatewaySFTPServer, SessionContext, always_durable
from .writebehind import WRITE_BUDGET, WriteBudget

if TYPE_CHECKING:  # typing only: the channel class asyncssh's session hooks are typed with
    from asyncssh.channel import SSHChannel

log = logging.getLogger(__name__)

# Longest a LOGOUT waits for its sessions' handles to be closed and journaled.
LOGOUT_WAIT = 30.0
HOST_KEY_ALGORITHMS = {"ssh_host_ed25519_key": "ssh-ed25519", "ssh_host_rsa_key": "ssh-rsa"}


def ensure_host_keys(folder: Path) -> list[Path]:
    """Return the host key files in ``folder``, creating missing ones.

    The folder is 0700 and every file in it 0600 (public halves too), whatever
    the umask; looser ones found are tightened and logged. Blocking (RSA
    generation takes a moment); called once at start-up.
    """
    private_dir(folder)
    paths = []
    for name, algorithm in HOST_KEY_ALGORITHMS.items():
        path = folder / name
        public = folder / f"{name}.pub"
        if not path.exists():
            if algorithm == "ssh-rsa":
                key = asyncssh.generate_private_key(algorithm, key_size=3072)
            else:
                key = asyncssh.generate_private_key(algorithm)
            write_private(path, key.export_private_key())
            write_private(public, key.export_public_key(), exclusive=False)
            log.info("created host key %s", path)
        else:
            private_file(path, create=False)
            private_file(public, create=False)
        paths.append(path)
    return paths


class Users:
    """The user table the SSH layer authenticates against; replaced whole on reload."""

    def __init__(self, users: tuple[User, ...]) -> None:
        self.replace(users)

    def replace(self, users: tuple[User, ...]) -> None:
        self._by_login = {user.login: user for user in users}

    def get(self, login: str) -> User | None:
        return self._by_login.get(login)


def user_identity(user: User) -> Identity | None:
    """Who ``user``'s file work runs as (None: the gateway is not root). Blocking."""
    return identity_for(user.login, user.home, user.uid, user.gid)


class _SFTPOnlySession(SFTPSession):
    """A session channel that accepts the ``sftp`` subsystem and nothing else."""

    on_close: Callable[[], None] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if self.on_close is not None:
                self.on_close()
                self.on_close = None

    def pty_requested(self, *args: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"


class _ScoringSink:
    """A session's sink: passes every event on, and scores the client's protocol errors.

    A session that runs into its handle limit is scored once as a limit hit
    (the 20,000-handle attack is one offence, not 19,488). Quota and upload
    size refusals are not scored: they are the customer's state, and an
    honest client retrying into a full quota must not get its address banned.
    """

    def __init__(self, sink: EventSink, guard: Guard) -> None:
        self._sink = sink
        self._guard = guard
        self._hit_handle_limit = False

    def emit(self, event: Event) -> None:
        self._sink.emit(event)
        if event.op is Op.PROTOCOL_ERROR and event.status == "bad_message":
            self._guard.defender.record(
                event.session.remote_addr, Offence.PROTOCOL_ERROR, event.message or ""
            )
        elif (
            not self._hit_handle_limit
            and event.message is not None
            and event.message.startswith(TOO_MANY_HANDLES)
        ):
            self._hit_handle_limit = True
            self._guard.defender.record(event.session.remote_addr, Offence.LIMIT, event.message)

    async def emit_durable(self, event: Event) -> None:
        await self._sink.emit_durable(event)


class GatewaySSHServer(asyncssh.SSHServer):
    """One SSH connection: authenticates against :class:`Users`, journals the outcome."""

    def __init__(
        self,
        users: Users,
        sink: EventSink,
        executor: Executor | None,
        max_auth_attempts: int,
        registry: set[GatewaySSHServer] | None = None,
        temp_patterns: tuple[str, ...] = DEFAULT_TEMP_PATTERNS,
        durable: Callable[[str], bool] | None = None,
        write_budget: WriteBudget | None = None,
        inline_local_metadata: bool = False,
        *,
        inline_local_changes: bool = False,
        inline_guard: InlineGuard | None = None,
        fsync_uploads: bool = False,
        umask: int = 0o022,
        fast_paths: bool = False,
        requests_in_flight: int = 0,
        limits: DoorLimits | None = None,
        guard: Guard | None = None,
    ) -> None:
        # The defender and the door's limits (None: no limits, as before).
        self._guard = guard
        self._refused = False  # refused at connection time: nothing else happens
        self._counted: str | None = None  # "pre" or "session": what the door counts us as
        self._session_refused: str | None = None
        self._channels = 0
        self._banner_timer: asyncio.TimerHandle | None = None
        # Whether asyncssh_fast's shortcuts may be tried (server.fast_paths, checked at start).
        self._fast_paths = fast_paths
        self._fsync_uploads = fsync_uploads
        self._umask = umask
        self._requests_in_flight = requests_in_flight
        self._inline_local_metadata = inline_local_metadata
        self._inline_local_changes = inline_local_changes
        self._inline_guard = inline_guard if inline_guard is not None else InlineGuard()
        self._write_budget = write_budget if write_budget is not None else WriteBudget(WRITE_BUDGET)
        self._limits = limits if limits is not None else DoorLimits()
        self._temp_patterns = temp_patterns
        self._durable = durable
        self._users = users
        self._registry = registry
        self._sink = sink
        self._executor = executor
        self._max_auth_attempts = max_auth_attempts
        self._conn: asyncssh.SSHServerConnection | None = None
        self.info = SessionInfo(id=secrets.token_hex(8), remote_addr="?", remote_port=0)
        # Every log line about this connection carries it (logsetup): the journal's session id.
        self.tag = SessionTag(self.info.id)
        # asyncssh makes its owner (us) in the connection's own context (asyncio runs each
        # transport callback in a copy of its own), just before it logs the connection
        # and starts its login timer: from here on that context is this session's.
        enter_session(self.tag)
        self._login: str | None = None
        self._user: User | None = None
        self._method: str | None = None
        self._failures = 0
        self._key_rejected = False
        self._authenticated = False
        self.contexts: list[SessionContext] = []
        self._logout: asyncio.Task[None] | None = None

    # -- connection ----------------------------------------------------------

    @property
    def conn(self) -> asyncssh.SSHServerConnection | None:
        return self._conn

    @property
    def authenticated(self) -> bool:
        """Logged in: a session a drain waits for (gateway.py); one still logging in is not."""
        return self._authenticated

    @property
    def logout_pending(self) -> asyncio.Task[None] | None:
        """The task that journals the LOGOUT once left-open handles are closed, while it
        runs: a stop waits for it before it flushes the journal (gateway.py)."""
        task = self._logout
        return task if task is not None and not task.done() else None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.info = SessionInfo(id=self.info.id, remote_addr=str(peer[0]), remote_port=int(peer[1]))
        self.tag.peer = peer_name(self.info.remote_addr, self.info.remote_port)
        with in_session(self.tag):
            self._connection_made(conn)
        # A connection's callbacks run in contexts asyncio copied before this one
        # (each transport callback has its own), so the session is set at each
        # entry: every read, the EOF and the end run on behalf of this session,
        # and so do the tasks and timers asyncssh and the SFTP handler start from
        # them. Installed after the fast paths' wrapper: ours is the outermost.
        for name in ("data_received", "eof_received", "connection_lost"):
            setattr(conn, name, tagged(self.tag, getattr(conn, name)))

    def _connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        if self._guard is not None and not self._admit(conn):
            return
        if self._fast_paths:
            self._fast_paths = asyncssh_fast.install_connection(conn)
        if self._registry is not None:
            self._registry.add(self)

    def _admit(self, conn: asyncssh.SSHServerConnection) -> bool:
        """Refuse a banned, blocklisted or over-limit address before the handshake costs
        anything: the socket is closed before our version line goes out."""
        assert self._guard is not None
        addr, port = self.info.remote_addr, self.info.remote_port
        why = self._guard.defender.refusal(addr)
        offence = None
        if why is None:
            trusted = self._guard.defender.safelisted(addr)
            why, offence = self._guard.door.arrive(addr, trusted=trusted), Offence.LIMIT
        if why is not None:
            self._refused = True
            self._guard.defender.refused(addr, port, why, offence=offence)
            conn.abort()
            return False
        self._counted = "pre"
        self._banner_timer = asyncio.get_running_loop().call_later(
            self._guard.door.cfg.banner_timeout, self._banner_check
        )
        return True

    def refuse(self, why: str, offence: Offence | None) -> None:
        """Close this connection before it is a session (a PROXY header from an address not
        trusted to send one): journaled and scored here, once, not again when it is lost."""
        with in_session(self.tag):
            self._refuse(why, offence)

    def _refuse(self, why: str, offence: Offence | None) -> None:
        self._refused = True
        self._leave_door()
        if self._guard is not None:
            self._guard.defender.refused(
                self.info.remote_addr, self.info.remote_port, why, offence=offence
            )
        if self._conn is not None:
            self._conn.abort()

    def _banner_check(self) -> None:
        """A connection that has not even sent its version line is closed early."""
        self._banner_timer = None
        conn = self._conn
        if conn is None or self._guard is None or conn.get_extra_info("client_version"):
            return
        self._refused = True  # scored and journaled here, not again when it is lost
        self._leave_door()
        why = f"no SSH version line within {self._guard.door.cfg.banner_timeout:g} s"
        self._guard.defender.refused(
            self.info.remote_addr, self.info.remote_port, why, offence=Offence.NO_AUTH
        )
        conn.abort()

    def _leave_door(self) -> None:
        guard = self._guard
        if guard is None:
            return
        if self._banner_timer is not None:
            self._banner_timer.cancel()
            self._banner_timer = None
        if self._counted == "pre":
            guard.door.leave_unauthenticated(self.info.remote_addr)
        elif self._counted == "session":
            assert self.info.login is not None
            guard.door.logout(self.info.remote_addr, self.info.login)
        self._counted = None

    def connection_lost(self, exc: Exception | None) -> None:
        # Also called by asyncssh from whoever closed the connection (the admin API,
        # a drain): still this session's lines.
        with in_session(self.tag):
            self._connection_lost(exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        self._leave_door()
        if self._registry is not None:
            self._registry.discard(self)
        if self._refused:
            return
        if self._session_refused is not None:
            return
        if (
            self._guard is not None
            and not self._authenticated
            and self._failures == 0
            and not self._key_rejected
        ):
            # Came, tried nothing we could judge (or timed out), left: a scanner's visit.
            why = str(exc) if exc else "disconnected before authenticating"
            self._guard.defender.record(self.info.remote_addr, Offence.NO_AUTH, why)
            if exc is not None and "timeout" in why.lower():
                self._guard.defender.refused(
                    self.info.remote_addr, self.info.remote_port, why, offence=None
                )
        if self._authenticated:
            reason = str(exc) if exc else None
            log.info(
                "logout %s from %s:%d%s",
                self.info.login,
                self.info.remote_addr,
                self.info.remote_port,
                f" ({reason})" if reason else "",
            )
            logout = Event(Op.LOGOUT, self.info, message=reason)
            waiting = [ctx.cleaned for ctx in self.contexts if not ctx.cleaned.is_set()]
            if waiting:
                # asyncssh closes the handles a client left open after this (an
                # incomplete upload): their CLOSE rows come before the LOGOUT.
                self._logout = asyncio.get_running_loop().create_task(
                    self._logout_after(waiting, logout)
                )
            else:
                self._sink.emit(logout)
        elif self._login is not None and (self._key_rejected or self._failures == 0):
            # Tried a key (or nothing we could judge) and left: one failed login.
            self._sink.emit(
                Event(
                    Op.LOGIN_FAILED,
                    self._with(
                        login=self._login, auth_method="publickey" if self._key_rejected else "none"
                    ),
                    status="permission_denied",
                    message="disconnected before authenticating",
                )
            )
            if self._guard is not None and self._key_rejected:
                self._guard.defender.record(
                    self.info.remote_addr,
                    Offence.FAILED_LOGIN if self._user is not None else Offence.UNKNOWN_USER,
                    "public key refused",
                )

    async def _logout_after(self, waiting: list[asyncio.Event], logout: Event) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(cleaned.wait() for cleaned in waiting)), LOGOUT_WAIT
            )
        except TimeoutError:
            log.warning("handles still closing after %g s; logout journaled", LOGOUT_WAIT)
        finally:
            self._sink.emit(logout)

    def _with(self, **changes: Any) -> SessionInfo:
        fields = {name: getattr(self.info, name) for name in SessionInfo.__slots__}
        fields.update(changes)
        return SessionInfo(**fields)

    # -- authentication ------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self._login = username
        self.tag.login = username  # the login the client names (authenticated or not)
        self._user = self._users.get(username)
        assert self._conn is not None
        version = self._conn.get_extra_info("client_version")
        self.info = self._with(login=username, client_version=version)
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        user = self._users.get(username)
        hashed = user.password_hash if user and user.password_hash else DUMMY_HASH
        guard = self._guard
        why = "unknown user" if user is None else "wrong password"
        if guard is None:
            # The default executor, not the filesystem pool: a password flood must
            # not take the threads that uploads need.
            ok = await asyncio.to_thread(verify_password, password, hashed)
        elif self._banned():
            return False
        else:
            # Its own threads, round-robin by address: a spray delays only the sprayer.
            try:
                ok = await guard.hasher.verify(source_of(self.info.remote_addr), password, hashed)
            except HashQueueFull:
                ok, why = False, "too many password checks waiting from this address"
        ok = ok and user is not None and user.password_hash is not None
        if ok:
            self._method = "password"
            return True
        self._failure("password", why)
        if guard is not None and guard.defender.cfg.auth_failure_delay > 0 and not self._banned():
            # As OpenSSH: a wrong password is answered late, on the loop (no thread waits).
            await asyncio.sleep(guard.defender.cfg.auth_failure_delay)
        return False

    def _banned(self) -> bool:
        """Whether this address is refused now (banned while connected): if so, disconnect."""
        if self._guard is None or self._conn is None:
            return False
        why = self._guard.defender.refusal(self.info.remote_addr)
        if why is None:
            return False
        self._conn.disconnect(asyncssh.DISC_HOST_NOT_ALLOWED_TO_CONNECT, f"address {why}")
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user = self._users.get(username)
        if user is not None:
            for line in user.authorized_keys:
                if asyncssh.import_public_key(line).public_data == key.public_data:
                    self._method = "publickey"
                    return True
        self._key_rejected = True
        return False

    def _failure(self, method: str, why: str) -> None:
        self._failures += 1
        log.warning(
            "failed %s login for %s from %s:%d: %s",
            method,
            self._login,
            self.info.remote_addr,
            self.info.remote_port,
            why,
        )
        self._sink.emit(
            Event(
                Op.LOGIN_FAILED,
                self._with(auth_method=method),
                status="permission_denied",
                message=why,
            )
        )
        if self._guard is not None:
            offence = Offence.UNKNOWN_USER if self._user is None else Offence.FAILED_LOGIN
            self._guard.defender.record(self.info.remote_addr, offence, why)
            if self._banned():
                return
        if self._failures >= self._max_auth_attempts and self._conn is not None:
            self._conn.disconnect(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "too many authentication failures"
            )

    def auth_completed(self) -> None:
        if self._guard is not None:
            self._leave_door()
            assert self._login is not None
            addr = self.info.remote_addr
            trusted = self._guard.defender.safelisted(addr)
            why = self._guard.door.login(addr, self._login, trusted=trusted)
            if why is not None:
                self._refuse_session(why)
                return
            self._counted = "session"
        self._authenticated = True
        self.info = self._with(auth_method=self._method, started_at=time.time())
        log.info(
            "login %s from %s:%d (%s, %s)",
            self.info.login,
            self.info.remote_addr,
            self.info.remote_port,
            self._method,
            self.info.client_version,
        )
        self._sink.emit(Event(Op.LOGIN, self.info))

    def _refuse_session(self, why: str) -> None:
        """Authenticated, but over a limit of the door: a disconnect that says which."""
        assert self._guard is not None and self._conn is not None
        self._session_refused = why
        log.warning(
            "refused %s from %s:%d: %s",
            self._login,
            self.info.remote_addr,
            self.info.remote_port,
            why,
        )
        self._sink.emit(
            Event(
                Op.REFUSED,
                self._with(auth_method=self._method),
                status="refused",
                message=f"session refused: {why}",
            )
        )
        self._guard.defender.record(self.info.remote_addr, Offence.LIMIT, why)
        self._conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, why)

    # -- sessions ------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        if self._user is None or not self._authenticated:
            return False
        if self._guard is not None:
            most = self._guard.door.cfg.max_channels
            if self._channels >= most:
                why = f"too many SFTP sessions on one connection (at most {most})"
                refused = f"session refused: {why}"
                self._sink.emit(Event(Op.REFUSED, self.info, status="refused", message=refused))
                self._guard.defender.record(self.info.remote_addr, Offence.LIMIT, why)
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, why)
            self._channels += 1
        session = _SFTPOnlySession(self._make_sftp_server, fast=self._fast_paths)
        if self._guard is not None:
            session.on_close = self._channel_closed
        return session

    def _channel_closed(self) -> None:
        self._channels -= 1

    def _make_sftp_server(self, chan: SSHChannel[bytes]) -> GatewaySFTPServer:
        assert self._user is not None
        ctx = SessionContext(
            self.info,
            self._user,
            _ScoringSink(self._sink, self._guard) if self._guard is not None else self._sink,
            self._executor,
            functools.partial(user_identity, self._user),  # NSS, a stat: in the pool
            temp_patterns=self._temp_patterns,
            durable=self._durable if self._durable is not None else always_durable,
            write_budget=self._write_budget,
            inline_local_metadata=self._inline_local_metadata,
            inline_local_changes=self._inline_local_changes,
            inline_guard=self._inline_guard,
            fsync_uploads=self._fsync_uploads,
            umask=self._umask,
            requests_in_flight=self._requests_in_flight,
            limits=self._limits,
        )
        self.contexts.append(ctx)
        return GatewaySFTPServer(cast(asyncssh.SSHServerChannel[bytes], chan), ctx)
