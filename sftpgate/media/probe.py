"""Run ffprobe on one file (a path, or a descriptor opened for us) and return its JSON report."""

from __future__ import annotations

import json
import logging
import re
import resource
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..identity import Identity
from . import MediaError
from .sandbox import ChildSetup, Limits, cpu_seconds, input_args

log = logging.getLogger(__name__)

# ffmpeg's log context, e.g. "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x5601fcb141c0] ".
_LOG_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")
# ffprobe's errors that say something about the upload alone; any other is
# replaced by a generic reason, so that no message can tell the uploader
# anything about other files (a name, whether one exists).
_SAFE_ERRORS = (
    "Invalid data found when processing input",
    "End of file",
)
GENERIC = "not an allowed video format"
NO_MEMORY_LIMIT = resource.RLIM_INFINITY


def file_url(path: Path) -> str:
    """``file:`` + absolute path: ffmpeg then never reads the name as an option or protocol.

    A relative name like ``-x.mp4`` or ``http:foo.mp4`` would otherwise be an
    option or a URL; with the ``file:`` prefix it can only be a local file.
    """
    return "file:" + str(path.absolute())


def fd_path(fd: int) -> Path:
    """The path through which a child that inherited ``fd`` opens that very file."""
    return Path(f"/proc/self/fd/{fd}")


def probe(
    source: Path | int,
    ffprobe: str = "ffprobe",
    timeout: float = 60,
    *,
    containers: Sequence[str] | None = None,
    identity: Identity | None = None,
    nice: int = 0,
    memory_limit: int = NO_MEMORY_LIMIT,
) -> dict[str, Any]:
    """Return ffprobe's ``-show_format -show_streams`` report of ``source`` as a dict.

    ``source`` is a path or an open descriptor (handed to ffprobe, which
    reads that file and no other). With ``containers`` only their demuxers
    may read it and ``file`` is the only protocol (see ``sandbox.input_args``).
    ffprobe runs boxed (``sandbox.ChildSetup``): as ``identity`` when given,
    without network where possible, niced, with CPU time bound to
    ``timeout``, ``memory_limit`` bytes of address space and no file writes.
    Blocking: callers run it in a thread, never one acting as a user.

    Raises:
        MediaError: ffprobe cannot read the file or takes longer than
            ``timeout`` seconds. The reason is one of a few fixed phrases,
            never ffprobe's own words about other files.
        OSError: the ffprobe program itself cannot be started.
    """
    fds: tuple[int, ...] = ()
    if isinstance(source, int):
        fds = (source,)
        source = fd_path(source)
    url = file_url(source)
    args = [ffprobe, "-v", "error"]
    if containers is not None:
        args += input_args(containers)
    args += ["-show_format", "-show_streams", "-of", "json", url]
    # Not ffmpeg.probe(): ffmpeg-python 0.2 offers no timeout there, and a
    # crafted file can keep ffprobe busy for a very long time.
    # subprocess.run kills the child when the timeout expires.
    setup = ChildSetup(identity, Limits(cpu_seconds(timeout), memory_limit, 0, nice))
    try:
        with subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds,
            preexec_fn=setup,  # only syscalls: see sandbox.ChildSetup
        ) as proc:
            setup.report()
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise MediaError(
                    f"not a readable media file: ffprobe timed out after {timeout:.0f} s"
                ) from None
    finally:
        setup.close()
    if proc.returncode != 0:
        raise MediaError(f"not a readable media file: {_first_error(stderr, url)}")
    try:
        data = json.loads(stdout.decode("utf-8", errors="replace"))
    except ValueError:
        raise MediaError("not a readable media file: ffprobe printed no report") from None
    if not isinstance(data, dict):
        raise MediaError("not a readable media file: ffprobe printed no report")
    return data


def _first_error(stderr: bytes, url: str) -> str:
    """ffprobe's first error line when it is a known phrase about the file; else a generic one."""
    for line in stderr.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            # For the admin's eyes only: it may name other files.
            log.info("ffprobe: %s", line)
            # Without the log context and our absolute path: the uploader
            # knows the file by its own name.
            said = _LOG_CONTEXT.sub("", line).removeprefix(url + ": ").removeprefix(url)
            return said if said in _SAFE_ERRORS else GENERIC
    return GENERIC
