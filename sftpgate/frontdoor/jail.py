"""The user's view of their home (home = ``/``): pure path arithmetic.

Nothing here touches the filesystem. What keeps a user inside the home is
how paths are *reached*: :class:`sftpgate.beneath.Home` resolves every path
beneath the home's descriptor in the call that uses it. This module only
normalises what clients send and translates symlink contents between the
user's view and the host, so that the links users make work in both.
"""

from __future__ import annotations

import functools
import posixpath

from ..beneath import virtual as _virtual
from ..errors import JailError

# Paths up to this long are remembered, the last 1,024 (at most ~0.5 MB).
_REMEMBERED_PATH = 512


@functools.lru_cache(maxsize=1024)
def _virtual_remembered(path: bytes) -> bytes:
    return _virtual(path, b"/")


def virtual(path: bytes, base: bytes = b"/") -> bytes:
    """Normalise ``path`` (relative to ``base``) to an absolute virtual path. Pure.

    ``..`` cannot climb above ``/``. Short paths are remembered: a request's
    path is normalised again for its journal event, and an upload names the
    same path in its STAT and its OPEN.
    """
    if base == b"/" and len(path) <= _REMEMBERED_PATH:
        return _virtual_remembered(path)
    return _virtual(path, base)


def link_target(target: bytes, link: bytes) -> bytes:
    """What to store in a new symlink at virtual ``link`` for client path ``target``. Pure.

    The target is read in the user's view (absolute = from the home,
    relative = from the link's folder) and stored relative, so the link
    works in the jail and on the host alike. A link may later be moved
    anywhere (so its ``..`` may then lead out): that is harmless, because
    nothing is ever reached through a link outside the home.
    """
    folder = posixpath.dirname(link)
    wanted = virtual(target, folder)
    return posixpath.relpath(wanted, folder)


def link_for_client(content: bytes, link: bytes, home_real: bytes) -> bytes:
    """What to tell the client that the symlink at virtual ``link`` points to. Pure.

    Relative contents are shown as they are when, read from the link's
    folder, they stay in the home; absolute ones only when they name a place
    under the home's real path ``home_real`` (then in the user's view).

    Raises:
        JailError: the link points outside the home.
    """
    if not content.startswith(b"/"):
        depth = len([p for p in posixpath.dirname(link).split(b"/") if p])
        for part in content.split(b"/"):
            if part == b"..":
                depth -= 1
                if depth < 0:
                    raise JailError("symlink points outside the home")
            elif part not in (b"", b"."):
                depth += 1
        return content
    home = home_real.rstrip(b"/")
    normal = posixpath.normpath(content)
    if normal == home:
        return b"/"
    if normal.startswith(home + b"/"):
        return normal[len(home) :]
    raise JailError("symlink points outside the home")
