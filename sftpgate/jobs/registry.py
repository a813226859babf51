"""Who runs jobs: worker ids, lease owners, and proof that a local process is (still) itself.

A worker process registers a row in the ``workers`` table (journal/store.py
``WORKERS_TABLE``) under an id that is never reused (``node:pid:random``), and
heartbeats it. Each of its slots leases jobs as ``<worker id>/<slot>``: since
the id is unique to one process's life and a slot runs one job at a time, the
lease owner is also the lease's fencing token. Every step that commits outputs
checks it, so a worker that was stalled (or cut off on another host) while its
lease expired and someone else took the job can never finish that job.

A process is named by its pid *and* its start time (``/proc/<pid>/stat``
field 22, in clock ticks since boot) *and* the boot and pid namespace it
started in (``/proc/sys/kernel/random/boot_id``, ``/proc/self/ns/pid``): a
recycled pid never matches. Linux only.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True, slots=True)
class Stamp:
    """One process, for ever: where it ran, in which boot, with which pid, started when."""

    node: str
    boot: str
    pid: int
    start: int  # clock ticks after boot

    def encode(self) -> str:
        return f"{self.node}|{self.boot}|{self.pid}|{self.start}"

    @classmethod
    def decode(cls, text: str) -> Stamp | None:
        """The stamp ``encode`` wrote, or None for anything else (an older row's marker)."""
        parts = text.split("|")
        if len(parts) != 4 or not parts[2].isdigit() or not parts[3].isdigit():
            return None
        return cls(parts[0], parts[1], int(parts[2]), int(parts[3]))

    def here(self, node: str) -> bool:
        """Whether this process ran on this host, in this boot (so /proc can tell of it)."""
        return self.node == node and self.boot == boot_id()


def boot_id() -> str:
    """This boot and this pid namespace: only there do /proc's pids name the same processes.

    Two containers with one host name (``--uts=host``) but their own pid
    namespaces thus never take each other's workers for dead.
    """
    try:
        boot = _BOOT_ID.read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def start_ticks(pid: int) -> int | None:
    """Process ``pid``'s start time in clock ticks after boot, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ')': fields follow its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def stamp(pid: int, node: str) -> Stamp | None:
    """The stamp of the running process ``pid`` on this host, or None if it is gone."""
    start = start_ticks(pid)
    return None if start is None else Stamp(node, boot_id(), pid, start)


def alive(process: Stamp) -> bool:
    """Whether ``process`` (on this host, this boot) is still running; a reused pid is not it.

    Only meaningful when ``process.here(node)``; a zombie (exited, not reaped) counts as gone.
    """
    if process.boot != boot_id():
        return False
    if start_ticks(process.pid) != process.start:
        return False
    try:
        state = Path(f"/proc/{process.pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2 :].split()[:1] != ["Z"]


def dead(process: Stamp, node: str) -> bool:
    """Whether ``process`` is proven gone: of this node and an earlier boot, or of this
    boot and pid namespace and no longer running. Of another node or pid namespace: False
    (nothing here can tell)."""
    if process.node != node:
        return False
    here = boot_id()
    if process.boot == here:
        return not alive(process)
    return process.boot.partition("/")[0] != here.partition("/")[0]


def new_worker_id(node: str) -> str:
    """An id no other worker process, here or elsewhere, has had or will have."""
    return f"{node}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_of(worker_id: str, slot: int | str) -> str:
    return f"{worker_id}/{slot}"


def worker_of(owner: str) -> str:
    """The worker id in a lease owner ``<worker id>/<slot>`` (the owner itself if no slot)."""
    return owner.rpartition("/")[0] or owner
