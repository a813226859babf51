"""Private state: folders 0700 and files 0600, whatever the umask.

The journal (with its WAL and shared-memory files), the host keys and the
state folder hold the audit trail and the server's identity. Modes are given
at creation and set again with ``chmod``/``fchmod`` (a umask can only take
bits away, but an odd one such as 0277 would take the owner's too); the
process-wide umask is never changed, as threads may be creating files
meanwhile. Something found more open than that at start is tightened, with a
warning in the log.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, *, tighten: bool = True) -> None:
    """Make sure folder ``path`` exists; every folder created here is 0700.

    With ``tighten``, an existing ``path`` open to group or others is made
    0700 (logged). Raises ``OSError``.
    """
    missing: list[Path] = []
    folder = path
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: left as it is
        os.chmod(folder, DIR_MODE)
    if tighten and path not in missing:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, DIR_MODE)
            log.warning("%s was mode %04o, open to others: made it 0700", path, mode)


def private_file(path: Path, *, create: bool = True) -> bool:
    """Create ``path`` (empty) 0600 if missing, or make an existing one 0600 if it is open.

    Without ``create`` a missing file is left missing. Returns whether the
    file exists now. Raises ``OSError``.

    An existing file is never opened, only stat'ed and chmod'ed by name:
    closing any descriptor of a file drops every POSIX lock this process holds
    on it, and SQLite's locks on the journal (and its -shm) are such locks.
    """
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except FileExistsError:
            pass
        else:
            # A new inode: no other descriptor of it (nor lock on it) exists.
            os.fchmod(fd, FILE_MODE)
            os.close(fd)
            return True
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        if create:
            raise
        return False
    if mode & 0o077 or mode & FILE_MODE != FILE_MODE:
        os.chmod(path, FILE_MODE)
        if mode & 0o077:
            log.warning("%s was mode %04o, open to others: made it 0600", path, mode)
    return True


def write_private(path: Path, data: bytes, *, exclusive: bool = True) -> None:
    """Write ``data`` to a new file at ``path``, 0600 from its creation. Raises ``OSError``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(path, flags, FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, FILE_MODE)
        out.write(data)
