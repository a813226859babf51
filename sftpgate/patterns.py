"""File-name patterns (``*.mp4``, ``*.filepart``): case-insensitive, on the last component.

Pure; shared by the front doors (is this a temporary upload name?) and the
rules (is this upload a video candidate?).
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterable


def name_matches(path: str, patterns: Iterable[str]) -> bool:
    """True if the file name of ``path`` matches any pattern, ignoring case."""
    name = posixpath.basename(path).lower()
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns)
