"""The one policy (what a CLOSE, a RENAME or a session's end means) and the one error
translation, without sockets: both front doors call these."""

from __future__ import annotations

import errno
import sqlite3

from sftpgate.errors import JailError
from sftpgate.events import Op, UploadState
from sftpgate.sftp import policy
from sftpgate.sftp.constants import FX_FAILURE, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED
from sftpgate.sftp.errors import status_of

TEMP = ("*.filepart", "*.part", "*.tmp")


def test_a_clean_close_of_written_bytes_completes_an_upload() -> None:
    verdict = policy.Uploads(TEMP).closed("/a.mp4", writable=True, written=5)
    assert verdict == policy.Verdict(UploadState.COMPLETE, None)


def test_a_close_with_nothing_written_or_a_failed_write_is_no_upload() -> None:
    uploads = policy.Uploads(TEMP)
    assert uploads.closed("/a.mp4", writable=True, written=0).message == policy.NOTHING_WRITTEN
    failed = uploads.closed("/a.mp4", writable=True, written=9, io_error="write failed: Failure")
    assert failed == policy.Verdict(None, "write failed: Failure")
    closing = uploads.closed("/a.mp4", writable=True, written=9, close_error="Failure")
    assert closing == policy.Verdict(None, "close failed: Failure")


def test_a_session_that_ends_with_a_write_handle_open_leaves_an_incomplete_upload() -> None:
    verdict = policy.Uploads(TEMP).closed("/a.mp4", writable=True, written=9, ending=True)
    assert verdict == policy.Verdict(UploadState.INCOMPLETE, policy.ENDED)


def test_a_temporary_name_completes_at_its_rename_with_the_bytes_this_session_wrote() -> None:
    uploads = policy.Uploads(TEMP)
    assert uploads.closed("/a.mp4.part", writable=True, written=7).message == policy.TEMPORARY
    assert uploads.renamed("/a.mp4.part", "/b.mp4.tmp") == policy.PLAIN  # still on its way
    assert uploads.renamed("/b.mp4.tmp", "/a.mp4") == policy.Verdict(UploadState.COMPLETE, None, 7)
    # Once: renaming it back and forth starts nothing more.
    assert uploads.renamed("/a.mp4", "/c.mp4") == policy.PLAIN


def test_renaming_a_temporary_name_this_session_never_wrote_is_not_an_upload() -> None:
    uploads = policy.Uploads(TEMP)
    assert uploads.renamed("/stale.mp4.part", "/stale.mp4") == policy.Verdict(
        None, policy.NOTHING_UNDER_TEMP, 0
    )
    uploads.closed("/cut.mp4.part", writable=True, written=9, io_error="write failed: Failure")
    assert uploads.renamed("/cut.mp4.part", "/cut.mp4").upload is None


def test_changes_are_journaled_always_and_lookups_only_when_they_fail() -> None:
    for op in (Op.OPEN, Op.CLOSE, Op.RENAME, Op.REMOVE, Op.MKDIR, Op.SETSTAT, Op.LIST):
        assert policy.journaled(op, True) and policy.journaled(op, False)
    for op in (Op.READ, Op.WRITE, Op.STAT, Op.REALPATH, Op.READLINK, Op.STATVFS, Op.FSYNC):
        assert not policy.journaled(op, True) and policy.journaled(op, False)


def test_os_errors_are_told_in_sftp_servers_words() -> None:
    status = status_of(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert (status.code, status.name, status.message) == (
        FX_NO_SUCH_FILE,
        "no_such_file",
        "No such file",
    )
    eio = status_of(OSError(errno.EIO, "Input/output error"))
    assert (eio.name, eio.message) == ("failure", "Input/output error")


def test_our_errors_have_their_status_and_internal_ones_tell_the_client_nothing() -> None:
    jail = status_of(JailError("path leads outside the home"))
    assert (jail.code, jail.message) == (
        FX_PERMISSION_DENIED,
        "Permission denied: path leads outside the home",
    )
    internal = status_of(sqlite3.OperationalError("database is locked"))
    assert (internal.code, internal.name, internal.message) == (FX_FAILURE, "failure", "Failure")
    assert internal.detail == "internal error: OperationalError: database is locked"
    assert internal.journal_message == internal.detail
