"""Run one planned ffmpeg command: low priority, limited, killable, with progress."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import signal
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import MediaError

log = logging.getLogger(__name__)

STDERR_LINES = 20  # kept for the error message
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# ffmpeg 5 prints out_time_ms in microseconds too (a long-standing bug), so
# both keys are read the same way.
_TIME_KEYS = ("out_time_us=", "out_time_ms=")


async def run_ffmpeg(
    argv: list[str],
    *,
    timeout: float,
    nice: int,
    memory_limit: int,
    duration: float | None,
    on_progress: Callable[[float], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> None:
    """Run ``argv`` (as built by ``plan_convert``) and return when ffmpeg succeeded.

    ffmpeg runs in its own process group (pgid == pid), niced by ``nice``,
    with its address space limited to ``memory_limit`` bytes, and is killed by
    the kernel should this process die. ``on_start(pid)`` is called right
    after the spawn (to record the pid for ``kill_leftover``);
    ``on_progress(fraction)`` with 0..1 as ``-progress pipe:1`` reports come
    in, when ``duration`` is known, and with 1.0 at the end. A callback that
    raises is logged and otherwise ignored.

    Raises:
        MediaError: ffmpeg ran longer than ``timeout`` seconds (its process
            group is killed first) or exited unsuccessfully (the reason holds
            its last stderr lines).
        asyncio.CancelledError: re-raised after killing the process group.
        OSError: ffmpeg cannot be started.
    """
    prctl = _libc_prctl()  # looked up here: after fork only a plain call is safe
    limit = functools.partial(_limit_child, nice, memory_limit, os.getpid(), prctl)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=limit,
    )
    if on_start is not None:
        _notify(on_start, proc.pid)
    assert proc.stdout is not None and proc.stderr is not None
    tail: deque[str] = deque(maxlen=STDERR_LINES)
    readers = [
        asyncio.create_task(_read_progress(proc.stdout, duration, on_progress)),
        asyncio.create_task(_read_tail(proc.stderr, tail)),
    ]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*readers)
            returncode = await proc.wait()
    except TimeoutError:
        await _kill_group(proc)
        raise MediaError(f"ffmpeg timed out after {timeout:.0f} s") from None
    except BaseException:  # cancelled, or a reader failed: never leave ffmpeg behind
        await _kill_group(proc)
        raise
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    if returncode != 0:
        raise MediaError(_failure(returncode, tail))


def kill_leftover(pid: int, marker: str) -> bool:
    """Kill the process group of ``pid`` if that process's command line contains ``marker``.

    For start-up after a crash: ``pid`` was recorded by ``on_start`` and
    ``marker`` is something only that command has (an output path). Checking
    the command line guards against a recycled pid. Returns True when a
    signal was sent, False when there is no such process or it is someone
    else's (or ``marker`` is empty, or ``pid`` is ourselves or init). Linux only.
    """
    if not marker or pid <= 1 or pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if os.fsencode(marker) not in cmdline:
        return False
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)  # ffmpeg leads its own group
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _limit_child(nice: int, memory_limit: int, parent: int, prctl: Any) -> None:
    """Runs in the forked child before exec: only syscalls, no imports, no locks.

    preexec_fn is documented as unsafe with threads because the child could
    need a lock some other thread held at fork time; this function takes
    none (prctl was looked up in the parent). PDEATHSIG fires when the
    *thread* that forked exits: here the event loop's thread, which lives as
    long as the gateway does.
    """
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # PDEATHSIG covers deaths from now on; had the parent died between
        # fork and prctl, we would have been re-parented already.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    if nice:
        os.nice(nice)
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))


@functools.cache
def _libc_prctl() -> Any:
    """libc's prctl, or None where there is none (not Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


async def _read_progress(
    stream: asyncio.StreamReader,
    duration: float | None,
    on_progress: Callable[[float], None] | None,
) -> None:
    last = -1.0
    async for raw in stream:
        if on_progress is None:
            continue
        line = raw.decode("ascii", errors="replace").strip()
        fraction = None
        if line == "progress=end":
            fraction = 1.0
        elif duration and line.startswith(_TIME_KEYS):
            micros = line.partition("=")[2]
            if micros.lstrip("-").isdigit():  # "N/A" before the first frame
                fraction = min(1.0, max(0.0, int(micros) / 1e6 / duration))
        if fraction is not None and fraction != last:  # each report has both keys
            last = fraction
            _notify(on_progress, fraction)


async def _read_tail(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    async for raw in stream:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if line:
            tail.append(line)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _failure(returncode: int, tail: deque[str]) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        head = f"ffmpeg was killed by {name}"
    else:
        head = f"ffmpeg failed (exit status {returncode})"
    return (f"{head}: " + "\n".join(tail)) if tail else head


def _notify(callback: Callable[[Any], None], value: Any) -> None:
    try:
        callback(value)
    except Exception:
        log.exception("ffmpeg %s callback failed", getattr(callback, "__name__", "a"))
