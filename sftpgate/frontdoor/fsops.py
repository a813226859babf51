"""Blocking filesystem work for one jailed user, run in worker threads.

Nothing here touches the event loop; :mod:`.sftp` calls these through an
executor so a slow (NFS) call stalls only the thread it runs in.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from asyncssh import SFTPAttrs, SFTPName

from ..attrs import summarize
from .inline import SMALL_WRITE, NotQuick
from .jail import Jail, Resolved
from .writebehind import WriteQueue, write_chunks

FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 1, 2, 4, 8, 0x10, 0x20

# Never let a user create set-uid/set-gid files, even when the gateway is root.
_MODE_MASK = 0o1777


@dataclass(slots=True)
class OpenFile:
    """A handle the client holds, with what went through it."""

    fd: int
    resolved: Resolved
    pflags: int
    mode: int | None
    created: bool
    opened_at: float = field(default_factory=monotonic)
    bytes_read: int = 0
    bytes_written: int = 0
    error: str | None = None
    # Write-behind queue of a writable handle (set on the event loop after open).
    queue: WriteQueue | None = None

    @property
    def writable(self) -> bool:
        return bool(self.pflags & (FXF_WRITE | FXF_APPEND))


def _open(local: bytes, flags: int, mode: int, quick: bool) -> tuple[int, bool]:
    """``os.open``, and whether it made the file (new files get their owner).

    An upload names a new file: an exclusive create says so in one call
    (what a check before the open took a second for); only an existing file
    costs a second open. ``quick``: raise :class:`NotQuick` instead of
    truncating a file bigger than :data:`SMALL_WRITE` (freeing its blocks
    takes the filesystem a while).
    """
    if flags & os.O_CREAT and not flags & os.O_EXCL:
        try:
            return os.open(local, flags | os.O_EXCL, mode), True
        except FileExistsError:
            pass
        if quick and flags & os.O_TRUNC:
            _truncates_little(local)
        return os.open(local, flags, mode), False
    if quick and flags & os.O_TRUNC and not flags & os.O_EXCL:
        _truncates_little(local)
    return os.open(local, flags, mode), bool(flags & os.O_CREAT)


def _truncates_little(local: bytes) -> None:
    """Raise NotQuick if truncating ``local`` would free more than a small file."""
    try:
        st = os.lstat(local)
    except OSError:
        return  # the open will say what is wrong
    if stat.S_ISREG(st.st_mode) and st.st_size > SMALL_WRITE:
        raise NotQuick


def _not_regular() -> OSError:
    return PermissionError(errno.EPERM, "Not a regular file")


def os_flags(pflags: int) -> int:
    """SFTP v3 open flags to ``os.open`` flags. Pure."""
    if pflags & FXF_READ and pflags & (FXF_WRITE | FXF_APPEND):
        flags = os.O_RDWR
    elif pflags & (FXF_WRITE | FXF_APPEND):
        flags = os.O_WRONLY
    else:
        flags = os.O_RDONLY
    if pflags & FXF_APPEND:
        flags |= os.O_APPEND
    if pflags & FXF_CREAT:
        flags |= os.O_CREAT
        if pflags & FXF_EXCL:
            flags |= os.O_EXCL
    if pflags & FXF_TRUNC:
        flags |= os.O_TRUNC
    return flags | os.O_NOFOLLOW | os.O_CLOEXEC


def attrs_summary(attrs: SFTPAttrs) -> dict[str, Any]:
    """The attributes a client asked to set, as journal JSON. Pure."""
    return summarize(
        size=attrs.size,
        permissions=attrs.permissions,
        uid=attrs.uid,
        gid=attrs.gid,
        atime=attrs.atime,
        mtime=attrs.mtime,
    )


class UserFS:
    """The operations of one SFTP session, on paths checked by its :class:`Jail`."""

    def __init__(self, jail: Jail, owner: Callable[[], tuple[int, int] | None]) -> None:
        self.jail = jail
        # (uid, gid) to give new files when the gateway runs as root; asked at
        # the first file made (it may stat the home: blocking, so in the pool).
        self._owner = functools.cache(owner)
        self._names: dict[tuple[str, int], str] = {}

    def _chown(self, local: bytes, fd: int | None = None) -> None:
        owner = self._owner()
        if owner is None:
            return
        if fd is not None:
            os.fchown(fd, *owner)
        else:
            os.lchown(local, *owner)

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs, *, quick: bool = False) -> OpenFile:
        """Open a regular file (or a folder, to read); refuse anything else.

        ``quick``: the open runs on the event loop, so it raises
        :class:`~.inline.NotQuick` rather than truncate a big file.

        The open is non-blocking: a FIFO someone made in a home (a shell
        user, the NFS server's side) would otherwise wait for a writer
        forever, holding a pool thread, or, inline, the event loop and every
        session with it. Devices and sockets are refused too.
        """
        resolved = self.jail.resolve(path, follow=True)
        mode = attrs.permissions & _MODE_MASK if attrs.permissions is not None else 0o666
        flags = os_flags(pflags)
        try:
            fd, created = _open(resolved.local, flags | os.O_NONBLOCK, mode, quick)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO without a reader, a socket
                raise _not_regular() from None
            raise
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind == stat.S_IFDIR and pflags & (FXF_WRITE | FXF_APPEND):
                raise IsADirectoryError(errno.EISDIR, "Is a directory")
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise _not_regular()
            # Back to blocking I/O, as any file (O_NONBLOCK also changes how
            # a lease break is waited for): F_SETFL takes the open's own
            # flags, of which it keeps only O_APPEND; one call.
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            if created:
                self._chown(resolved.local, fd)
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(fd, resolved, pflags, attrs.permissions, created)

    @staticmethod
    def read(f: OpenFile, offset: int, size: int) -> bytes:
        data = os.pread(f.fd, size, offset)
        f.bytes_read += len(data)
        return data

    # Writes go through the handle's write-behind queue, a batch per thread trip.
    write_chunks = staticmethod(write_chunks)

    def stat(self, path: bytes) -> os.stat_result:
        return self.jail.stat(path)[1]

    def lstat(self, path: bytes) -> os.stat_result:
        return os.lstat(self.jail.resolve(path, follow=False).local)

    def list(self, path: bytes) -> list[SFTPName]:
        resolved = self.jail.resolve(path, follow=True)
        names = [b".", b".."]
        with os.scandir(resolved.local) as entries:
            names += sorted(entry.name for entry in entries)
        out: list[SFTPName] = []
        for name in names:
            local = resolved.local if name in (b".", b"..") else os.path.join(resolved.local, name)
            if name == b".." and resolved.local != self.jail.root:
                local = os.path.dirname(resolved.local)
            try:
                st = os.lstat(local)
            except OSError:  # vanished while listing
                continue
            self.remember_names(st)
            out.append(SFTPName(name, attrs=SFTPAttrs.from_local(st)))
        return out

    def remember_names(self, st: os.stat_result) -> None:
        for kind, ident in (("u", st.st_uid), ("g", st.st_gid)):
            if (kind, ident) not in self._names:
                try:
                    name = pwd.getpwuid(ident).pw_name if kind == "u" else _group(ident)
                except KeyError:
                    name = str(ident)
                self._names[(kind, ident)] = name

    def name_of(self, kind: str, ident: int | None) -> str:
        """Cached user/group name (filled by list()); never blocks."""
        if ident is None:
            return ""
        return self._names.get((kind, ident), str(ident))

    def setstat(
        self, path: bytes | None, f: OpenFile | None, attrs: SFTPAttrs, *, follow: bool = True
    ) -> None:
        target: int | bytes
        if f is not None:
            target = f.fd
        else:
            assert path is not None
            target = self.jail.resolve(path, follow=follow).local
        current = (
            os.stat(target, follow_symlinks=follow)
            if isinstance(target, bytes)
            else os.fstat(target)
        )
        if (attrs.uid is not None and attrs.uid != current.st_uid) or (
            attrs.gid is not None and attrs.gid != current.st_gid
        ):
            raise PermissionError(errno.EPERM, "changing owner or group is not allowed")
        if attrs.size is not None:
            os.truncate(target, attrs.size)
        if attrs.permissions is not None:
            if isinstance(target, bytes) and not follow and stat.S_ISLNK(current.st_mode):
                pass  # Linux has no lchmod; a link's mode means nothing
            else:
                os.chmod(target, attrs.permissions & _MODE_MASK)
        if attrs.atime is not None or attrs.mtime is not None:
            atime = attrs.atime if attrs.atime is not None else current.st_atime
            mtime = attrs.mtime if attrs.mtime is not None else current.st_mtime
            if isinstance(target, bytes):
                os.utime(target, (atime, mtime), follow_symlinks=follow)
            else:
                os.utime(target, (atime, mtime))

    def remove(self, path: bytes) -> None:
        resolved = self.jail.resolve(path, follow=False)
        if os.path.isdir(resolved.local) and not os.path.islink(resolved.local):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        os.unlink(resolved.local)

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        resolved = self.jail.resolve(path, follow=False)
        mode = attrs.permissions & _MODE_MASK if attrs.permissions is not None else 0o777
        os.mkdir(resolved.local, mode)
        self._chown(resolved.local)

    def rmdir(self, path: bytes) -> None:
        resolved = self.jail.resolve(path, follow=False)
        if resolved.virtual == b"/":
            raise PermissionError(errno.EACCES, "cannot remove the home")
        os.rmdir(resolved.local)

    def rename(self, old: bytes, new: bytes, *, overwrite: bool) -> int:
        """Rename; return the size of what was renamed (0 for anything but a file)."""
        src = self.jail.resolve(old, follow=False)
        dst = self.jail.resolve(new, follow=False)
        if src.virtual == b"/" or dst.virtual == b"/":
            raise PermissionError(errno.EACCES, "cannot rename the home")
        if not overwrite and os.path.lexists(dst.local):
            raise FileExistsError(errno.EEXIST, "File already exists")
        os.rename(src.local, dst.local)
        st = os.lstat(dst.local)
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def readlink(self, path: bytes) -> bytes:
        resolved = self.jail.resolve(path, follow=False)
        return self.jail.link_for_client(os.readlink(resolved.local), resolved)

    def symlink(self, target: bytes, link: bytes) -> None:
        resolved = self.jail.resolve(link, follow=False)
        content = self.jail.link_target(target, resolved)
        os.symlink(content, resolved.local)
        self._chown(resolved.local)

    def link(self, old: bytes, new: bytes) -> None:
        src = self.jail.resolve(old, follow=True)
        dst = self.jail.resolve(new, follow=False)
        os.link(src.local, dst.local, follow_symlinks=False)

    def realpath(self, path: bytes) -> bytes:
        resolved = self.jail.resolve(path, follow=True)
        return self.jail.to_virtual(resolved.local)

    def statvfs(self, path: bytes) -> os.statvfs_result:
        return os.statvfs(self.jail.resolve(path, follow=True).local)


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name
