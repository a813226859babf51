"""The jail: pure virtual-path normalisation, and symlink checks on a real temp tree."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from sftpgate.errors import JailError
from sftpgate.frontdoor.jail import Jail


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
        pytest.param(b"/a/b//", b"/", b"/a/b", id="trailing-slashes"),
        pytest.param(b"a/./b/.", b"/", b"/a/b", id="dots"),
        pytest.param(b"", b"/", b"/", id="empty"),
        pytest.param(b"", b"/dir", b"/dir", id="empty-with-base"),
        pytest.param(b".", b"/", b"/", id="dot"),
        pytest.param(b"/", b"/", b"/", id="root"),
        pytest.param(b"//", b"/", b"/", id="double-slash-root"),
    ],
)
def test_virtual_normalises_and_never_climbs_above_root(
    path: bytes, base: bytes, expected: bytes
) -> None:
    assert Jail.virtual(path, base) == expected


def test_virtual_is_pure_and_does_not_look_at_the_filesystem() -> None:
    # A path that cannot exist anywhere still normalises.
    assert Jail.virtual(b"no/such/../thing") == b"/no/thing"


@dataclass
class Tree:
    jail: Jail
    root: bytes
    outside: Path


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    """home/ with a file, a subdir, an inward link and two outward links; outside/ beside it.

    home/inner.txt
    home/sub/deep.txt
    home/in      -> sub                  (relative, inside)
    home/abs_in  -> <home>/inner.txt     (absolute, inside)
    home/out     -> <tmp>/outside        (absolute, outside)
    home/rel_out -> ../outside           (relative, outside)
    outside/secret.txt
    """
    home = tmp_path / "home"
    outside = tmp_path / "outside"
    (home / "sub").mkdir(parents=True)
    outside.mkdir()
    (home / "inner.txt").write_text("inner")
    (home / "sub" / "deep.txt").write_text("deep")
    (outside / "secret.txt").write_text("secret")
    os.symlink("sub", home / "in")
    os.symlink(home / "inner.txt", home / "abs_in")
    os.symlink(outside, home / "out")
    os.symlink("../outside", home / "rel_out")
    jail = Jail(home)
    return Tree(jail, os.fsencode(os.path.realpath(home)), outside)


def test_root_is_the_real_path_of_the_home(tmp_path: Path, tree: Tree) -> None:
    alias = tmp_path / "home-alias"
    os.symlink(tmp_path / "home", alias)
    assert Jail(alias).root == tree.root


def test_resolve_root_and_dotdot_give_the_home(tree: Tree) -> None:
    for path in (b"/", b"", b"..", b"/../.."):
        resolved = tree.jail.resolve(path)
        assert resolved.virtual == b"/"
        assert resolved.local == tree.root
    assert tree.jail.resolve(b"..", follow=False).local == tree.root


def test_resolve_inner_file(tree: Tree) -> None:
    resolved = tree.jail.resolve(b"inner.txt")
    assert resolved.virtual == b"/inner.txt"
    assert resolved.local == tree.root + b"/inner.txt"
    assert Path(os.fsdecode(resolved.local)).read_text() == "inner"


def test_resolve_missing_path_inside_home_is_allowed(tree: Tree) -> None:
    resolved = tree.jail.resolve(b"/sub/new-file")
    assert resolved.local == tree.root + b"/sub/new-file"


def test_dotdot_cannot_reach_the_folder_beside_the_home(tree: Tree) -> None:
    resolved = tree.jail.resolve(b"../outside/secret.txt")
    assert resolved.virtual == b"/outside/secret.txt"
    assert resolved.local == tree.root + b"/outside/secret.txt"
    assert not os.path.exists(resolved.local)


@pytest.mark.parametrize("link", [b"/out", b"/rel_out"])
def test_following_a_symlink_that_leads_outside_is_refused(tree: Tree, link: bytes) -> None:
    with pytest.raises(JailError):
        tree.jail.resolve(link, follow=True)
    with pytest.raises(JailError):
        tree.jail.resolve(link + b"/secret.txt", follow=True)


@pytest.mark.parametrize("link", [b"/out", b"/rel_out"])
def test_outward_symlink_itself_can_be_named_without_following_so_it_can_be_removed(
    tree: Tree, link: bytes
) -> None:
    resolved = tree.jail.resolve(link, follow=False)
    assert resolved.virtual == link
    assert resolved.local == tree.root + link
    assert os.path.islink(resolved.local)
    os.remove(resolved.local)
    assert (tree.outside / "secret.txt").read_text() == "secret"


@pytest.mark.parametrize("link", [b"/out", b"/rel_out"])
def test_path_through_an_outward_symlink_is_refused_even_without_follow(
    tree: Tree, link: bytes
) -> None:
    with pytest.raises(JailError):
        tree.jail.resolve(link + b"/secret.txt", follow=False)


def test_symlink_pointing_inside_is_followed(tree: Tree) -> None:
    assert tree.jail.resolve(b"/in").local == tree.root + b"/sub"
    through = tree.jail.resolve(b"/in/deep.txt")
    assert through.virtual == b"/in/deep.txt"
    assert through.local == tree.root + b"/sub/deep.txt"
    assert tree.jail.resolve(b"/in/deep.txt", follow=False).local == tree.root + b"/sub/deep.txt"
    assert tree.jail.resolve(b"/abs_in").local == tree.root + b"/inner.txt"


def test_link_target_refuses_a_target_that_resolves_outside(tree: Tree) -> None:
    link = tree.jail.resolve(b"/newlink", follow=False)
    for target in (b"/out", b"out", b"out/secret.txt", b"/rel_out/secret.txt", b"sub/../out"):
        with pytest.raises(JailError):
            tree.jail.link_target(target, link)


def test_link_target_keeps_dotdot_targets_inside_the_home(tree: Tree) -> None:
    link = tree.jail.resolve(b"/sub/newlink", follow=False)
    stored = tree.jail.link_target(b"../../../outside/secret.txt", link)
    assert stored == b"../outside/secret.txt"  # i.e. <home>/outside/secret.txt
    os.symlink(stored, link.local)
    assert os.path.realpath(link.local) == tree.root + b"/outside/secret.txt"


@pytest.mark.parametrize(
    ("link_path", "target", "stored", "content"),
    [
        pytest.param(b"/newlink", b"/sub/deep.txt", b"sub/deep.txt", "deep", id="abs-from-root"),
        pytest.param(b"/newlink", b"inner.txt", b"inner.txt", "inner", id="rel-from-root"),
        pytest.param(b"/sub/l", b"/inner.txt", b"../inner.txt", "inner", id="abs-from-subdir"),
        pytest.param(b"/sub/l", b"deep.txt", b"deep.txt", "deep", id="rel-from-subdir"),
        pytest.param(b"/newlink", b"/in/deep.txt", b"in/deep.txt", "deep", id="via-inward-link"),
    ],
)
def test_link_target_returns_a_relative_link_for_an_inside_target(
    tree: Tree, link_path: bytes, target: bytes, stored: bytes, content: str
) -> None:
    link = tree.jail.resolve(link_path, follow=False)
    result = tree.jail.link_target(target, link)
    assert result == stored
    assert not result.startswith(b"/")
    os.symlink(result, link.local)
    assert Path(os.fsdecode(link.local)).read_text() == content


@pytest.mark.parametrize("link_path", [b"/out", b"/rel_out"])
def test_link_for_client_refuses_links_pointing_outside(tree: Tree, link_path: bytes) -> None:
    link = tree.jail.resolve(link_path, follow=False)
    content = os.readlink(link.local)
    with pytest.raises(JailError):
        tree.jail.link_for_client(content, link)


def test_link_for_client_resolves_dotdot_through_links_like_the_kernel(
    tmp_path: Path, tree: Tree
) -> None:
    # home/sneaky -> out/../sub: read as text it stays inside, but the kernel goes
    # through out (-> <tmp>/outside) and then up, landing on <tmp>/sub.
    (tmp_path / "sub").mkdir()
    os.symlink("out/../sub", tmp_path / "home" / "sneaky")
    link = tree.jail.resolve(b"/sneaky", follow=False)
    assert os.path.realpath(link.local) == os.fsencode(os.path.realpath(tmp_path / "sub"))
    with pytest.raises(JailError):
        tree.jail.link_for_client(os.readlink(link.local), link)
    with pytest.raises(JailError):
        tree.jail.resolve(b"/sneaky")


def test_link_for_client_shows_inside_links_in_the_users_view(tree: Tree) -> None:
    relative = tree.jail.resolve(b"/in", follow=False)
    assert tree.jail.link_for_client(os.readlink(relative.local), relative) == b"sub"
    absolute = tree.jail.resolve(b"/abs_in", follow=False)
    assert tree.jail.link_for_client(os.readlink(absolute.local), absolute) == b"/inner.txt"


def test_to_virtual_maps_inside_paths_back(tree: Tree) -> None:
    assert tree.jail.to_virtual(tree.root) == b"/"
    assert tree.jail.to_virtual(tree.root + b"/sub/deep.txt") == b"/sub/deep.txt"


def test_to_virtual_of_an_outside_path_raises(tree: Tree) -> None:
    with pytest.raises(JailError):
        tree.jail.to_virtual(os.fsencode(tree.outside / "secret.txt"))
    with pytest.raises(JailError):
        tree.jail.to_virtual(b"/")
    # a sibling whose name merely starts with the home's name is outside too
    with pytest.raises(JailError):
        tree.jail.to_virtual(tree.root + b"2/file")


def test_inside_does_not_accept_a_sibling_with_the_same_prefix(tree: Tree) -> None:
    assert tree.jail.inside(tree.root)
    assert tree.jail.inside(tree.root + b"/x")
    assert not tree.jail.inside(tree.root + b"-other")


@pytest.fixture
def maze(tmp_path: Path) -> tuple[Jail, list[bytes]]:
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
        "dotdot-out": "../../outside",  # relative, climbs above the home
        "dotdot-back": "../home/dir",  # climbs above the home and comes back
        "chain": "rel",  # a link to a link
        "dangling": "no/such/thing",
        "dir/up": "..",
        "dir/sub/upup": "../../dir",
        "dir/sub/slashes": "..//./sub/",
    }
    for name, target in links.items():
        os.symlink(target, home / name)
    (tmp_path / "via").symlink_to(real_base)  # the configured home path holds a link too
    jail = Jail(tmp_path / "via" / "home")
    names = [b"/" + name.encode() for name in links]
    tails = [b"", b"/f.txt", b"/sub", b"/sub/f.txt", b"/secret", b"/..", b"/missing/x"]
    paths = [b"/", b"/dir", b"/dir/sub/f.txt", b"/missing", b"/missing/deeper"]
    paths += [name + tail for name in names for tail in tails]
    return jail, paths


def test_real_matches_realpath_walking_only_below_the_home(
    maze: tuple[Jail, list[bytes]],
) -> None:
    jail, paths = maze
    for path in paths:
        virtual = Jail.virtual(path)
        assert jail.real(virtual) == os.path.realpath(jail.to_local(virtual)), path


def test_real_does_not_look_at_the_homes_own_path_after_the_first_call(
    maze: tuple[Jail, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    jail, _ = maze
    root = jail.root
    looked: list[bytes] = []
    lstat = os.lstat

    def recording_lstat(path: bytes) -> os.stat_result:  # records, then the real lstat
        looked.append(path)
        return lstat(path)

    monkeypatch.setattr(os, "lstat", recording_lstat)
    assert jail.real(b"/dir/sub/f.txt") == root + b"/dir/sub/f.txt"
    assert looked == [root + b"/dir", root + b"/dir/sub", root + b"/dir/sub/f.txt"]


def test_a_symlink_loop_is_an_eloop_error(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    os.symlink("b", tmp_path / "home" / "a")
    os.symlink("a", tmp_path / "home" / "b")
    jail = Jail(tmp_path / "home")
    with pytest.raises(OSError) as raised:
        jail.resolve(b"/a/x")
    assert raised.value.errno == errno.ELOOP
    # The link itself can still be named (to remove it), without following it.
    assert jail.resolve(b"/a", follow=False).local == jail.root + b"/a"


@pytest.mark.parametrize(
    "path",
    [
        b"/",
        b"inner.txt",
        b"/sub",
        b"/sub/deep.txt",
        b"/in",  # a link to a folder: the folder's stat
        b"/in/deep.txt",
        b"/abs_in",  # an absolute link to a file
        b"/in/..",
        b"/sub/.",
    ],
)
def test_stat_is_the_resolved_paths_own(tree: Tree, path: bytes) -> None:
    # Jail.stat answers from the walk's last lstat where it can: it must be
    # what a stat of the resolved path gives.
    resolved, st = tree.jail.stat(path)
    assert resolved == tree.jail.resolve(path)
    expected = os.stat(resolved.local)
    assert (st.st_ino, st.st_mode, st.st_size) == (
        expected.st_ino,
        expected.st_mode,
        expected.st_size,
    )


def test_stat_of_what_is_missing_or_outside(tree: Tree) -> None:
    with pytest.raises(FileNotFoundError):
        tree.jail.stat(b"/sub/missing.txt")
    with pytest.raises(FileNotFoundError):
        tree.jail.stat(b"/missing/deeper.txt")
    with pytest.raises(NotADirectoryError):
        tree.jail.stat(b"/inner.txt/x")
    for outward in (b"/out", b"/rel_out/secret.txt"):
        with pytest.raises(JailError):
            tree.jail.stat(outward)


def test_stat_through_links_that_end_on_a_folder_already_walked(tree: Tree) -> None:
    # Links whose targets add no component: the last lstat was the link's own.
    os.symlink(".", os.fsdecode(tree.root + b"/here"))
    os.symlink("..", os.fsdecode(tree.root + b"/sub/up"))
    for path, local in ((b"/here", tree.root), (b"/sub/up", tree.root), (b"/in/up", tree.root)):
        resolved, st = tree.jail.stat(path)
        assert resolved.local == local
        assert st.st_ino == os.stat(local).st_ino and not stat.S_ISLNK(st.st_mode)
