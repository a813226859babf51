"""Exceptions to SFTP statuses: the one translation. Pure.

Every error a request of ``serve`` ends in becomes a :class:`Status` here:

- an ``OSError``: the status its ``errno`` means (the table below), told to
  the client in OpenSSH's sftp-server's words for that status, so both front
  doors say the same thing — unless the gateway raised it with words of its
  own ("Not a regular file"), which are kept; an ``errno`` the table does not
  know is a ``failure`` told with the system's words (``Input/output error``);
- an :class:`~sftpgate.errors.SftpgateError` the table names (a path that
  leaves the home, a user the gateway cannot act as): its status and text;
- anything else (a bug, a storage error): ``failure`` with the generic text.
  Its details (an SQLite message, a Python exception's name) are never told
  to the client: they are in :attr:`Status.detail`, for the journal and log.

asyncssh's own ``SFTPError`` already is a status; the front door passes it on
(``frontdoor/sftp.py``), so nothing here imports asyncssh.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Final

from ..errors import JailError, SftpgateError
from ..identity import IdentityError
from .constants import (
    FX_DIR_NOT_EMPTY,
    FX_FAILURE,
    FX_FILE_ALREADY_EXISTS,
    FX_FILE_IS_A_DIRECTORY,
    FX_INVALID_FILENAME,
    FX_NO_SPACE_ON_FILESYSTEM,
    FX_NO_SUCH_FILE,
    FX_NOT_A_DIRECTORY,
    FX_PERMISSION_DENIED,
    FX_QUOTA_EXCEEDED,
    status_name,
    status_text,
)

# errno -> status. (A v3 client is sent FX_FAILURE for codes above 8; the
# journal keeps the precise name.)
_ERRNO: Final[dict[int, int]] = {
    errno.ENOENT: FX_NO_SUCH_FILE,
    errno.EACCES: FX_PERMISSION_DENIED,
    errno.EPERM: FX_PERMISSION_DENIED,
    errno.EROFS: FX_PERMISSION_DENIED,
    errno.ELOOP: FX_PERMISSION_DENIED,  # O_NOFOLLOW met a symlink: the jail said no
    errno.EEXIST: FX_FILE_ALREADY_EXISTS,
    errno.ENOTEMPTY: FX_DIR_NOT_EMPTY,
    errno.ENOTDIR: FX_NOT_A_DIRECTORY,
    errno.EISDIR: FX_FILE_IS_A_DIRECTORY,
    errno.ENOSPC: FX_NO_SPACE_ON_FILESYSTEM,
    errno.EDQUOT: FX_QUOTA_EXCEEDED,
    errno.ENAMETOOLONG: FX_INVALID_FILENAME,
}

# Our own errors a client may meet, and what it is told (None: the error's text).
_OURS: Final[tuple[tuple[type[SftpgateError], int, str | None], ...]] = (
    (JailError, FX_PERMISSION_DENIED, None),
    (IdentityError, FX_PERMISSION_DENIED, "the gateway cannot act as this user"),
)


@dataclass(frozen=True, slots=True)
class Status:
    """An SFTP status for a failed request: what the client is told, and why.

    ``message`` is safe to send; ``detail`` (when set) is what the journal and
    the log record instead: never sent.
    """

    code: int
    message: str
    detail: str | None = None

    @property
    def name(self) -> str:
        """The journal's name of the status (``no_such_file``)."""
        return status_name(self.code)

    @property
    def journal_message(self) -> str:
        return self.detail if self.detail is not None else self.message


def status_of(exc: BaseException) -> Status:
    """The status a request that raised ``exc`` answers with. Never raises."""
    if isinstance(exc, OSError):
        code = _ERRNO.get(exc.errno or 0)
        if code is not None:
            # Our own words where we gave some ("Not a regular file", "cannot
            # remove the home"); the system's are replaced by sftp-server's.
            words = exc.strerror
            if words and words != os.strerror(exc.errno or 0):
                return Status(code, words)
            return Status(code, status_text(code))
        return Status(FX_FAILURE, exc.strerror or status_text(FX_FAILURE))
    for kind, code, text in _OURS:
        if isinstance(exc, kind):
            return Status(code, f"{status_text(code)}: {text or exc}")
    return Status(FX_FAILURE, status_text(FX_FAILURE), internal_detail(exc))


def internal_detail(exc: BaseException) -> str:
    """How an unexpected error is journaled and logged (never told to a client)."""
    return f"internal error: {type(exc).__name__}: {exc}"
