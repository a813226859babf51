"""Per-thread credentials: one thread acts as a user while the others stay themselves."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from sftpgate.identity import Identity, IdentityError, call_as, identity_for

NOBODY = Identity(65534, 65534, (65534,))
OTHER = Identity(4242, 4343, (4343, 5555))


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("run as root (CI does): only root acts as another user")


def ids() -> tuple[int, int, list[int]]:
    return os.geteuid(), os.getegid(), sorted(os.getgroups())


def test_only_the_calling_thread_changes_and_it_changes_back() -> None:
    before = ids()
    inside = threading.Event()
    release = threading.Event()
    seen: dict[str, tuple[int, int, list[int]]] = {}

    def hold() -> None:
        seen["holder"] = ids()
        inside.set()
        release.wait(10)

    def other() -> None:
        seen["other"] = call_as(OTHER, ids)

    holder = threading.Thread(target=lambda: call_as(NOBODY, hold))
    holder.start()
    assert inside.wait(10)
    second = threading.Thread(target=other)
    second.start()
    second.join()
    seen["main"] = ids()  # while the holder is still nobody
    release.set()
    holder.join()
    assert seen["holder"] == (65534, 65534, [65534])
    assert seen["other"] == (4242, 4343, [4343, 5555])
    assert seen["main"] == before
    assert ids() == before


def test_the_thread_is_itself_again_after_the_call_raised(tmp_path: Path) -> None:
    before = ids()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(PermissionError):
        call_as(NOBODY, os.listdir, private)
    assert ids() == before
    assert os.listdir(private) == []  # root again


def test_files_made_in_the_call_belong_to_the_user(tmp_path: Path) -> None:
    folder = tmp_path / "home"
    folder.mkdir()
    os.chown(folder, 4242, 4343)
    # As the gateway does: the folder opened as root (pytest's tmp is 0700),
    # what is beneath it reached as the user.
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        made = call_as(OTHER, os.open, "made", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.close(made)
    finally:
        os.close(fd)
    st = (folder / "made").stat()
    assert (st.st_uid, st.st_gid) == (4242, 4343)


def test_a_switch_that_does_not_take_is_an_error_and_the_call_is_not_made() -> None:
    made: list[int] = []
    with pytest.raises(IdentityError):
        call_as(Identity(-5, 0, ()), made.append, 1)  # no such id: the kernel refuses
    assert made == [] and ids()[0] == 0


def test_none_runs_the_call_as_the_gateway() -> None:
    assert call_as(None, ids) == ids()


def test_identity_comes_from_the_config_then_the_account_then_the_home(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "h"
    home.mkdir()
    os.chown(home, 7777, 8888)
    configured = identity_for("nosuchlogin", home, 4242, 4343)
    assert configured is not None and (configured.uid, configured.gid) == (4242, 4343)
    account = identity_for("nobody", home)
    assert account is not None and account.uid == 65534
    owner = identity_for("nosuchlogin", home)
    assert owner == Identity(7777, 8888, (8888,))
    os.chown(home, 0, 0)
    with caplog.at_level(logging.WARNING, logger="sftpgate.identity"):
        assert identity_for("nosuchlogin", home) == Identity(0, 0, (0,))
    assert "acts as root" in caplog.text
    with pytest.raises(IdentityError):
        identity_for("nosuchlogin", tmp_path / "missing")
