"""Reach files beneath a home, never through a link out of it, in the call that uses them.

A :class:`Home` holds a descriptor of the home folder, opened once. Every path
a user names is resolved from that descriptor by the kernel in the same call
that opens it: ``openat2`` with ``RESOLVE_BENEATH`` (Linux >= 5.6), which
refuses a ``..`` or a symlink that leads above the home however the tree is
renamed meanwhile. Operations that act on a name itself (remove, rename,
mkdir, symlink...) resolve the *parent* that way and then use the ``*at``
call on the parent's descriptor with the last name, so no string is checked
and used later.

Where ``openat2`` is missing (older kernels, seccomp filters), and for an
absolute symlink (which ``RESOLVE_BENEATH`` always refuses, even one that
points inside the home), the walk is done here instead, one component at a
time on descriptors: ``openat(O_PATH | O_NOFOLLOW)``, ``readlinkat`` of what
was opened, ``..`` popping a stack of descriptors that starts at the home,
so it cannot climb out of it either. An absolute link target is taken as a
host path and accepted only when it lies under the home's real path.

Paths here are *virtual*: normalised absolute paths as the user sees them,
home = ``/`` (see :func:`virtual`). Every call is blocking.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import platform
import posixpath
import stat
import threading
from dataclasses import dataclass

from .errors import JailError

# Symlinks followed in one lookup before giving up, as Linux does (MAXSYMLINKS).
MAX_LINKS = 40
# Times a walk is redone when a name turns into a link between two calls.
_RETRIES = 8

_SYS_OPENAT2 = 437  # the same number on every architecture
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276}
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    lib = ctypes.CDLL(name, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


def _openat2(dirfd: int, path: bytes, flags: int, mode: int) -> int:
    """The raw openat2 system call beneath ``dirfd``; raises OSError (ENOSYS where missing)."""
    lib = _libc()
    if lib is None:
        raise OSError(errno.ENOSYS, "openat2 is not available")
    # openat2 refuses a mode the open does not use (O_TMPFILE includes O_DIRECTORY's bit).
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    how = _OpenHow(flags, mode if creates else 0, 0)
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
    fd = lib.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    """``renameat2(2)``; raises OSError (EINVAL or ENOSYS where the filesystem or kernel can't)."""
    lib = _libc()
    number = _SYS_RENAMEAT2.get(platform.machine())
    if lib is None or number is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    rc = lib.syscall(
        ctypes.c_long(number),
        ctypes.c_int(olddir),
        ctypes.c_char_p(old),
        ctypes.c_int(newdir),
        ctypes.c_char_p(new),
        ctypes.c_uint(flags),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)


def rename_noreplace(olddir: int, old: bytes, newdir: int, new: bytes) -> None:
    """Rename ``old`` to ``new`` unless ``new`` exists (FileExistsError).

    Atomic where the filesystem has ``RENAME_NOREPLACE``; elsewhere (older
    NFS) a hard link then an unlink of the old name, which also never
    replaces, for files; a folder gets a check then a plain rename.
    """
    try:
        renameat2(olddir, old, newdir, new, RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    st = os.stat(old, dir_fd=olddir, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        try:
            os.stat(new, dir_fd=newdir, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(old, new, src_dir_fd=olddir, dst_dir_fd=newdir)
            return
        raise FileExistsError(errno.EEXIST, "File already exists", new)
    os.link(old, new, src_dir_fd=olddir, dst_dir_fd=newdir, follow_symlinks=False)
    os.unlink(old, dir_fd=olddir)


def virtual(path: bytes, base: bytes = b"/") -> bytes:
    """Normalise ``path`` (relative to ``base``) to an absolute path in the user's view. Pure.

    ``..`` cannot climb above ``/``; the result never has a trailing slash.
    """
    joined = posixpath.join(base, path) if not path.startswith(b"/") else path
    normal = posixpath.normpath(b"/" + joined.lstrip(b"/"))
    return b"/" if normal in (b"", b"/", b"//") else b"/" + normal.lstrip(b"/")


def split(path: bytes) -> tuple[bytes, bytes]:
    """(parent, last name) of a virtual path; the name is empty for ``/``. Pure."""
    if path == b"/":
        return b"/", b""
    parent, name = posixpath.split(path)
    return parent, name


def _rel(path: bytes) -> bytes:
    return path.lstrip(b"/") or b"."


def proc_path(fd: int) -> str:
    """A path that reaches the file ``fd`` is open on (for calls that take no descriptor)."""
    return f"/proc/self/fd/{fd}"


@dataclass(slots=True)
class Parent:
    """A folder's descriptor (O_PATH) and a name in it: the object a call acts on."""

    fd: int
    name: bytes

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Parent:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


class Home:
    """One user's home, reached only through its descriptor."""

    def __init__(self, path: str | os.PathLike[str], *, use_openat2: bool = True) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._real: bytes | None = None
        self._openat2 = use_openat2
        self._lock = threading.Lock()

    # -- the home itself ------------------------------------------------------

    @property
    def fd(self) -> int:
        """The home's descriptor (O_PATH); the first use opens it (blocking)."""
        if self._fd is None:
            with self._lock:  # two first calls at once must not open it twice
                if self._fd is None:
                    fd = os.open(self.path, _DIR)
                    self._real = os.fsencode(os.readlink(proc_path(fd)))
                    self._fd = fd
        return self._fd

    @property
    def real(self) -> bytes:
        """The home's real path on the host, as the kernel names it now."""
        self.fd  # noqa: B018 - opens it
        assert self._real is not None
        return self._real

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    # -- resolution -----------------------------------------------------------

    def open(self, path: bytes, flags: int, mode: int = 0o666) -> int:
        """Open virtual ``path`` beneath the home; ``flags`` as for ``os.open``.

        Links are followed inside the home unless ``flags`` has O_NOFOLLOW
        (then a link as the last component is ELOOP, or opened itself with
        O_PATH). Raises JailError when the path leads out of the home, else
        the open's OSError.
        """
        flags |= os.O_CLOEXEC
        if self._openat2:
            try:
                return _openat2(self.fd, _rel(path), flags, mode)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:
                    self._openat2 = False
                elif exc.errno not in (errno.EXDEV, errno.EAGAIN):
                    raise
                # EXDEV: out of the home, or an absolute link: the walk decides.
        follow = not flags & os.O_NOFOLLOW
        for _ in range(_RETRIES):
            with self._walk(path, follow_last=follow) as parent:
                try:
                    return os.open(
                        parent.name or b".", flags | os.O_NOFOLLOW, mode, dir_fd=parent.fd
                    )
                except OSError as exc:
                    # A name that became a link since the walk looked at it: walk again.
                    if not follow or exc.errno != errno.ELOOP:
                        raise
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)

    def parent(self, path: bytes) -> Parent:
        """The folder that holds virtual ``path``'s last name, resolved beneath the home.

        The name is empty for ``/`` (the home itself: ``fd`` is then the
        home). The caller closes it. Raises JailError or OSError.
        """
        folder, name = split(path)
        if not name:
            return Parent(os.dup(self.fd), b"")
        return Parent(self.open(folder, _DIR), name)

    def stat(self, path: bytes, *, follow: bool = True) -> os.stat_result:
        fd = self.open(path, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def realpath(self, path: bytes) -> bytes:
        """The virtual path ``path`` leads to, links followed (missing parts kept as given)."""
        parts: list[bytes] = []
        stack = [os.dup(self.fd)]
        todo = [p for p in reversed(path.split(b"/")) if p]
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name == b".":
                    continue
                if name == b"..":
                    if not parts:  # only a link's target can climb: ``path`` is normalised
                        raise JailError("path leads outside the home")
                    parts.pop()
                    fd_ = stack.pop()
                    if fd_ >= 0:
                        os.close(fd_)
                    continue
                if stack[-1] < 0:  # below a missing folder: the rest as given
                    parts.append(name)
                    stack.append(-1)
                    continue
                try:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                except FileNotFoundError:
                    parts.append(name)
                    stack.append(-1)
                    continue
                target = self._link_target(fd)
                if target is None:
                    parts.append(name)
                    stack.append(fd)
                    continue
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                if target.startswith(b"/"):
                    target = self._inside(target)
                    for fd_ in stack[1:]:
                        if fd_ >= 0:
                            os.close(fd_)
                    del stack[1:]
                    parts.clear()
                todo.extend(p for p in reversed(target.split(b"/")) if p)
            return b"/" + b"/".join(parts)
        finally:
            for fd_ in stack:
                if fd_ >= 0:
                    os.close(fd_)

    @staticmethod
    def _link_target(fd: int) -> bytes | None:
        """The target if ``fd`` (O_PATH|O_NOFOLLOW) is a link (then closed); else None."""
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                return None
            target = os.readlink(b"", dir_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return target

    def _inside(self, target: bytes) -> bytes:
        """An absolute link target as a virtual path, or JailError when outside the home."""
        real = self.real
        if target == real or target.startswith(real.rstrip(b"/") + b"/"):
            return target[len(real.rstrip(b"/")) :] or b"/"
        raise JailError("path leads outside the home")

    def _walk(self, path: bytes, *, follow_last: bool) -> Parent:
        """Resolve ``path`` to (folder descriptor, last name) one component at a time."""
        stack = [os.dup(self.fd)]
        todo = [p for p in reversed(path.split(b"/")) if p and p != b"."]
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name == b"..":
                    if len(stack) == 1:
                        raise JailError("path leads outside the home")
                    os.close(stack.pop())
                    continue
                last = not todo
                if last and not follow_last:
                    return self._keep(stack, name)
                try:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                except FileNotFoundError:
                    if last:
                        return self._keep(stack, name)
                    raise
                target = self._link_target(fd)
                if target is not None:
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    if target.startswith(b"/"):
                        target = self._inside(target)
                        for fd_ in stack[1:]:
                            os.close(fd_)
                        del stack[1:]
                    todo.extend(p for p in reversed(target.split(b"/")) if p and p != b".")
                    continue
                if last:
                    os.close(fd)
                    return self._keep(stack, name)
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                stack.append(fd)
            # Nothing left: the path is a folder itself (the home, or one ending in ..).
            return self._keep(stack, b"")
        except BaseException:
            for fd_ in stack:
                os.close(fd_)
            raise

    @staticmethod
    def _keep(stack: list[int], name: bytes) -> Parent:
        """Close every descriptor of ``stack`` but the last; that one holds ``name``."""
        for fd_ in stack[:-1]:
            os.close(fd_)
        top = stack[-1]
        stack.clear()
        return Parent(top, name)
