"""Blocking filesystem work for one jailed user, run in worker threads.

Nothing here touches the event loop; :mod:`.sftp` calls these through an
executor so a slow (NFS) call stalls only the thread it runs in, and with the
user's credentials (see :mod:`sftpgate.identity`). Every path is reached
through :class:`~sftpgate.beneath.Home`: resolved beneath the home's
descriptor in the call that uses it, and operations on a name itself use the
``*at`` calls on its folder's descriptor. No path string is checked and then
used; no file is chowned (the user made it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import posixpath
import pwd
import stat
from dataclasses import dataclass, field
from time import monotonic

from asyncssh import SFTPAttrs, SFTPName

from ..beneath import Home, proc_path, rename_noreplace
from ..sftp.constants import FXF_APPEND, FXF_CREAT, FXF_EXCL, FXF_READ, FXF_TRUNC, FXF_WRITE
from .inline import SMALL_WRITE, NotQuick
from .jail import link_for_client, link_target, virtual
from .writebehind import WriteQueue, write_chunks

# Never let a user create set-uid/set-gid files, even when the gateway is root.
_MODE_MASK = 0o1777


def process_umask() -> int:
    """This process's umask, read without changing it (Linux >= 4.7); 0o022 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_PROCESS_UMASK = process_umask()
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# lseek's offsets are signed 64-bit; a client's are unsigned.
_MAX_OFFSET = 2**63 - 1


@dataclass(slots=True)
class OpenFile:
    """A handle the client holds, with what went through it."""

    fd: int
    virtual: bytes  # the path the client opened, in its view
    pflags: int
    mode: int | None
    device: int  # what was opened: the pipeline refuses any other file
    inode: int
    opened_at: float = field(default_factory=monotonic)
    bytes_read: int = 0
    bytes_written: int = 0
    error: str | None = None
    # Write-behind queue of a writable handle (set on the event loop after open).
    queue: WriteQueue | None = None
    # For quotas (when the open was asked to tell): the file's size as this
    # handle knows it (grown by its WRITEs), whether the open created it, and
    # the bytes a truncating open freed.
    size: int = 0
    created: bool = False
    freed: int = 0

    @property
    def writable(self) -> bool:
        return bool(self.pflags & (FXF_WRITE | FXF_APPEND))


def _not_regular() -> OSError:
    return PermissionError(errno.EPERM, "Not a regular file")


def quota_exceeded(why: str) -> OSError:
    """The error of a request past a quota or size limit (FX_QUOTA_EXCEEDED; v3: FX_FAILURE)."""
    return OSError(errno.EDQUOT, why)


def _home_itself(what: str) -> OSError:
    return PermissionError(errno.EACCES, f"cannot {what} the home")


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
    return flags | os.O_CLOEXEC


class UserFS:
    """The operations of one SFTP session, beneath its :class:`~sftpgate.beneath.Home`."""

    def __init__(self, home: Home, umask: int = 0o022) -> None:
        self.home = home
        self.umask = umask
        # The kernel masks new files' modes with the process umask (a systemd
        # unit's UMask=0077, say): where that takes more than ``umask``, new
        # files and folders get their mode set again, through their descriptor.
        self._remask = bool(_PROCESS_UMASK & ~umask & 0o777)
        self._names: dict[tuple[str, int], str] = {}

    def close(self) -> None:
        """Let go of the home's descriptor (no call may be running)."""
        self.home.close()

    def open(
        self,
        path: bytes,
        pflags: int,
        attrs: SFTPAttrs,
        *,
        quick: bool = False,
        track: bool = False,
        files_full: str | None = None,
    ) -> OpenFile:
        """Open a regular file (or a folder, to read); refuse anything else.

        ``quick``: the open runs on the event loop, so it raises
        :class:`~.inline.NotQuick` rather than truncate a big file.
        ``track``: tell what the open did for quotas (``OpenFile.created``,
        ``freed``). ``files_full``: the user may create no more files (the
        words of the refusal): an existing file still opens, a create fails.

        The open is non-blocking: a FIFO someone made in a home (a shell
        user, the NFS server's side) would otherwise wait for a writer
        forever, holding a pool thread, or, inline, the event loop and every
        session with it. Devices and sockets are refused too.
        """
        where = virtual(path)
        mode = attrs.permissions & _MODE_MASK if attrs.permissions is not None else 0o666
        flags = os_flags(pflags)
        if files_full is not None and flags & os.O_CREAT:
            if flags & os.O_EXCL:
                raise quota_exceeded(files_full)
            flags &= ~os.O_CREAT
        truncate_later = (quick or track) and bool(flags & os.O_TRUNC)
        if truncate_later:
            # Truncating frees the file's blocks, which takes a while for a
            # big file: look at the size first (on what was opened).
            flags &= ~os.O_TRUNC
        try:
            fd, created = self._open(where, flags | os.O_NONBLOCK, mode, tell=track)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO without a reader, a socket
                raise _not_regular() from None
            if exc.errno == errno.ENOENT and files_full is not None and pflags & FXF_CREAT:
                raise quota_exceeded(files_full) from None
            raise
        freed = 0
        try:
            if created:
                os.fchmod(fd, mode & ~self.umask)
            st = os.fstat(fd)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFDIR and pflags & (FXF_WRITE | FXF_APPEND):
                raise IsADirectoryError(errno.EISDIR, "Is a directory")
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise _not_regular()
            size = st.st_size
            if truncate_later:
                if quick and st.st_size > SMALL_WRITE:
                    raise NotQuick
                if st.st_size:
                    os.ftruncate(fd, 0)
                    freed, size = st.st_size, 0
            # Back to blocking I/O, as any file (O_NONBLOCK also changes how
            # a lease break is waited for): F_SETFL takes the open's own
            # flags, of which it keeps only O_APPEND; one call.
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(
            fd,
            where,
            pflags,
            attrs.permissions,
            st.st_dev,
            st.st_ino,
            size=size,
            created=created and kind == stat.S_IFREG,
            freed=freed,
        )

    def _open(self, where: bytes, flags: int, mode: int, *, tell: bool = False) -> tuple[int, bool]:
        """Open; and whether this call made the file (known when its mode must be set
        again, or when ``tell``; else False)."""
        if not (self._remask or tell) or not flags & os.O_CREAT:
            return self.home.open(where, flags, mode), False
        if flags & os.O_EXCL:
            return self.home.open(where, flags, mode), True
        try:  # made now, or there already: an exclusive create tells in one call
            fd = self.home.open(where, flags | os.O_EXCL, mode)
        except FileExistsError:
            return self.home.open(where, flags, mode), False
        return fd, True

    @staticmethod
    def read(f: OpenFile, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; the caller counts them in ``f.bytes_read``.

        Runs in the pool, where READs of one handle may overlap: a ``+=`` here
        could lose a count.
        """
        return os.pread(f.fd, size, offset)

    @staticmethod
    def read_cached(f: OpenFile, offset: int, size: int) -> bytes | None:
        """What the page cache holds at ``offset`` (up to ``size``), without waiting; else None.

        ``preadv2(RWF_NOWAIT)`` fails at once (EAGAIN) where a read would wait
        for a disk or a server, and on filesystems or kernels that cannot
        tell (EOPNOTSUPP): None then, and the caller reads in the pool. A
        short answer (part cached) is returned as it is: a READ reply may be
        shorter than asked. Never blocks; meant for the event loop.
        """
        if not size:
            return None
        buf = bytearray(size)
        try:
            n = os.preadv(f.fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:
            return None
        if n == 0:
            # End of file, or nothing cached (some filesystems say 0 then):
            # the pool's plain read tells the two apart.
            return None
        f.bytes_read += n
        del buf[n:]
        return bytes(buf)

    @staticmethod
    def data_ranges(
        f: OpenFile, offset: int, length: int, most: int
    ) -> tuple[list[tuple[int, int]], bool]:
        """The ranges of ``[offset, offset + length)`` that hold data, and whether that is all.

        What ``ranges@asyncssh.com`` asks (asyncssh's client then copies a
        sparse file's data and skips its holes): at most ``most`` (offset,
        length) pairs, found with SEEK_DATA/SEEK_HOLE on the handle's
        descriptor. The second value is False when ``most`` stopped the
        search before ``offset + length``. A filesystem that cannot tell
        holes reports the whole range as data. Moves the descriptor's
        offset, which nothing else uses (reads and writes are positional).

        The file's last byte always counts as data: asyncssh's client writes
        only the ranges it is given, so a file ending in a hole would arrive
        short (asyncssh's own server lets it).
        """
        found: list[tuple[int, int]] = []
        end, limit = offset, min(offset + length, _MAX_OFFSET)
        last = os.fstat(f.fd).st_size - 1
        while end < limit:
            if len(found) == most:
                return found, False
            try:
                start = os.lseek(f.fd, end, os.SEEK_DATA)
                end = min(os.lseek(f.fd, start, os.SEEK_HOLE), limit)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or after `end`
                    break
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                return [*found, (end, limit - end)], True
            if start >= limit:
                break
            found.append((start, end - start))
        if offset <= last < limit and not (found and sum(found[-1]) > last):
            if len(found) == most:
                return found, False
            found.append((last, 1))
        return found, True

    # Writes go through the handle's write-behind queue, a batch per thread trip.
    write_chunks = staticmethod(write_chunks)

    def stat(self, path: bytes) -> os.stat_result:
        return self.home.stat(virtual(path))

    def lstat(self, path: bytes) -> os.stat_result:
        return self.home.stat(virtual(path), follow=False)

    def list(self, path: bytes) -> list[SFTPName]:
        where = virtual(path)
        fd = self.home.open(where, os.O_RDONLY | os.O_DIRECTORY)
        try:
            here = os.fstat(fd)
            up = here if where == b"/" else self.home.stat(posixpath.dirname(where))
            out = [
                SFTPName(b".", attrs=SFTPAttrs.from_local(here)),
                SFTPName(b"..", attrs=SFTPAttrs.from_local(up)),
            ]
            self.remember_names(here)
            for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:  # vanished while listing
                    continue
                self.remember_names(st)
                out.append(SFTPName(name, attrs=SFTPAttrs.from_local(st)))
            return out
        finally:
            os.close(fd)

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
        self,
        path: bytes | None,
        f: OpenFile | None,
        attrs: SFTPAttrs,
        *,
        follow: bool = True,
        may_grow: tuple[int, str] | None = None,
    ) -> int:
        """Change size, mode and times of an open file or a path (refuse owner changes).

        Returns how much the size grew (negative: shrank; 0 without a size).
        ``may_grow``: the most it may grow (a quota) and the words of the
        quota error raised, before anything changes, if it would grow more.
        """
        if f is not None:
            return self._setstat(f.fd, attrs, None, opened=True, may_grow=may_grow)
        assert path is not None
        where = virtual(path)
        fd = self.home.open(where, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            return self._setstat(fd, attrs, where, opened=False, may_grow=may_grow)
        finally:
            os.close(fd)

    def _setstat(
        self,
        fd: int,
        attrs: SFTPAttrs,
        where: bytes | None,
        *,
        opened: bool,
        may_grow: tuple[int, str] | None = None,
    ) -> int:
        # `fd` is what the request names (an O_PATH descriptor unless `opened`):
        # every change goes to that object, through the descriptor.
        current = os.fstat(fd)
        if (attrs.uid is not None and attrs.uid != current.st_uid) or (
            attrs.gid is not None and attrs.gid != current.st_gid
        ):
            raise PermissionError(errno.EPERM, "changing owner or group is not allowed")
        link = stat.S_ISLNK(current.st_mode)
        target: int | str = fd if opened else proc_path(fd)
        grew = 0
        if attrs.size is not None:
            if link:
                raise OSError(errno.EINVAL, "a symlink has no size to set")
            grew = attrs.size - current.st_size if stat.S_ISREG(current.st_mode) else 0
            if may_grow is not None and grew > may_grow[0]:
                raise quota_exceeded(may_grow[1])
            os.truncate(target, attrs.size)
        if attrs.permissions is not None and not link:  # Linux has no lchmod
            os.chmod(target, attrs.permissions & _MODE_MASK)
        if attrs.atime is not None or attrs.mtime is not None:
            atime = attrs.atime if attrs.atime is not None else current.st_atime
            mtime = attrs.mtime if attrs.mtime is not None else current.st_mtime
            if not link:
                os.utime(target, (atime, mtime))
            else:
                assert where is not None
                with self.home.parent(where) as parent:
                    os.utime(parent.name, (atime, mtime), dir_fd=parent.fd, follow_symlinks=False)
        return grew

    def remove(self, path: bytes) -> os.stat_result:
        """Remove a name (not a folder); what it named (for quotas: its size, its links)."""
        with self.home.parent(virtual(path)) as parent:
            if not parent.name:
                raise _home_itself("remove")
            st = os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory")
            os.unlink(parent.name, dir_fd=parent.fd)
            return st

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        mode = attrs.permissions & _MODE_MASK if attrs.permissions is not None else 0o777
        with self.home.parent(virtual(path)) as parent:
            if not parent.name:
                raise FileExistsError(errno.EEXIST, "File exists")
            os.mkdir(parent.name, mode, dir_fd=parent.fd)
            if self._remask:
                fd = os.open(parent.name, _DIR_FLAGS, dir_fd=parent.fd)
                try:  # keeps a set-gid bit inherited from the parent (shared groups)
                    inherited = os.fstat(fd).st_mode & stat.S_ISGID
                    os.fchmod(fd, (mode & ~self.umask) | inherited)
                finally:
                    os.close(fd)

    def rmdir(self, path: bytes) -> None:
        with self.home.parent(virtual(path)) as parent:
            if not parent.name:
                raise _home_itself("remove")
            os.rmdir(parent.name, dir_fd=parent.fd)

    def rename(
        self, old: bytes, new: bytes, *, overwrite: bool
    ) -> tuple[os.stat_result, os.stat_result | None]:
        """Rename; return what the new name now holds (not following a link), and what
        it held before when ``overwrite`` replaced something (for quotas; looked at just
        before the rename, for counting only, never to decide anything)."""
        with self.home.parent(virtual(old)) as src, self.home.parent(virtual(new)) as dst:
            if not src.name or not dst.name:
                raise _home_itself("rename")
            replaced: os.stat_result | None = None
            if overwrite:
                try:
                    replaced = os.stat(dst.name, dir_fd=dst.fd, follow_symlinks=False)
                except OSError:
                    replaced = None
                os.rename(src.name, dst.name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
            else:
                rename_noreplace(src.fd, src.name, dst.fd, dst.name)
            now = os.stat(dst.name, dir_fd=dst.fd, follow_symlinks=False)
            if replaced is not None and (replaced.st_dev, replaced.st_ino) == (
                now.st_dev,
                now.st_ino,
            ):
                replaced = None  # two names of one file: nothing was freed
            return now, replaced

    def readlink(self, path: bytes) -> bytes:
        where = virtual(path)
        with self.home.parent(where) as parent:
            if not parent.name:
                raise OSError(errno.EINVAL, "Invalid argument")
            content = os.readlink(parent.name, dir_fd=parent.fd)
        return link_for_client(content, where, self.home.real)

    def symlink(self, target: bytes, link: bytes) -> None:
        where = virtual(link)
        with self.home.parent(where) as parent:
            if not parent.name:
                raise FileExistsError(errno.EEXIST, "File exists")
            os.symlink(link_target(target, where), parent.name, dir_fd=parent.fd)

    def link(self, old: bytes, new: bytes) -> None:
        fd = self.home.open(virtual(old), os.O_PATH)
        try:
            with self.home.parent(virtual(new)) as parent:
                if not parent.name:
                    raise FileExistsError(errno.EEXIST, "File exists")
                # linkat of the very file opened, not of a name looked up again
                os.link(proc_path(fd), parent.name, dst_dir_fd=parent.fd, follow_symlinks=True)
        finally:
            os.close(fd)

    def usage(self) -> tuple[int, int]:
        """(bytes, files) of the regular files beneath the home, each inode once.

        The one scan quotas make (see limits.py): as the user, on descriptors,
        never following a link; a folder the user cannot read is skipped.
        """
        seen: set[tuple[int, int]] = set()
        total = 0
        for _, _, files, dir_fd in os.fwalk(".", dir_fd=self.home.fd, follow_symlinks=False):
            for name in files:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        return total, len(seen)

    def realpath(self, path: bytes) -> bytes:
        return self.home.realpath(virtual(path))

    def statvfs(self, path: bytes) -> os.statvfs_result:
        fd = self.home.open(virtual(path), os.O_PATH)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name
