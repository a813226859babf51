"""Keep every path a user names inside their home.

The user sees their home as ``/``. :meth:`Jail.virtual` is pure: it turns
what the client sent into a normalised absolute path in that view (``..``
cannot climb above ``/``). :meth:`Jail.resolve` touches the filesystem: it
follows symlinks that already exist and refuses any path whose real location
is outside the home. Callers run it in a thread (or inline on local disks).
The home's own real path is found once, at the first use (not when the jail
is made, which happens on the event loop as a session starts): a home on a
hung NFS server must stall that user's requests, not the gateway. After
that, :meth:`Jail.real` walks only the components below the home, as
``os.path.realpath`` would from there: an lstat of each of the home's own
components on every request was 6-8% of the gateway's time on small files,
and on NFS each one can be a server round trip.

What is left: a race where someone with shell access swaps a checked
directory for a symlink between the check and the use. Users of the gateway
cannot create such links (:meth:`Jail.link_target` refuses them), and the
final component is opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import stat
from dataclasses import dataclass

from ..errors import JailError

# Symlinks followed in one lookup before giving up, as Linux does (MAXSYMLINKS).
MAX_LINKS = 40


def _virtual(path: bytes, base: bytes) -> bytes:
    joined = posixpath.join(base, path) if not path.startswith(b"/") else path
    normal = posixpath.normpath(b"/" + joined.lstrip(b"/"))
    return b"/" if normal in (b"", b"/", b"//") else b"/" + normal.lstrip(b"/")


# Paths up to this long are remembered, the last 1,024 (at most ~0.5 MB).
_REMEMBERED_PATH = 512


@functools.lru_cache(maxsize=1024)
def _virtual_remembered(path: bytes) -> bytes:
    return _virtual(path, b"/")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A checked path: ``virtual`` as the user sees it, ``local`` to operate on."""

    virtual: bytes
    local: bytes


class Jail:
    """Maps a user's view (home = ``/``) onto the local filesystem and back."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self._home = os.fspath(home)
        self._root: bytes | None = None

    @property
    def root(self) -> bytes:
        """The home's real path; the first call is blocking (stat calls)."""
        if self._root is None:
            self._root = os.fsencode(os.path.realpath(self._home))
        return self._root

    @staticmethod
    def virtual(path: bytes, base: bytes = b"/") -> bytes:
        """Normalise ``path`` (relative to ``base``) to an absolute virtual path. Pure.

        Short paths are remembered: a request's path is normalised again for
        its journal event, and an upload names the same path in its STAT and
        its OPEN.
        """
        if base == b"/" and len(path) <= _REMEMBERED_PATH:
            return _virtual_remembered(path)
        return _virtual(path, base)

    def to_local(self, virtual: bytes) -> bytes:
        """The local path for a normalised virtual path (no filesystem check)."""
        return self.root if virtual == b"/" else self.root + virtual

    def inside(self, local: bytes) -> bool:
        return local == self.root or local.startswith(self.root + b"/")

    def to_virtual(self, local: bytes) -> bytes:
        """The virtual path of a local path inside the home; raises JailError otherwise."""
        if local == self.root:
            return b"/"
        if local.startswith(self.root + b"/"):
            return local[len(self.root) :]
        raise JailError("path is outside the home")

    def real(self, virtual: bytes) -> bytes:
        """``os.path.realpath(self.to_local(virtual))``, walking only below the home.

        ``virtual`` is normalised (see :meth:`virtual`). The home's real path
        is known, so the walk starts there and lstats each component below
        it; a symlink's target is walked in its place (absolute targets from
        ``/``, ``..`` from the resolved folder), so the result may lie outside
        the home: callers check. As with ``realpath``, a missing component
        ends nothing: the rest is appended as given. More than
        :data:`MAX_LINKS` symlinks raise ELOOP. Blocking (lstat, readlink).
        """
        return self._walk(virtual)[0]

    def _walk(self, virtual: bytes) -> tuple[bytes, os.stat_result | OSError | None]:
        """:meth:`real`, and what the lstat of its last component gave (None: not known).

        The last component is never a symlink, so that lstat is a stat of
        the result: a STAT of an upload's target needs no second call.
        """
        path = self.root
        todo = virtual.split(b"/")
        todo.reverse()
        links = 0
        last: os.stat_result | OSError | None = None
        while todo:
            name = todo.pop()
            if not name or name == b".":
                continue
            if name == b"..":
                path = posixpath.dirname(path)
                last = None
                continue
            candidate = path + b"/" + name if path != b"/" else b"/" + name
            try:
                last = os.lstat(candidate)
                mode = last.st_mode
            except OSError as exc:
                last = exc
                mode = 0  # missing or unreadable: taken as it is, as realpath does
            if not stat.S_ISLNK(mode):
                path = candidate
                continue
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), candidate)
            target = os.readlink(candidate)
            if target.startswith(b"/"):
                path = b"/"
            parts = target.split(b"/")
            parts.reverse()
            todo.extend(parts)
            last = None  # the link was followed: its own lstat is not the result's
        return path, last

    def resolve(self, path: bytes, *, follow: bool = True) -> Resolved:
        """Check ``path`` and return where to operate. Blocking (stat calls).

        ``follow=True``: the path's final component may be a symlink and is
        followed (open, stat, listdir). ``follow=False``: the final component
        is the object itself (remove, rename, lstat, readlink), so only its
        parent directory is resolved. Raises :class:`JailError` if the real
        location is outside the home.
        """
        virtual = self.virtual(path)
        if follow or virtual == b"/":
            real = self.real(virtual)
            if not self.inside(real):
                raise JailError("path leads outside the home")
            return Resolved(virtual, real)
        parent, name = posixpath.split(virtual)
        real_parent = self.real(parent)
        if not self.inside(real_parent):
            raise JailError("path leads outside the home")
        return Resolved(virtual, posixpath.join(real_parent, name))

    def stat(self, path: bytes) -> tuple[Resolved, os.stat_result]:
        """``resolve(path)`` and a stat of it, following symlinks. Blocking.

        Raises :class:`JailError` (outside the home) or the stat's OSError.
        """
        virtual = self.virtual(path)
        real, last = self._walk(virtual)
        if not self.inside(real):
            raise JailError("path leads outside the home")
        resolved = Resolved(virtual, real)
        if isinstance(last, OSError):
            raise last
        return resolved, last if last is not None else os.stat(real)

    def link_target(self, target: bytes, link: Resolved) -> bytes:
        """What to store in a new symlink at ``link`` pointing at client path ``target``.

        The target is taken in the user's view (absolute = from the home,
        relative = from the link's folder) and must stay inside the home; the
        link is written relative so it works both in the jail and on the host.
        Raises JailError otherwise. Blocking.
        """
        link_dir_virtual = posixpath.dirname(link.virtual)
        target_virtual = self.virtual(target, link_dir_virtual)
        target_real = self.real(target_virtual)
        if not self.inside(target_real):
            raise JailError("symlink target is outside the home")
        link_dir_real = posixpath.dirname(link.local)
        return os.fsencode(os.path.relpath(self.to_local(target_virtual), link_dir_real))

    def link_for_client(self, content: bytes, link: Resolved) -> bytes:
        """What to tell the client a symlink points to; raises JailError if outside."""
        if not content.startswith(b"/"):
            # no normpath: `dir/../x` must be resolved the way the kernel does, through links
            target = posixpath.join(posixpath.dirname(link.local), content)
            if not self.inside(os.path.realpath(target)):
                raise JailError("symlink points outside the home")
            return content
        real = os.path.realpath(content)
        if not self.inside(real):
            raise JailError("symlink points outside the home")
        return (
            self.to_virtual(os.path.normpath(content))
            if self.inside(os.path.normpath(content))
            else self.to_virtual(real)
        )
