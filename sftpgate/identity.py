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
(each call's return, then ``getresuid``/``getresgid``, which are per-thread
system calls too), runs the call
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
    groups: tuple[int, ...]  # sorted, without duplicates

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(sorted(set(self.groups))))

    def describe(self) -> str:
        return f"uid {self.uid}, gid {self.gid}, groups {','.join(map(str, self.groups)) or '-'}"


class _Switch:
    """The system calls (as ready-made ctypes arguments) to one identity and back."""

    __slots__ = ("back", "gid", "to", "uid")

    def __init__(
        self, ident: Identity, own: tuple[int, int, tuple[int, ...]], numbers: Any
    ) -> None:
        setgroups, setresuid, setresgid = (ctypes.c_long(n) for n in numbers)
        keep = ctypes.c_uint(_KEEP)

        def groups(ids: tuple[int, ...]) -> tuple[Any, ...]:
            return (setgroups, ctypes.c_long(len(ids)), (ctypes.c_uint * max(1, len(ids)))(*ids))

        self.uid, self.gid = ident.uid, ident.gid
        # Groups and gid first (they need root), the uid last; back the other way.
        self.to = (
            groups(ident.groups),
            (setresgid, keep, ctypes.c_uint(ident.gid), keep),
            (setresuid, keep, ctypes.c_uint(ident.uid), keep),
        )
        self.back = (
            (setresuid, keep, ctypes.c_uint(own[0]), keep),
            (setresgid, keep, ctypes.c_uint(own[1]), keep),
            groups(own[2]),
        )


class _Kernel:
    """libc's ``syscall`` and the switches built so far (one per identity)."""

    def __init__(self) -> None:
        self.numbers = _SYSCALLS.get(platform.machine())
        name = ctypes.util.find_library("c")
        if self.numbers is None or name is None:
            raise IdentityError(f"per-thread credentials are not supported on {platform.machine()}")
        self.syscall = ctypes.CDLL(name, use_errno=True).syscall
        self.syscall.restype = ctypes.c_long
        self.own = (os.geteuid(), os.getegid(), tuple(sorted(os.getgroups())))
        self.switches: dict[Identity, _Switch | None] = {}

    def switch(self, ident: Identity) -> _Switch | None:
        """How to become ``ident`` (None: we are it already)."""
        try:
            return self.switches[ident]
        except KeyError:
            pass
        own = self.own
        same = own[0] == ident.uid and own[1] == ident.gid and own[2] == ident.groups
        switch = None if same else _Switch(ident, own, self.numbers)
        if len(self.switches) < 65536:  # one per user; bounded all the same
            self.switches[ident] = switch
        return switch


_kernel: _Kernel | None = None


def _get_kernel() -> _Kernel:
    global _kernel
    if _kernel is None:
        _kernel = _Kernel()
    return _kernel


def can_switch() -> bool:
    """Whether this process may act as other users (it runs as root)."""
    return os.geteuid() == 0


def call_as(ident: Identity | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in this thread as ``ident``; None runs it as we are.

    The thread's effective uid, gid and groups are ``ident``'s for the call
    and the gateway's again afterwards, whether ``fn`` returned or raised.
    This is on the path of every SFTP request, so the system calls' arguments
    are built once per identity (:class:`_Switch`).

    Raises:
        IdentityError: the switch did not take (the call is not made).
        Whatever ``fn`` raises.
    """
    if ident is None:
        return fn(*args, **kwargs)
    kernel = _kernel if _kernel is not None else _get_kernel()
    switch = kernel.switch(ident)
    if switch is None:
        return fn(*args, **kwargs)
    syscall = kernel.syscall
    groups, gid, uid = switch.to
    # getresuid/getresgid answer for this thread alone: they show the switch took.
    if (
        syscall(*groups)
        or syscall(*gid)
        or syscall(*uid)
        or os.getresuid()[1] != switch.uid
        or os.getresgid()[1] != switch.gid
    ):
        err = ctypes.get_errno()
        _back(kernel, switch)
        raise IdentityError(f"cannot act as {ident.describe()}: {os.strerror(err)}")
    try:
        return fn(*args, **kwargs)
    finally:
        _back(kernel, switch)


def _back(kernel: _Kernel, switch: _Switch) -> None:
    syscall = kernel.syscall
    uid, gid, groups = switch.back
    if syscall(*uid) or syscall(*gid) or syscall(*groups) or os.geteuid() != kernel.own[0]:
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
