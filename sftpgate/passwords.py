"""Password hashes for ``config.yaml``.

We write scrypt hashes (standard library, memory-hard) in the form
``$scrypt$ln=15,r=8,p=1$<salt>$<hash>`` (base64 without padding) and also
verify bcrypt hashes (``$2b$``/``$2y$``/``$2a$``) made by ``htpasswd -B`` or
``mkpasswd -m bcrypt``, so sites can paste hashes from tools they already use.
Verification is CPU-bound (~0.1 s): ``serve`` runs it on :class:`FairHasher`'s
own threads, fair between client addresses.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import functools
import hashlib
import hmac
import os
import secrets

import bcrypt

_SCRYPT_PREFIX = "$scrypt$"
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
DEFAULT_LOG_N = 15
_MAXMEM = 256 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, log_n: int = DEFAULT_LOG_N) -> str:
    """Return a new salted scrypt hash of ``password``."""
    salt = os.urandom(16)
    r, p = 8, 1
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=2**log_n, r=r, p=p, maxmem=_MAXMEM, dklen=32
    )
    return f"{_SCRYPT_PREFIX}ln={log_n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def check_hash_format(hashed: str) -> str | None:
    """Return why ``hashed`` is not a hash we can verify, or None if it is one."""
    if hashed.startswith(_BCRYPT_PREFIXES):
        return None if len(hashed) == 60 else "bcrypt hash has the wrong length"
    if not hashed.startswith(_SCRYPT_PREFIX):
        return "not a supported hash (use `sftpgate users hash-password`, or a bcrypt hash)"
    try:
        _parse_scrypt(hashed)
    except ValueError as exc:
        return f"malformed scrypt hash: {exc}"
    return None


def _parse_scrypt(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    parts = hashed[len(_SCRYPT_PREFIX) :].split("$")
    if len(parts) != 3:
        raise ValueError("expected $scrypt$params$salt$hash")
    params = dict(item.split("=", 1) for item in parts[0].split(",") if "=" in item)
    try:
        log_n, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
    except (KeyError, ValueError) as exc:
        raise ValueError("parameters must be ln=N,r=N,p=N") from exc
    if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("parameters out of range")
    if 128 * r * (2**log_n + p + 2) > _MAXMEM:  # what hashlib.scrypt would refuse
        raise ValueError("parameters need more than 256 MiB of memory")
    try:
        salt, digest = _unb64(parts[1]), _unb64(parts[2])
    except ValueError as exc:
        raise ValueError("salt or hash is not base64") from exc
    if not salt or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return log_n, r, p, salt, digest


def verify_password(password: str, hashed: str) -> bool:
    """Return True if ``password`` matches ``hashed``; False for a wrong or unusable hash."""
    secret = password.encode("utf-8")
    if hashed.startswith(_BCRYPT_PREFIXES):
        try:
            return bcrypt.checkpw(secret, hashed.encode("ascii"))
        except ValueError:
            return False
    try:
        log_n, r, p, salt, digest = _parse_scrypt(hashed)
    except ValueError:
        return False
    candidate = hashlib.scrypt(
        secret, salt=salt, n=2**log_n, r=r, p=p, maxmem=_MAXMEM, dklen=len(digest)
    )
    return hmac.compare_digest(candidate, digest)


# Verified against when the login is unknown, so a wrong login costs the same
# time as a wrong password and logins cannot be enumerated by timing.
DUMMY_HASH = hash_password(secrets.token_hex(16), log_n=DEFAULT_LOG_N)


class HashQueueFull(Exception):
    """An address already has as many password checks waiting as it may."""


class FairHasher:
    """Verifies passwords on its own threads, round-robin between addresses.

    Each address has its own queue (at most ``per_source`` checks waiting);
    whenever a thread is free it takes the next check of the next address in
    turn. So an address spraying passwords only ever delays another address's
    login by about one check per thread, however many it sends, and the
    filesystem pool and the default executor never see a hash. Everything but
    the hashing runs on the event loop (no locks).
    """

    def __init__(self, threads: int, per_source: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="hash")
        self._threads = threads
        self.per_source = per_source
        self._queues: dict[str, collections.deque[_Check]] = {}
        self._turns: collections.deque[str] = collections.deque()
        self._running = 0

    async def verify(self, source: str, password: str, hashed: str) -> bool:
        """Whether ``password`` matches ``hashed``; raises :class:`HashQueueFull` at once when
        ``source`` has ``per_source`` checks waiting."""
        queue = self._queues.get(source)
        if queue is not None and len(queue) >= self.per_source:
            raise HashQueueFull(source)
        loop = asyncio.get_running_loop()
        check = _Check(password, hashed, loop.create_future())
        if queue is None:
            queue = self._queues[source] = collections.deque()
            self._turns.append(source)
        queue.append(check)
        self._dispatch()
        return await check.future

    def _dispatch(self) -> None:
        while self._running < self._threads and self._turns:
            source = self._turns.popleft()
            queue = self._queues[source]
            check = queue.popleft()
            if queue:
                self._turns.append(source)  # its next check waits for everyone else's turn
            else:
                del self._queues[source]
            if check.future.done():  # the connection went away meanwhile
                continue
            self._running += 1
            done = asyncio.wrap_future(
                self._executor.submit(verify_password, check.password, check.hashed)
            )
            done.add_done_callback(functools.partial(self._finished, check))

    def _finished(self, check: _Check, done: asyncio.Future[bool]) -> None:
        self._running -= 1
        if not check.future.done():
            if done.cancelled():
                check.future.cancel()
            elif done.exception() is not None:
                check.future.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                check.future.set_result(done.result())
        self._dispatch()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclasses.dataclass(slots=True)
class _Check:
    password: str
    hashed: str
    future: asyncio.Future[bool]
