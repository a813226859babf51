"""What an SFTP session's requests mean for the journal, for both front doors. Pure.

``serve`` (``frontdoor/sftp.py``) and the OpenSSH tap (``subsystem/tracker.py``)
each see requests and their outcomes their own way; what those outcomes *mean*
is decided here, once:

- **Which requests are journaled.** Those in :data:`JOURNAL_ALWAYS` (they
  change something, or are a transfer's start and end) always; every other
  one (reads, writes, stats, realpath, readlink, statvfs, fsync) only when it
  fails. See :func:`journaled`.
- **When an upload is complete** (DESIGN.md decision 2). A CLOSE that
  succeeds, of a handle opened for writing, through which this session wrote
  at least one byte with no write failing, completes an upload, unless the
  file has a temporary name (``temp_patterns``: ``*.filepart``, ``*.part``,
  ``*.tmp``). Then the upload completes at the RENAME of that temporary name
  to a final one. A session that ends with a write handle open journals an
  *incomplete* upload and completes nothing.
- **The temporary-name rule.** A RENAME of a temporary name completes an
  upload only if *this session* wrote that name (closed a write handle on it,
  cleanly, with at least one byte) and has not renamed it away since; the
  upload's bytes are the bytes this session wrote there. A rename of any
  other temporary name is a plain rename, journaled with
  :data:`NOTHING_UNDER_TEMP`. Why this and not "any non-empty temporary
  file" (what ``serve`` did before): the tap only ever sees the bytes of its
  own session, so only this rule can be the same in both front doors; and an
  upload is something a client *did*: renaming a stale ``.part`` left by a
  cut-off session, another tool's temporary file, or an old file renamed
  back and forth would otherwise start a job for bytes nobody just sent. A
  client that resumes a temporary file in a new session writes the rest in
  that session, and its rename completes the upload (with that session's
  bytes). A rename from one temporary name to another carries the count.
- **The messages** a CLOSE or RENAME is journaled with (the constants below).

Nothing here does I/O; :class:`Uploads` keeps one session's memory of its
temporary names and is fed the outcomes by the front door.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..events import Op, UploadState
from ..patterns import name_matches

ENDED: Final = "session ended with the file open"
TEMPORARY: Final = "temporary name: the upload completes when renamed"
NOTHING_WRITTEN: Final = "nothing written: not an upload"
NOTHING_UNDER_TEMP: Final = (
    "nothing written under the temporary name in this session: not an upload"
)
UNKNOWN_COPY: Final = "server-side copy-data of unknown length: not counted"

# Journaled whatever their outcome; every other request only when it fails.
JOURNAL_ALWAYS: Final = frozenset(
    {
        Op.OPEN,
        Op.CLOSE,
        Op.LIST,
        Op.REMOVE,
        Op.RENAME,
        Op.MKDIR,
        Op.RMDIR,
        Op.SETSTAT,
        Op.SYMLINK,
        Op.LINK,
    }
)


def journaled(op: Op, ok: bool) -> bool:
    """Whether a request of kind ``op`` that succeeded (``ok``) or failed goes to the journal."""
    return not ok or op in JOURNAL_ALWAYS


def io_failed(op: Op, reason: str) -> str:
    """The message a handle carries to its CLOSE after a READ or WRITE (``op``) failed."""
    return f"{op.value} failed: {reason}"


def close_failed(reason: str) -> str:
    """The message of a CLOSE that failed (NFS reports deferred write errors there)."""
    return f"close failed: {reason}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a CLOSE or RENAME means: an upload state (or None) and the journal's message.

    ``written`` is set on a RENAME of a temporary name: the bytes this session
    wrote under it (the upload's size when it completes).
    """

    upload: UploadState | None = None
    message: str | None = None
    written: int | None = None


PLAIN: Final = Verdict()


class Uploads:
    """One session's upload rules; remembers what it wrote under temporary names.

    The front door calls :meth:`closed` for every CLOSE of a file handle (its
    own, or one the session's end closed: ``ending``) and :meth:`renamed` for
    every RENAME that succeeded, with paths as the journal shows them.
    """

    def __init__(self, temp_patterns: tuple[str, ...]) -> None:
        self.temp_patterns = temp_patterns
        # temporary path -> bytes written by the last clean write handle closed on it
        self._temp_written: dict[str, int] = {}

    def is_temp(self, path: str) -> bool:
        """Whether ``path`` is a temporary name (its upload completes when renamed)."""
        return name_matches(path, self.temp_patterns)

    def closed(
        self,
        path: str,
        *,
        writable: bool,
        written: int,
        io_error: str | None = None,
        close_error: str | None = None,
        ending: bool = False,
        unknown_copy: bool = False,
    ) -> Verdict:
        """A file handle on ``path`` was closed; what it means.

        ``io_error``: the message of a READ or WRITE that failed on it
        (:func:`io_failed`); ``close_error``: why the CLOSE itself failed;
        ``ending``: the session ended with the handle open; ``unknown_copy``:
        a copy-data of unknown length wrote to it.
        """
        message = close_failed(close_error) if close_error is not None else io_error
        if not writable:
            return Verdict(None, message)
        if ending:
            return Verdict(UploadState.INCOMPLETE, ENDED)
        clean = close_error is None and io_error is None
        temp = self.is_temp(path)
        if temp:
            self._temp_written[path] = written if clean else 0
        if not clean:
            return Verdict(None, message)
        if written > 0:
            return Verdict(None, TEMPORARY) if temp else Verdict(UploadState.COMPLETE)
        return Verdict(None, UNKNOWN_COPY if unknown_copy else NOTHING_WRITTEN)

    def renamed(self, old: str, new: str) -> Verdict:
        """``old`` was renamed to ``new`` (the RENAME succeeded); what it means.

        Completes an upload only for a temporary name this session wrote,
        renamed to a final name (see the module's doc).
        """
        if not self.is_temp(old):
            return PLAIN
        written = self._temp_written.pop(old, 0)
        if self.is_temp(new):
            # one temporary name to another: the upload is still on its way
            self._temp_written[new] = written
            return PLAIN
        if written:
            return Verdict(UploadState.COMPLETE, None, written)
        return Verdict(None, NOTHING_UNDER_TEMP, 0)
