"""The pipeline's file work in a user's home: descriptors only, never a path a user can swap.

Every function here is blocking and is meant to run *as the uploader*
(``identity.call_as`` in a worker thread), beneath the home
(``beneath.Home``): the kernel then refuses what the user could not do, and
what is made belongs to the user because the user made it.

- The upload is opened once per step, without following a link, and must be
  a regular file with the inode the job recorded (:func:`open_upload`).
- The output folder is opened (made if missing) once, without following a
  link as its last component (:func:`open_output_folder`); every output is
  created in it with ``O_CREAT|O_EXCL|O_NOFOLLOW`` under a temporary name
  (:func:`create_temp`) and renamed to its final name on the same
  descriptor without replacing anything (:func:`place`). Swapping the folder
  for a link afterwards changes nothing: the descriptor is the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from ..beneath import Home, rename_noreplace, virtual
from ..errors import JailError, SftpgateError

UPLOAD_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
OUTPUT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
REPLACED = "the upload was replaced or removed after it was closed"
# What an open of the upload raises when its name no longer leads to a
# regular file the user may read: none of them goes away by retrying.
_GONE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.EACCES, errno.EPERM)


class Refused(SftpgateError):
    """The files are not what the job may act on; retrying will not help."""


def open_upload(home: Home, path: str, expect: tuple[int, int] | None) -> tuple[int, int, int]:
    """Open the upload at virtual ``path``; return (fd, st_dev, st_ino).

    Not through a link, beneath the home; a FIFO or device does not block
    the open (``O_NONBLOCK``) and is refused like anything but a regular
    file; with ``expect`` = (device, inode), another file is refused.

    Raises:
        Refused: the name leads nowhere, out of the home, to a link, to
            something not a regular file, or to another file than ``expect``.
        OSError: any other failure (worth a retry).
    """
    try:
        fd = home.open(virtual(os.fsencode(path)), UPLOAD_FLAGS)
    except JailError:
        raise Refused(REPLACED) from None
    except OSError as exc:
        if exc.errno in _GONE:
            raise Refused(REPLACED) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (expect is not None and (st.st_dev, st.st_ino) != expect):
        os.close(fd)
        raise Refused(REPLACED)
    return fd, st.st_dev, st.st_ino


def open_output_folder(home: Home, folder: str, mode: int = 0o755) -> int:
    """Open (making what is missing, with ``mode``) the output folder, virtual ``folder``.

    Folders on the way may be links inside the home; the folder itself must
    be a real folder, not a link. Returns a descriptor (O_RDONLY|O_DIRECTORY).

    Raises:
        Refused: the folder (or a folder on the way) is a link out of the
            home, a link, or not a folder.
        OSError: any other failure.
    """
    parts = [p for p in folder.split("/") if p]
    path = b""
    fd = -1
    try:
        for index, part in enumerate(parts):
            path += b"/" + os.fsencode(part)
            last = index == len(parts) - 1
            flags = FOLDER_FLAGS | (os.O_NOFOLLOW if last else 0)
            try:
                fd = home.open(path, flags)
            except FileNotFoundError:
                # Made meanwhile (FileExistsError): the open below decides what it is.
                made = False
                with home.parent(path) as parent, contextlib.suppress(FileExistsError):
                    os.mkdir(parent.name, mode, dir_fd=parent.fd)
                    made = True
                fd = home.open(path, flags)
                if made:  # the process umask (systemd's 0077) must not decide it
                    os.fchmod(fd, mode | (os.fstat(fd).st_mode & stat.S_ISGID))
            if not last:
                os.close(fd)
                fd = -1
    except JailError:
        raise Refused(f"the output folder /{folder} leads outside the home") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise Refused(f"the output folder /{folder} is a link or not a folder") from None
        raise
    return fd


def taken(folder_fd: int, name: str) -> bool:
    """Whether ``name`` exists in the folder (a link, even a dangling one, counts)."""
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def create_temp(folder_fd: int, name: str, mode: int = 0o644) -> int:
    """Create ``name`` in the folder for writing with ``mode``; return its descriptor.

    ``O_CREAT|O_EXCL|O_NOFOLLOW``: never an existing file, never through a
    link. ``name`` is one of the job's own temporary names; whatever holds
    it (a leftover of an earlier attempt, or a link someone planted) is
    removed first: ``unlink`` removes a link, never what it points to.

    Raises:
        Refused: the name cannot be freed (a folder holds it) or was taken
            again at once.
        OSError: any other failure.
    """
    try:
        return _created(os.open(name, OUTPUT_FLAGS, mode, dir_fd=folder_fd), mode)
    except FileExistsError:
        pass
    try:
        os.unlink(name, dir_fd=folder_fd)
        return _created(os.open(name, OUTPUT_FLAGS, mode, dir_fd=folder_fd), mode)
    except FileNotFoundError:
        raise Refused(f"cannot create {name}: the name keeps changing") from None
    except (FileExistsError, IsADirectoryError, PermissionError) as exc:
        raise Refused(f"cannot create {name}: {exc.strerror}") from None


def _created(fd: int, mode: int) -> int:
    """``fd`` with ``mode`` set exactly: the process umask (systemd's 0077) must not decide it."""
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_output(folder_fd: int, name: str) -> int:
    """Open an output in the folder for reading: not through a link, a regular file only.

    Raises:
        Refused: it is missing, a link or not a regular file.
    """
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=folder_fd)
    except OSError as exc:
        raise Refused(f"cannot read {name}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"cannot read {name}: not a regular file")
    return fd


def read_output(folder_fd: int, name: str, limit: int) -> bytes:
    """The first ``limit`` bytes of an output (see :func:`open_output`)."""
    fd = open_output(folder_fd, name)
    try:
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def place(
    folder_fd: int, moves: Sequence[tuple[str, str]], ours: Mapping[str, Sequence[Any]]
) -> None:
    """Rename each (temporary, final) name in the folder, never replacing a file not ours.

    ``ours`` maps a final name to the [device, inode] pairs this job put
    there in earlier attempts (a crash between two renames leaves some
    placed): only such a file is replaced.

    Raises:
        Refused: a final name holds something else (made while the job ran).
        OSError: any other failure.
    """
    for tmp, final in moves:
        try:
            rename_noreplace(folder_fd, os.fsencode(tmp), folder_fd, os.fsencode(final))
            continue
        except FileExistsError:
            pass
        st = os.stat(final, dir_fd=folder_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or [st.st_dev, st.st_ino] not in [
            list(pair) for pair in ours.get(final, ())
        ]:
            raise Refused(f"{final} appeared in the output folder while the job ran; left alone")
        os.rename(tmp, final, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
