"""SFTP's numbers and names: packet types, status codes and their names, flags, extensions. Pure.

The one place an SFTP constant is defined; both front doors and the codec
import them from here. Names follow the draft (``FXP_*``, ``FX_*``,
``FXF_*``, ``ATTR_*``); the extension names are those of OpenSSH's PROTOCOL
file, plus the few asyncssh's client asks for.
"""

from __future__ import annotations

from typing import Final, Literal

# -- packet types -------------------------------------------------------------

FXP_INIT: Final = 1
FXP_VERSION: Final = 2
FXP_OPEN: Final = 3
FXP_CLOSE: Final = 4
FXP_READ: Final = 5
FXP_WRITE: Final = 6
FXP_LSTAT: Final = 7
FXP_FSTAT: Final = 8
FXP_SETSTAT: Final = 9
FXP_FSETSTAT: Final = 10
FXP_OPENDIR: Final = 11
FXP_READDIR: Final = 12
FXP_REMOVE: Final = 13
FXP_MKDIR: Final = 14
FXP_RMDIR: Final = 15
FXP_REALPATH: Final = 16
FXP_STAT: Final = 17
FXP_RENAME: Final = 18
FXP_READLINK: Final = 19
FXP_SYMLINK: Final = 20
FXP_STATUS: Final = 101
FXP_HANDLE: Final = 102
FXP_DATA: Final = 103
FXP_NAME: Final = 104
FXP_ATTRS: Final = 105
FXP_EXTENDED: Final = 200
FXP_EXTENDED_REPLY: Final = 201

# -- status codes (0-8 are v3; the rest are later drafts, named for completeness) ---

FX_OK: Final = 0
FX_EOF: Final = 1
FX_NO_SUCH_FILE: Final = 2
FX_PERMISSION_DENIED: Final = 3
FX_FAILURE: Final = 4
FX_BAD_MESSAGE: Final = 5
FX_NO_CONNECTION: Final = 6
FX_CONNECTION_LOST: Final = 7
FX_OP_UNSUPPORTED: Final = 8

FX_INVALID_HANDLE: Final = 9
FX_NO_SUCH_PATH: Final = 10
FX_FILE_ALREADY_EXISTS: Final = 11
FX_WRITE_PROTECT: Final = 12
FX_NO_SPACE_ON_FILESYSTEM: Final = 14
FX_QUOTA_EXCEEDED: Final = 15
FX_DIR_NOT_EMPTY: Final = 18
FX_NOT_A_DIRECTORY: Final = 19
FX_INVALID_FILENAME: Final = 20
FX_LINK_LOOP: Final = 21
FX_INVALID_PARAMETER: Final = 23
FX_FILE_IS_A_DIRECTORY: Final = 24

# The one table of status names (the journal's ``status`` column, whichever
# front door) and of the text a client is told with each: OpenSSH's
# sftp-server's words for the v3 codes, so both front doors say the same.
# fmt: off
_STATUSES: Final = (
    ("ok", "Success"),
    ("eof", "End of file"),
    ("no_such_file", "No such file"),
    ("permission_denied", "Permission denied"),
    ("failure", "Failure"),
    ("bad_message", "Bad message"),
    ("no_connection", "No connection"),
    ("connection_lost", "Connection lost"),
    ("op_unsupported", "Operation unsupported"),
    ("invalid_handle", "Invalid handle"),
    ("no_such_path", "No such path"),
    ("file_already_exists", "File already exists"),
    ("write_protect", "Write protected"),
    ("no_media", "No media"),
    ("no_space_on_filesystem", "No space left on filesystem"),
    ("quota_exceeded", "Quota exceeded"),
    ("unknown_principal", "Unknown principal"),
    ("lock_conflict", "Lock conflict"),
    ("dir_not_empty", "Directory not empty"),
    ("not_a_directory", "Not a directory"),
    ("invalid_filename", "Invalid filename"),
    ("link_loop", "Too many symbolic links"),
    ("cannot_delete", "Cannot delete"),
    ("invalid_parameter", "Invalid parameter"),
    ("file_is_a_directory", "File is a directory"),
    ("byte_range_lock_conflict", "Byte range lock conflict"),
    ("byte_range_lock_refused", "Byte range lock refused"),
    ("delete_pending", "Delete pending"),
    ("file_corrupt", "File corrupt"),
    ("owner_invalid", "Owner invalid"),
    ("group_invalid", "Group invalid"),
    ("no_matching_byte_range_lock", "No matching byte range lock"),
)
# fmt: on
_STATUS_NAMES: Final = tuple(name for name, _ in _STATUSES)


def status_name(code: int) -> str:
    """The journal's name for an SFTP status code: ``0`` → ``"ok"``, ``2`` → ``"no_such_file"``."""
    if 0 <= code < len(_STATUS_NAMES):
        return _STATUS_NAMES[code]
    return f"status_{code}"


def status_text(code: int) -> str:
    """What a client is told with status ``code`` when nothing more specific is safe to say."""
    if 0 <= code < len(_STATUSES):
        return _STATUSES[code][1]
    return "Unknown error"


# -- attribute flags and open flags ---------------------------------------------

ATTR_SIZE: Final = 0x00000001
ATTR_UIDGID: Final = 0x00000002
ATTR_PERMISSIONS: Final = 0x00000004
ATTR_ACMODTIME: Final = 0x00000008
ATTR_EXTENDED: Final = 0x80000000

FXF_READ: Final = 0x01
FXF_WRITE: Final = 0x02
FXF_APPEND: Final = 0x04
FXF_CREAT: Final = 0x08
FXF_TRUNC: Final = 0x10
FXF_EXCL: Final = 0x20

# -- extended requests OpenSSH's sftp-server answers --------------------------------

EXT_POSIX_RENAME: Final = "posix-rename@openssh.com"
EXT_HARDLINK: Final = "hardlink@openssh.com"
EXT_FSYNC: Final = "fsync@openssh.com"
EXT_STATVFS: Final = "statvfs@openssh.com"
EXT_FSTATVFS: Final = "fstatvfs@openssh.com"
EXT_LSETSTAT: Final = "lsetstat@openssh.com"
EXT_LIMITS: Final = "limits@openssh.com"
EXT_EXPAND_PATH: Final = "expand-path@openssh.com"
EXT_COPY_DATA: Final = "copy-data"
EXT_HOME_DIRECTORY: Final = "home-directory"
EXT_USERS_GROUPS_BY_ID: Final = "users-groups-by-id@openssh.com"
# in VERSION only, or asyncssh's own
EXT_NEWLINE: Final = "newline"
EXT_VENDOR_ID: Final = "vendor-id"
EXT_RANGES: Final = "ranges@asyncssh.com"

# OpenSSH's SFTP_MAX_MSG_LENGTH is 256 KiB; a little slack for other clients' headers.
MAX_PACKET: Final = 256 * 1024 + 1024
# Largest READ answered and WRITE taken (limits@openssh.com), as sftp-server's
# SFTP_MAX_READ_LENGTH: a longer READ gets this much, as the protocol allows.
MAX_IO: Final = 256 * 1024

Direction = Literal["client", "server"]
