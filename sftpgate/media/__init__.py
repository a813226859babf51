"""Media pipeline pieces: probe, facts, validate, plan, run, FLV metadata, sidecar.

Each step is its own small module; the pure ones (``facts``, ``validate``,
``plan``, ``flv``, ``sidecar.build_sidecar``) are tested without processes.
Import from the modules themselves, e.g. ``from sftpgate.media.probe import probe``.
"""

from __future__ import annotations

from ..errors import SftpgateError


class MediaError(SftpgateError):
    """A media step failed for a reason worth telling the uploader.

    ``reason`` is short, human and free of tracebacks, e.g.
    ``"not a readable media file: Invalid data found when processing input"``.

    ``transient`` is True when trying again may help (ffmpeg killed by a
    signal it did not bring on itself); a timeout or an error exit of ffmpeg
    on the same input would only repeat.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
