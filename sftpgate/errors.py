"""The one exception tree of sftpgate.

Each subclass is translated in exactly one place: to an SFTP status in
``sftp.errors``, to an exit code in ``cli.main`` (its ``exit_code``: commands
raise, they never print an error and return a number themselves).
"""

from __future__ import annotations


class SftpgateError(Exception):
    """Root of every error sftpgate raises on purpose."""

    exit_code = 1


class ConfigError(SftpgateError):
    """The configuration is invalid; the message names the file and the key."""

    exit_code = 2


class UsageError(SftpgateError):
    """A command was given options or values it cannot use."""

    exit_code = 2


class NothingThere(SftpgateError):
    """What a command was asked to read does not exist (a journal not made yet)."""


class JailError(SftpgateError):
    """A path would leave the user's home (``..``, absolute, or through a symlink)."""


class NotFoundError(SftpgateError):
    """A record asked for by id does not exist."""
