"""Run one planned ffmpeg command: low priority, limited, killable, with progress."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..identity import Identity
from . import MediaError
from .sandbox import ChildSetup, Limits, cpu_seconds

log = logging.getLogger(__name__)

STDERR_LINES = 20  # kept for the error message
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
    identity: Identity | None = None,
    file_size_limit: int = resource.RLIM_INFINITY,
    pass_fds: Sequence[int] = (),
    marker: str | None = None,
) -> None:
    """Run ``argv`` (as built by ``plan_convert``) and return when ffmpeg succeeded.

    ffmpeg runs in its own process group (pgid == pid), boxed by
    ``sandbox.ChildSetup``: as ``identity`` when given (uid, gid and groups),
    in a private network namespace where the platform allows, niced by
    ``nice``, with its address space limited to ``memory_limit`` bytes, each
    file it writes to ``file_size_limit`` bytes, its CPU time to what
    ``timeout`` allows, and killed by the kernel should this process die.
    ``pass_fds`` stay open in it (its input and outputs, named in ``argv``
    as ``/proc/self/fd/N``). ``on_start(pid)`` is called right after the
    spawn (to record the pid for ``kill_leftover``); ``on_progress(fraction)``
    with 0..1 as ``-progress pipe:1`` reports come in, when ``duration`` is
    known, and with 1.0 at the end. ``marker``, when given, is ffmpeg's
    ``argv[0]`` (what ``ps`` and ``/proc/PID/cmdline`` show) so that
    ``kill_leftover`` can tell it from anything else. A callback that raises is logged and
    otherwise ignored. Call it from a thread that acts as nobody else (the
    event loop's): the child starts with that thread's credentials.

    Raises:
        MediaError: ffmpeg ran longer than ``timeout`` seconds (its process
            group is killed first) or exited unsuccessfully (the reason holds
            its last stderr lines); ``transient`` only when a signal killed it.
        asyncio.CancelledError: re-raised after killing the process group.
        OSError: ffmpeg cannot be started.
    """
    limits = Limits(cpu_seconds(timeout), memory_limit, file_size_limit, nice)
    setup = ChildSetup(identity, limits)
    try:
        proc = await asyncio.create_subprocess_exec(
            *([marker, *argv[1:]] if marker else argv),
            executable=argv[0],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            preexec_fn=setup,
        )
        setup.report()
    finally:
        setup.close()
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
        # Killed by a signal we did not send (the OOM killer, an admin): may pass.
        # An error exit is ffmpeg's verdict on this input: it would say it again.
        raise MediaError(_failure(returncode, tail), transient=returncode < 0)


def kill_leftover(pid: int, marker: str, start: int | None = None) -> bool:
    """Kill the process group of ``pid`` if that process's command line contains ``marker``.

    For taking over a job whose worker died or stalled: ``pid`` was recorded
    by ``on_start`` and ``marker`` is something only that command has
    (``run_ffmpeg``'s ``marker``, its argv[0]). ``start``, when given, is
    the process's start time (``/proc/<pid>/stat`` field 22, as
    ``jobs.registry.start_ticks`` read it when it started): a recycled pid
    never has the same, and the command line guards as well. Returns True when a
    signal was sent, False when there is no such process or it is someone
    else's (or ``marker`` is empty, or ``pid`` is ourselves or init). Linux only.
    """
    if not marker or pid <= 1 or pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if os.fsencode(marker) not in cmdline:
        return False
    if start is not None:
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 20 or fields[19] != str(start):
            return False
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)  # ffmpeg leads its own group
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


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
