"""The box ffprobe and ffmpeg run in: the uploader's ids, no network, limits, few formats.

A child is set up between fork and exec (:class:`ChildSetup`, a
``preexec_fn``), in this order, each step for a reason:

1. a private network namespace (``unshare(CLONE_NEWNET)``): no socket can
   reach anything, whatever a crafted file makes the demuxer try. It needs
   root, so it comes before the switch; where it is refused (not root, a
   container without the privilege) the reason is logged once and the child
   goes on without it (an unprivileged gateway tries a user namespace first);
2. the uploader's groups, gid and uid, real, effective and saved: the media
   tools read and write only what the uploader could;
3. ``PR_SET_PDEATHSIG``: after the switch, because the kernel clears it when
   the credentials change;
4. ``nice`` and the CPU-time, address-space and file-size limits.

CPython's ``user=``/``group=`` arguments are not used: ``_posixsubprocess``
applies them *before* ``preexec_fn``, and the namespace needs root.

The inputs' side of the box is in the argv (:func:`input_args`): ``file`` is
the only protocol and only the configured containers' demuxers may open the
file, so playlists and other indirections (hls, concat, dash, image2 ...)
never open anything; :func:`sniff` refuses text files (playlists) before a
tool even starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
import resource
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..identity import Identity

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SNIFF_BYTES = 4096
# Bytes that never occur in text: a video container has some in its first
# few KiB (sizes, sync words, GUIDs), a playlist or a list of files has none.
_BINARY = frozenset(range(0x00, 0x09)) | frozenset(range(0x0E, 0x20)) | {0x7F}
# What ffmpeg's playlist and indirection demuxers look for; refused even in a
# file that is not all text.
_TEXT_FORMATS = (b"#EXTM3U", b"#EXT-X-", b"ffconcat", b"<?xml", b"<MPD", b"<smil", b"[playlist]")
_reported: set[str] = set()


@dataclass(frozen=True, slots=True)
class Limits:
    """What one media tool may use; 0 for ``file_size`` forbids writing files at all."""

    cpu_seconds: int
    memory: int
    file_size: int
    nice: int


def cpu_seconds(timeout: float) -> int:
    """CPU time for a run of ``timeout`` wall seconds on every CPU: a backstop, never first.

    The wall-clock timeout is the real limit; this one is the kernel's, for
    a child whose parent no longer watches it (it counts all threads, so it
    is scaled by the CPUs a multi-threaded encoder may keep busy).
    """
    return max(1, math.ceil(timeout)) * max(1, os.cpu_count() or 1)


def input_args(allowed_containers: Iterable[str]) -> list[str]:
    """Input options that keep a demuxer to the file it is given. Pure.

    ``-protocol_whitelist file``: no network, pipe or nested protocol;
    ``-format_whitelist``: only the configured containers' demuxers (ffprobe
    names a demuxer by all its formats, e.g. ``mov,mp4,m4a,3gp,3g2,mj2``, and
    ffmpeg allows it when any of them is listed), so hls, concat and other
    playlist demuxers are refused before they open anything.
    """
    names: list[str] = []
    for entry in allowed_containers:
        for part in entry.split(","):
            part = part.strip().lower()
            if part and part not in names:
                names.append(part)
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(names) or "none"]


def sniff(head: bytes) -> str | None:
    """A reason to refuse a file that starts with ``head``, or None. Pure.

    Refuses empty files, playlists and other text: every allowed container
    is binary in its first bytes. The reason says nothing about the content.
    """
    if not head:
        return "not a readable media file: the file is empty"
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(_TEXT_FORMATS) or not any(b in _BINARY for b in head):
        return "not a readable media file: a text file, not a video"
    return None


class ChildSetup:
    """A ``preexec_fn`` that boxes the child as the module says; :meth:`report` after spawning.

    One instance per spawn. The child tells the parent what it could not do
    through a pipe whose write end closes at exec.
    """

    def __init__(
        self, identity: Identity | None, limits: Limits, *, die_with_parent: bool = True
    ) -> None:
        self.identity = identity
        self.limits = limits
        self.parent = os.getpid()
        self.libc = _libc()
        self.die_with_parent = die_with_parent
        self.root = os.geteuid() == 0
        self._read, self._write = os.pipe2(os.O_CLOEXEC)

    def __call__(self) -> None:
        """Runs in the forked child before exec: only syscalls, no imports, no locks."""
        libc = self.libc
        if libc is not None:
            flags = CLONE_NEWNET if self.root else CLONE_NEWUSER | CLONE_NEWNET
            if libc.unshare(flags) != 0:
                os.write(self._write, b"%d" % ctypes.get_errno())
        ident = self.identity
        if ident is not None:
            os.setgroups(list(ident.groups))
            os.setresgid(ident.gid, ident.gid, ident.gid)
            os.setresuid(ident.uid, ident.uid, ident.uid)
        if self.die_with_parent and libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            # PDEATHSIG covers deaths from now on; had the parent died between
            # fork and prctl, we would have been re-parented already.
            if os.getppid() != self.parent:
                os.kill(os.getpid(), signal.SIGKILL)
        limits = self.limits
        if limits.nice:
            os.nice(limits.nice)
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size, limits.file_size))

    def report(self) -> None:
        """In the parent, once the child exec'd (or failed to): log what the box lacks, once."""
        self.close_child_end()
        try:
            said = os.read(self._read, 64)
        finally:
            self.close()
        if said:
            code = int(said) if said.isdigit() else 0
            _report_once(
                "netns",
                "media tools run WITHOUT a private network namespace: unshare refused (%s)%s",
                os.strerror(code) if code else "no reason given",
                "" if self.root else "; the gateway is not root",
            )

    def close_child_end(self) -> None:
        if self._write >= 0:
            os.close(self._write)
            self._write = -1

    def close(self) -> None:
        """Close both ends (after :meth:`report`, or after a failed spawn)."""
        self.close_child_end()
        if self._read >= 0:
            os.close(self._read)
            self._read = -1


def _report_once(key: str, message: str, *args: Any) -> None:
    if key in _reported:
        log.debug(message, *args)
        return
    _reported.add(key)
    log.warning(message, *args)


@functools.cache
def _libc() -> Any:
    """libc with errno kept, looked up in the parent (after fork only a plain call is safe)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        lib.unshare, lib.prctl  # noqa: B018 - resolved now, not in the child
    except (OSError, AttributeError):
        return None
    return lib
