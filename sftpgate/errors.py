"""The one exception tree of sftpgate.

Each subclass is translated in exactly one place: to an SFTP status in
``frontdoor.sftp``, to an exit code in ``cli.main``.
"""

from __future__ import annotations


class SftpgateError(Exception):
    """Root of every error sftpgate raises on purpose."""

    exit_code = 1


class ConfigError(SftpgateError):
    """The configuration is invalid; the message names the file and the key."""

    exit_code = 2


class JailError(SftpgateError):
    """A path would leave the user's home (``..``, absolute, or through a symlink)."""


class NotFoundError(SftpgateError):
    """A record asked for by id does not exist."""
