"""What a request's fields may hold before anything acts on them: the edge checks. Pure.

A client can put any 32- or 64-bit number in an offset, a length or a size,
and any bytes in a path. The system calls behind a request take less: file
offsets are signed 64-bit (``off_t``), a path is a C string of at most
``PATH_MAX`` bytes with components of at most ``NAME_MAX``. Past those,
Python raises ``OverflowError`` or ``ValueError`` (which would reach the
client as "Failure" and the log as a traceback) or, worse, the write-behind
queue accepts a WRITE it can never write. Each check here returns the words
the client is told, or None when the value is fine; the front door turns
them into an SFTP status (``FX_FAILURE`` for numbers, ``FX_INVALID_FILENAME``
for paths, which a version 3 client receives as ``FX_FAILURE``) and journals
the refusal.
"""

from __future__ import annotations

from typing import Final

# The largest offset a file can hold a byte at (off_t is signed 64-bit).
MAX_OFFSET: Final = 2**63 - 1
# Linux's PATH_MAX counts the terminating NUL: a path has at most 4,095 bytes.
PATH_MAX: Final = 4096
NAME_MAX: Final = 255


def path_problem(path: bytes) -> str | None:
    """Why ``path`` cannot name a file, or None. Pure.

    A NUL would end the path early in the system call (and Python refuses
    it); a path of ``PATH_MAX`` bytes or more, or a component over
    ``NAME_MAX``, is refused by the kernel anyway, here before any work.
    """
    if b"\0" in path:
        return "Invalid filename: the path contains a NUL byte"
    if len(path) >= PATH_MAX:
        return f"Invalid filename: the path is longer than {PATH_MAX - 1} bytes"
    if len(path) > NAME_MAX and any(len(part) > NAME_MAX for part in path.split(b"/")):
        return f"Invalid filename: a name is longer than {NAME_MAX} bytes"
    return None


def range_problem(offset: int, length: int) -> str | None:
    """Why bytes ``[offset, offset + length)`` of a file cannot be written or copied, or None."""
    if offset > MAX_OFFSET:
        return f"Offset out of range (at most {MAX_OFFSET})"
    if offset + length > MAX_OFFSET:  # the kernel refuses a range whose end overflows off_t
        return f"Offset and length out of range (the end is at most {MAX_OFFSET})"
    return None


def size_problem(size: int) -> str | None:
    """Why a file cannot be given size ``size`` (SETSTAT), or None."""
    if size > MAX_OFFSET:
        return f"Size out of range (at most {MAX_OFFSET})"
    return None
