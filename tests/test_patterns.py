"""File-name patterns: the last component, ignoring case, compiled once per pattern set."""

from __future__ import annotations

import pytest

from sftpgate.patterns import name_matches

TEMP = ("*.filepart", "*.part", "*.tmp")


@pytest.mark.parametrize(
    ("path", "patterns", "expected"),
    [
        ("/up/clip.mp4.filepart", TEMP, True),
        ("/up/CLIP.MP4.FILEPART", TEMP, True),
        ("/up/clip.mp4", TEMP, False),
        ("/dir.tmp/clip.mp4", TEMP, False),  # only the file's own name counts
        ("/a name\nwith newline.tmp", TEMP, True),
        ("/-leading-dash.part", TEMP, True),
        ("/.hidden.swp", (".*.sw?",), True),
        ("/[x].mp4", ("[[]x].mp4",), True),
        ("/clip.mp4", (), False),
        ("/clip.mp4", ["*.MP4"], True),  # any iterable; patterns ignore case too
    ],
)
def test_name_matches(path: str, patterns: tuple[str, ...], expected: bool) -> None:
    assert name_matches(path, patterns) is expected
