"""When a filesystem call may run on the event loop instead of the thread pool.

A trip to the thread pool costs two thread wake-ups (the worker's, then the
loop's); on a VM each is an inter-processor interrupt. For a small-file upload
that was most of the time: the create and the close each made one trip, and
running them inline made 2,000 4 KiB uploads ~25% faster (A/B on this VM).

So on a home wholly on local disks (see :mod:`.mounts`; NFS, FUSE and unknown
filesystems never), calls that normally take microseconds run inline:
read-only metadata calls, and quick changes (create, mkdir, rmdir, symlink,
link, and the writes and close of a file of at most :data:`SMALL_WRITE`).
Everything else uses the pool: reads, listings and fsync wait for the disk;
remove, rename and setstat can free a big file's blocks (an unlink, a rename
over it, a truncation), which takes ext4 a long time; the writes of a bigger
file copy a lot, and closing one that was truncated makes ext4 start writing
it out. In a thread those overlap with the loop's own work.

A local disk can still be slow: ext4 makes a create wait for its journal, and
a write can be throttled while much dirty data waits for the disk. The guard
times every inline call; one that took longer than :data:`SLOW` and slept in
the kernel on the way (a voluntary context switch: it waited for something)
turns inline calls off for the whole gateway for a while, and says so in the
log. A call that was only slow because another process had the CPU does not
count: on a busy machine that happens every few seconds, and the pool would
not help.

The while starts at :data:`FIRST_COOLDOWN` and doubles, up to
:data:`COOLDOWN`, each time a call is slow again soon after the last one
ended (within its length): a disk that stays busy gets the pool for good
after a few trips, each holding the loop once, for one call. A one-off sleep
costs a second: a call that waited for the GIL while another thread held it
(the journal writer, a garbage collection) sleeps in the kernel too, and
looked to the guard like a busy disk; with one fixed 30 s cooldown such a
trip in a benchmark run cost a third of figure 9's throughput.

What the guard cannot cut short is a call that does not return: a local
filesystem frozen for a snapshot (fsfreeze, LVM) makes a create wait for the
thaw, and inline that wait holds every session. Sites that freeze their
filesystems for long turn ``server.inline_local_changes`` off.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Files up to this size may be written and closed inline (a copy into the page cache).
SMALL_WRITE = 64 * 1024
# An inline call slower than this sends every call to the pool for a while:
# FIRST_COOLDOWN, doubled for each trip soon after the last, up to COOLDOWN.
SLOW = 0.002
FIRST_COOLDOWN = 1.0
COOLDOWN = 30.0


class NotQuick(Exception):
    """Raised by a call made to run inline that found it would not be quick.

    The caller runs it again in the pool (an open that would truncate a big
    file: learnt from the exclusive create that failed, at no cost to the
    usual upload of a new file).
    """


def waits() -> int:
    """How many times this thread has slept in the kernel (voluntary switches)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


class InlineGuard:
    """Shared by every session of a gateway: is inline allowed right now?"""

    def __init__(
        self,
        *,
        slow: float = SLOW,
        first_cooldown: float = FIRST_COOLDOWN,
        cooldown: float = COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
        waits: Callable[[], int] = waits,
    ) -> None:
        self.slow = slow
        self.first_cooldown = first_cooldown
        self.cooldown = cooldown  # the longest
        self.clock = clock
        self.waits = waits
        self._until = 0.0
        self._current = 0.0  # the last trip's cooldown
        self.trips = 0  # how many times a slow call turned inline calls off

    def allowed(self) -> bool:
        return self._until == 0.0 or self.clock() >= self._until

    def start(self) -> tuple[float, int]:
        """Before an inline call: what :meth:`observe` needs."""
        return self.clock(), self.waits()

    def observe(self, before: tuple[float, int], what: str | Callable[..., object]) -> None:
        """After an inline call; ``before`` is what :meth:`start` returned.

        ``what``: the call's name, or the function (named only if it was slow).
        """
        started, waits = before
        ended = self.clock()
        took = ended - started
        if took <= self.slow or self.waits() == waits:
            return  # quick, or only kept off the CPU by other processes
        if self._until and ended - self._until < self._current:
            self._current = min(self._current * 2, self.cooldown)  # still busy
        else:
            self._current = min(self.first_cooldown, self.cooldown)
        self._until = ended + self._current
        self.trips += 1
        if not isinstance(what, str):
            what = getattr(getattr(what, "func", what), "__name__", "a filesystem call")
        log.warning(
            "%s took %.1f ms on the event loop (local disk busy); filesystem calls "
            "go to the thread pool for the next %.0f s",
            what,
            took * 1000,
            self._current,
        )
