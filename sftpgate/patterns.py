"""File-name patterns (``*.mp4``, ``*.filepart``): case-insensitive, on the last component.

Pure; shared by the front doors (is this a temporary upload name?) and the
rules (is this upload a video candidate?).
"""

from __future__ import annotations

import fnmatch
import functools
import posixpath
import re
from collections.abc import Callable, Iterable


def name_matches(path: str, patterns: Iterable[str]) -> bool:
    """True if the file name of ``path`` matches any pattern, ignoring case."""
    return bool(_matcher(tuple(patterns))(posixpath.basename(path).lower()))


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled regex for a set of patterns (asked at every close and rename)."""
    if not patterns:
        return lambda name: False
    either = "|".join(f"(?:{fnmatch.translate(pattern.lower())})" for pattern in patterns)
    return re.compile(either).match
