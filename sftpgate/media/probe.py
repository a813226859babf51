"""Run ffprobe on one file and return its JSON report."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from . import MediaError

# ffmpeg's log context, e.g. "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x5601fcb141c0] ".
_LOG_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")


def file_url(path: Path) -> str:
    """``file:`` + absolute path: ffmpeg then never reads the name as an option or protocol.

    A relative name like ``-x.mp4`` or ``http:foo.mp4`` would otherwise be an
    option or a URL; with the ``file:`` prefix it can only be a local file.
    """
    return "file:" + str(path.absolute())


def probe(path: Path, ffprobe: str = "ffprobe", timeout: float = 60) -> dict[str, Any]:
    """Return ffprobe's ``-show_format -show_streams`` report of ``path`` as a dict.

    Blocking: callers run it in a thread.

    Raises:
        MediaError: ffprobe cannot read the file (the reason quotes ffprobe's
            first error line) or takes longer than ``timeout`` seconds.
        OSError: the ffprobe program itself cannot be started.
    """
    url = file_url(path)
    args = [ffprobe, "-v", "error", "-show_format", "-show_streams", "-of", "json", url]
    # Not ffmpeg.probe(): ffmpeg-python 0.2 offers no timeout there, and a
    # crafted file can keep ffprobe busy for a very long time.
    # subprocess.run kills the child when the timeout expires.
    try:
        done = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise MediaError(
            f"not a readable media file: ffprobe timed out after {timeout:.0f} s"
        ) from None
    if done.returncode != 0:
        raise MediaError(f"not a readable media file: {_first_error(done.stderr, url)}")
    try:
        data = json.loads(done.stdout.decode("utf-8", errors="replace"))
    except ValueError:
        raise MediaError("not a readable media file: ffprobe printed no report") from None
    if not isinstance(data, dict):
        raise MediaError("not a readable media file: ffprobe printed no report")
    return data


def _first_error(stderr: bytes, url: str) -> str:
    """ffprobe's first non-empty error line, without our absolute path in front."""
    for line in stderr.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            # Without the log context and our absolute path: the uploader
            # knows the file by its own name.
            return _LOG_CONTEXT.sub("", line).removeprefix(url + ": ").removeprefix(url)
    return "ffprobe failed without saying why"
