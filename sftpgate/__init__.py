"""sftpgate: an SFTP gateway that journals what users do and acts on completed uploads."""

from __future__ import annotations

__version__ = "0.1.0"
