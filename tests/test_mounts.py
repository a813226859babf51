"""Which homes may make metadata calls on the event loop (frontdoor/mounts.py)."""

from __future__ import annotations

from pathlib import Path

from sftpgate.frontdoor.mounts import home_is_local, parse_mountinfo, subtree_is_local

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 252:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:40 / /srv/homes rw,relatime shared:5 - nfs4 filer:/homes rw,vers=4.2
41 27 252:1 / /data rw,relatime - xfs /dev/vdb rw
42 41 0:41 / /data/alice/remote rw,relatime - fuse.sshfs alice@host: rw
43 27 252:2 / /mnt/with\\040space rw - btrfs /dev/vdc rw
44 27 0:44 / /stacked rw - nfs server:/x rw
45 44 252:3 / /stacked rw - ext4 /dev/vdd rw
"""


def test_parse_mountinfo_reads_mount_points_and_types() -> None:
    mounts = parse_mountinfo(MOUNTINFO + "garbage line\n")
    assert ("/", "ext4") in mounts
    assert ("/srv/homes", "nfs4") in mounts
    assert ("/mnt/with space", "btrfs") in mounts  # \040 is a space
    assert len(mounts) == 8


def test_a_home_on_a_local_disk_is_local() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert subtree_is_local("/home/bob", mounts)
    assert subtree_is_local("/data/bob", mounts)
    assert subtree_is_local("/mnt/with space/carol", mounts)


def test_a_home_on_nfs_is_not() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert not subtree_is_local("/srv/homes/alice", mounts)
    assert not subtree_is_local("/srv/homes", mounts)


def test_a_network_mount_below_the_home_makes_it_not_local() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert not subtree_is_local("/data/alice", mounts)  # sshfs inside it
    assert not subtree_is_local("/data", mounts)
    assert not subtree_is_local("/", mounts)  # everything is below /


def test_the_mount_on_top_is_the_one_that_counts() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert subtree_is_local("/stacked/dave", mounts)  # ext4 mounted over nfs


def test_unknown_or_missing_mounts_are_not_local() -> None:
    assert not subtree_is_local("/home/bob", [])
    assert not subtree_is_local("/x", [("/", "someunknownfs")])


def test_this_machines_temp_dir_is_local_by_the_real_mount_table(tmp_path: Path) -> None:
    # The suite's tmp dirs are on the machine's own disk (ext4 here).
    assert home_is_local(tmp_path)
