"""Act as a user, one thread at a time: per-thread credentials.

Every filesystem call made for a user runs with that user's uid, primary gid
and supplementary groups, so the kernel (and an NFS server that squashes root)
enforces what the jail intends, and files belong to the user because the user
made them. Users share the thread pool, so the switch must change the calling
thread only. glibc's ``setresuid``/``setgroups`` (and so Python's ``os``
functions) change every thread of the process (they broadcast the change with
a signal), so this module calls the kernel directly, as Samba's thread pool
does: on Linux each thread has its own credentials.

Only the *effective* ids change (the real and saved ids stay root's), so the
thread can switch back. :func:`call_as` switches, checks that the switch took
(``getresuid`` and ``getgroups`` are per-thread syscalls too), runs the call
and switches back, whatever happened; a thread whose switch back fails kills
the process rather than run the next call as someone else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import SftpgateError

log = logging.getLogger(__name__)
T = TypeVar("T")

# (setgroups, setresuid, setresgid): the 32-bit-id system calls of each ABI.
_SYSCALLS: dict[str, tuple[int, int, int]] = {
    "x86_64": (116, 117, 119),
    "aarch64": (159, 147, 149),
    "arm64": (159, 147, 149),
    "riscv64": (159, 147, 149),
    "ppc64le": (81, 164, 169),
    "s390x": (206, 208, 210),
}
_KEEP = ctypes.c_uint(0xFFFFFFFF).value  # (uid_t) -1: leave that id as it is


class IdentityError(SftpgateError):
    """A thread could not take on (or give up) a user's credentials."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a user's file work runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    def describe(self) -> str:
        return f"uid {self.uid}, gid {self.gid}, groups {','.join(map(str, self.groups)) or '-'}"


class _Kernel:
    """The raw per-thread credential calls (Linux)."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        name = ctypes.util.find_library("c")
        if numbers is None or name is None:
            raise IdentityError(f"per-thread credentials are not supported on {platform.machine()}")
        self._libc = ctypes.CDLL(name, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self._setgroups, self._setresuid, self._setresgid = numbers

    def _call(self, *args: Any) -> None:
        if self._syscall(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def setgroups(self, groups: tuple[int, ...]) -> None:
        array = (ctypes.c_uint * max(1, len(groups)))(*groups)
        self._call(self._setgroups, ctypes.c_long(len(groups)), array)

    def seteuid(self, uid: int) -> None:
        self._call(self._setresuid, ctypes.c_uint(_KEEP), ctypes.c_uint(uid), ctypes.c_uint(_KEEP))

    def setegid(self, gid: int) -> None:
        self._call(self._setresgid, ctypes.c_uint(_KEEP), ctypes.c_uint(gid), ctypes.c_uint(_KEEP))


_kernel: _Kernel | None = None


def _get_kernel() -> _Kernel:
    global _kernel
    if _kernel is None:
        _kernel = _Kernel()
    return _kernel


def can_switch() -> bool:
    """Whether this process may act as other users (it runs as root)."""
    return os.geteuid() == 0


def needs_switch(ident: Identity | None) -> bool:
    """Whether calls for ``ident`` must switch credentials (never for None or ourselves)."""
    if ident is None:
        return False
    return not (
        ident.uid == os.geteuid()
        and ident.gid == os.getegid()
        and sorted(ident.groups) == sorted(os.getgroups())
    )


def call_as(ident: Identity | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in this thread as ``ident``; None runs it as we are.

    The thread's effective uid, gid and groups are ``ident``'s for the call
    and the gateway's again afterwards, whether ``fn`` returned or raised.

    Raises:
        IdentityError: the switch did not take (the call is not made).
        Whatever ``fn`` raises.
    """
    if ident is None:
        return fn(*args, **kwargs)
    kernel = _get_kernel()
    saved = (os.geteuid(), os.getegid(), tuple(os.getgroups()))
    if saved[0] == ident.uid and saved[1] == ident.gid and sorted(saved[2]) == sorted(ident.groups):
        return fn(*args, **kwargs)
    try:
        kernel.setgroups(ident.groups)
        kernel.setegid(ident.gid)
        kernel.seteuid(ident.uid)
        _verify(ident)
    except (OSError, IdentityError) as exc:
        _restore(kernel, saved)
        raise IdentityError(f"cannot act as {ident.describe()}: {exc}") from None
    try:
        return fn(*args, **kwargs)
    finally:
        _restore(kernel, saved)


def _verify(ident: Identity) -> None:
    _, euid, _ = os.getresuid()
    _, egid, _ = os.getresgid()
    groups = sorted(os.getgroups())
    if euid != ident.uid or egid != ident.gid or groups != sorted(set(ident.groups)):
        raise IdentityError(f"now uid {euid}, gid {egid}, groups {groups}")


def _restore(kernel: _Kernel, saved: tuple[int, int, tuple[int, ...]]) -> None:
    uid, gid, groups = saved
    try:
        kernel.seteuid(uid)  # first: setting groups and gid needs root back
        kernel.setegid(gid)
        kernel.setgroups(groups)
        if os.geteuid() != uid or os.getegid() != gid:
            raise IdentityError("the thread did not get its own credentials back")
    except BaseException:
        # A thread that may still be someone else must never run another call.
        log.critical("cannot restore the gateway's credentials in a thread: exiting")
        os._exit(70)


def identity_for(
    login: str,
    home: str | os.PathLike[str],
    uid: int | None = None,
    gid: int | None = None,
) -> Identity | None:
    """Who ``login``'s file work runs as, or None when this process is not root.

    From the configured ``uid``/``gid``, else the system account of the same
    login (with its supplementary groups), else the owner of the home (a
    warning when that is root). Blocking (NSS lookups, a stat of the home).

    Raises:
        IdentityError: no uid can be found (the home is missing and there is
            no such account).
    """
    if not can_switch():
        return None
    if uid is not None:
        primary = gid if gid is not None else uid
        try:
            account = pwd.getpwuid(uid)
            groups = os.getgrouplist(account.pw_name, primary)
        except KeyError:
            groups = [primary]
        return Identity(uid, primary, tuple(sorted(set(groups) | {primary})))
    try:
        account = pwd.getpwnam(login)
    except KeyError:
        pass
    else:
        primary = gid if gid is not None else account.pw_gid
        groups = os.getgrouplist(login, primary)
        return Identity(account.pw_uid, primary, tuple(sorted(set(groups) | {primary})))
    try:
        st = os.stat(home)
    except OSError as exc:
        raise IdentityError(
            f"user {login!r}: no uid in the config, no such system account, "
            f"and the home cannot be read: {exc.strerror}"
        ) from None
    primary = gid if gid is not None else st.st_gid
    if st.st_uid == 0:
        log.warning(
            "user %r acts as root: no uid in the config, no such system account, and the "
            "home %s belongs to root; the kernel will not confine this user's file work",
            login,
            os.fspath(home),
        )
    return Identity(st.st_uid, primary, (primary,))
