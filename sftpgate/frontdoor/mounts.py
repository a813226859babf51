"""Which filesystems a home lives on: may its metadata calls run on the event loop?

A metadata call (stat, open, close, rename, mkdir...) on a local disk takes
microseconds; on NFS it can hang for as long as the server is away. Sending
every one to the thread pool costs two thread wake-ups per SFTP request, which
is most of the time of a small-file upload. So a session whose whole home is on
local filesystems (the filesystem holding it and every one mounted below it)
may make quick calls inline (which ones, and the guard against a slow disk:
see inline.py); any network, FUSE or unknown filesystem there keeps every call
in the pool.
"""

from __future__ import annotations

import os

# Filesystems whose metadata calls never wait on a network or a user process.
LOCAL = frozenset(
    {
        "bcachefs",
        "btrfs",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "jfs",
        "overlay",
        "ramfs",
        "reiserfs",
        "tmpfs",
        "xfs",
        "zfs",
    }
)

MOUNTINFO = "/proc/self/mountinfo"


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of each line of /proc/self/mountinfo. Pure."""
    mounts: list[tuple[str, str]] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mounts.append((_unescape(fields[4]), right.split()[0]))
    return mounts


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as \040, \011, \012, \134.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def subtree_is_local(path: str, mounts: list[tuple[str, str]]) -> bool:
    """Whether ``path`` (a real path) and everything mounted under it is local. Pure."""
    path = path.rstrip("/") or "/"

    def under(child: str, parent: str) -> bool:
        return parent == "/" or child == parent or child.startswith(parent + "/")

    holding = [(point, kind) for point, kind in mounts if under(path, point)]
    if not holding:
        return False
    # The last mount of the longest mount point is the one in force.
    top = max(len(point) for point, _ in holding)
    fstype = [kind for point, kind in holding if len(point) == top][-1]
    below = [kind for point, kind in mounts if point != path and under(point, path)]
    return all(kind in LOCAL for kind in [fstype, *below])


def home_is_local(home: str | os.PathLike[str]) -> bool:
    """Blocking (resolves the home): run it in the thread pool."""
    try:
        real = os.path.realpath(home)
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            return subtree_is_local(real, parse_mountinfo(f.read()))
    except OSError:
        return False
