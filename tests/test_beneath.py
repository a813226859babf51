"""Reaching files beneath a home: the kernel's openat2 and the descriptor walk, side by side.

Every test runs twice: with openat2(RESOLVE_BENEATH) and with the walk used
where the kernel has none. Both must give the same answers, and neither may
ever hand back a descriptor of something outside the home.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import pytest

from sftpgate.beneath import Home, rename_noreplace
from sftpgate.errors import JailError
from sftpgate.frontdoor.jail import link_for_client, link_target, virtual


@pytest.mark.parametrize(
    ("path", "base", "expected"),
    [
        pytest.param(b"..", b"/", b"/", id="dotdot-at-root"),
        pytest.param(b"../../..", b"/", b"/", id="many-dotdots"),
        pytest.param(b"/../../etc/passwd", b"/", b"/etc/passwd", id="absolute-dotdot"),
        pytest.param(b"//x", b"/", b"/x", id="double-slash"),
        pytest.param(b"///x//y", b"/", b"/x/y", id="many-slashes"),
        pytest.param(b"a/../../b", b"/", b"/b", id="relative-climbs-past-root"),
        pytest.param(b"x", b"/dir", b"/dir/x", id="relative-with-base"),
        pytest.param(b"../y", b"/dir", b"/y", id="relative-dotdot-with-base"),
        pytest.param(b"../../../y", b"/dir/sub", b"/y", id="relative-climbs-past-root-from-base"),
        pytest.param(b"/abs", b"/dir", b"/abs", id="absolute-ignores-base"),
        pytest.param(b"a/b/", b"/", b"/a/b", id="trailing-slash"),
        pytest.param(b"a/./b/.", b"/", b"/a/b", id="dots"),
        pytest.param(b"", b"/", b"/", id="empty"),
        pytest.param(b".", b"/", b"/", id="dot"),
        pytest.param(b"//", b"/", b"/", id="double-slash-root"),
    ],
)
def test_virtual_normalises_and_never_climbs_above_root(
    path: bytes, base: bytes, expected: bytes
) -> None:
    assert virtual(path, base) == expected


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def use_openat2(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def maze(tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    """A home reached through a symlink, full of links of every kind; and paths to try."""
    real_base = tmp_path / "real-base"
    home = real_base / "home"
    (home / "dir" / "sub").mkdir(parents=True)
    (home / "dir" / "sub" / "f.txt").write_text("x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("s")
    links = {
        "rel": "dir/sub",  # relative, inward
        "abs-in": str(home / "dir"),  # absolute, inward
        "abs-out": str(tmp_path / "outside"),  # absolute, outward
        "abs-etc": "/etc",
        "dotdot-out": "../../outside",  # relative, climbs above the home
        "dotdot-back": "../home/dir",  # climbs above the home and comes back
        "chain": "rel",  # a link to a link
        "dangling": "no/such/thing",
        "dir/up": "..",
        "dir/sub/upup": "../../dir",
        "dir/sub/slashes": "..//./sub/",
        "dir/sub/deep-out": "../../../../../../../etc",
    }
    for name, target in links.items():
        os.symlink(target, home / name)
    (tmp_path / "via").symlink_to(real_base)  # the configured home path holds a link too
    names = [b"/" + name.encode() for name in links]
    tails = [b"", b"/f.txt", b"/sub", b"/sub/f.txt", b"/secret", b"/passwd", b"/..", b"/missing"]
    paths = [b"/", b"/dir", b"/dir/sub/f.txt", b"/missing", b"/missing/deeper"]
    paths += [name + tail for name in names for tail in tails]
    return tmp_path / "via" / "home", home, paths


def test_open_never_leaves_the_home_and_agrees_with_the_kernel_inside_it(
    maze: tuple[Path, Path, list[bytes]], use_openat2: bool
) -> None:
    configured, home, paths = maze
    real_home = os.path.realpath(home)
    beneath = Home(configured, use_openat2=use_openat2)
    opened = refused = 0
    for path in paths:
        # Client paths are normalised as text first (``..`` never climbs above /).
        local = os.path.join(real_home, os.fsdecode(virtual(path).lstrip(b"/")))
        plain = os.path.realpath(local)
        try:
            fd = beneath.open(virtual(path), os.O_PATH)
        except JailError:
            refused += 1
            continue
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        opened += 1
        assert where == real_home or where.startswith(real_home + "/"), path
        assert where == plain, path  # what the kernel reaches without the jail
    assert opened >= 15 and refused >= 10
    beneath.close()


@pytest.mark.parametrize(
    "path",
    [
        b"/abs-out",
        b"/abs-out/secret",
        b"/dotdot-out/secret",
        b"/abs-etc/passwd",
        b"/dir/sub/deep-out/passwd",
    ],
)
def test_every_way_out_is_a_jail_error(
    maze: tuple[Path, Path, list[bytes]], use_openat2: bool, path: bytes
) -> None:
    configured, _, _ = maze
    beneath = Home(configured, use_openat2=use_openat2)
    for flags in (os.O_RDONLY, os.O_PATH, os.O_WRONLY | os.O_CREAT):
        with pytest.raises(JailError):
            os.close(beneath.open(path, flags))
    with pytest.raises(JailError):
        beneath.parent(path + b"/x").close()
    with pytest.raises(JailError):
        beneath.realpath(path + b"/x")
    beneath.close()


def test_create_through_a_dangling_inward_link_lands_inside(
    tmp_path: Path, use_openat2: bool
) -> None:
    home = tmp_path / "home"
    (home / "d").mkdir(parents=True)
    os.symlink("d/new.txt", home / "pointer")
    os.symlink("../../etc/sftpgate-never", home / "d" / "outward")
    beneath = Home(home, use_openat2=use_openat2)
    os.close(beneath.open(b"/pointer", os.O_WRONLY | os.O_CREAT, 0o600))
    assert (home / "d" / "new.txt").is_file()
    with pytest.raises(JailError):
        beneath.open(b"/d/outward", os.O_WRONLY | os.O_CREAT, 0o600)
    assert not os.path.lexists("/etc/sftpgate-never")
    beneath.close()


def test_nofollow_opens_refuse_a_link_as_the_last_name(tmp_path: Path, use_openat2: bool) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "f").write_text("x")
    os.symlink("f", home / "l")
    beneath = Home(home, use_openat2=use_openat2)
    with pytest.raises(OSError) as raised:
        beneath.open(b"/l", os.O_RDONLY | os.O_NOFOLLOW)
    assert raised.value.errno == errno.ELOOP
    fd = beneath.open(b"/l", os.O_PATH | os.O_NOFOLLOW)  # the link itself
    assert stat.S_ISLNK(os.fstat(fd).st_mode)
    os.close(fd)
    beneath.close()


def test_parent_gives_the_folder_and_the_name_without_following_it(
    maze: tuple[Path, Path, list[bytes]], use_openat2: bool
) -> None:
    configured, home, _ = maze
    beneath = Home(configured, use_openat2=use_openat2)
    with beneath.parent(b"/rel/f.txt") as parent:
        assert parent.name == b"f.txt"
        assert os.readlink(f"/proc/self/fd/{parent.fd}") == os.path.realpath(home / "dir/sub")
    with beneath.parent(b"/abs-out") as parent:  # the outward link itself: it can be removed
        assert parent.name == b"abs-out"
        os.unlink(parent.name, dir_fd=parent.fd)
    assert not os.path.lexists(home / "abs-out")
    with beneath.parent(b"/") as parent:
        assert parent.name == b""
    beneath.close()


def test_realpath_shows_the_users_view(
    maze: tuple[Path, Path, list[bytes]], use_openat2: bool
) -> None:
    configured, _, _ = maze
    beneath = Home(configured, use_openat2=use_openat2)
    assert beneath.realpath(b"/rel/f.txt") == b"/dir/sub/f.txt"
    assert beneath.realpath(b"/abs-in/sub") == b"/dir/sub"
    assert beneath.realpath(b"/chain/upup/sub") == b"/dir/sub"
    assert beneath.realpath(b"/missing/deeper") == b"/missing/deeper"
    assert beneath.realpath(b"/rel/missing/x") == b"/dir/sub/missing/x"
    assert beneath.realpath(b"/") == b"/"
    beneath.close()


def test_a_symlink_loop_is_an_eloop_error(tmp_path: Path, use_openat2: bool) -> None:
    (tmp_path / "home").mkdir()
    os.symlink("b", tmp_path / "home" / "a")
    os.symlink("a", tmp_path / "home" / "b")
    beneath = Home(tmp_path / "home", use_openat2=use_openat2)
    with pytest.raises(OSError) as raised:
        beneath.open(b"/a/x", os.O_RDONLY)
    assert raised.value.errno == errno.ELOOP
    with beneath.parent(b"/a") as parent:  # the link itself can still be named
        assert parent.name == b"a"
    beneath.close()


def test_no_descriptor_is_left_behind(
    maze: tuple[Path, Path, list[bytes]], use_openat2: bool
) -> None:
    configured, _, paths = maze
    before = set(os.listdir("/proc/self/fd"))
    beneath = Home(configured, use_openat2=use_openat2)
    for path in paths:
        for call in (
            lambda p: os.close(beneath.open(p, os.O_PATH)),
            lambda p: beneath.parent(p).close(),
            beneath.realpath,
        ):
            with contextlib.suppress(OSError, JailError):
                call(virtual(path))
    beneath.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_rename_noreplace_never_replaces(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace(fd, b"a", fd, b"b")
        rename_noreplace(fd, b"a", fd, b"c")
    finally:
        os.close(fd)
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "c").read_text() == "a"


@pytest.mark.parametrize(
    ("link_path", "target", "stored"),
    [
        pytest.param(b"/newlink", b"/sub/deep.txt", b"sub/deep.txt", id="abs-from-root"),
        pytest.param(b"/newlink", b"inner.txt", b"inner.txt", id="rel-from-root"),
        pytest.param(b"/sub/l", b"/inner.txt", b"../inner.txt", id="abs-from-subdir"),
        pytest.param(b"/sub/l", b"deep.txt", b"deep.txt", id="rel-from-subdir"),
        pytest.param(b"/sub/l", b"../../../etc", b"../etc", id="dotdot-clamped-at-the-top"),
        pytest.param(b"/a/b/l", b"/etc/passwd", b"../../etc/passwd", id="abs-is-in-the-view"),
    ],
)
def test_link_target_is_relative_and_read_in_the_users_view(
    link_path: bytes, target: bytes, stored: bytes
) -> None:
    assert link_target(target, link_path) == stored


def test_link_for_client_shows_only_what_stays_inside() -> None:
    home = b"/srv/homes/alice"
    assert link_for_client(b"sub", b"/in", home) == b"sub"
    assert link_for_client(b"../x", b"/d/l", home) == b"../x"
    assert link_for_client(b"/srv/homes/alice/inner.txt", b"/abs", home) == b"/inner.txt"
    assert link_for_client(b"/srv/homes/alice", b"/abs", home) == b"/"
    for content, link in [
        (b"../x", b"/l"),
        (b"../../etc", b"/d/l"),
        (b"/etc/passwd", b"/l"),
        (b"/srv/homes/alice2/x", b"/l"),
    ]:
        with pytest.raises(JailError):
            link_for_client(content, link, home)
