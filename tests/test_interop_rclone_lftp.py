"""rclone and lftp, two clients nobody here wrote, against ``serve``: every byte and the journal.

rclone (Debian 12's 1.60, Go's pkg/sftp) runs with its default options; it
sends the last WRITE of a file framed with the rest of its 32 KiB buffer,
which the gateway once refused (test_serve_lenient_requests.py has the raw
packets). lftp speaks SFTP through OpenSSH's ``ssh -s sftp``. Both run in a
temporary HOME with a config file of the test's own, so nothing of the
machine's account is read or written.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORDS, RunningGateway, need_tool

INSTALL = "apt-get install rclone lftp"


def client_env(tmp: Path) -> dict[str, str]:
    """The environment with HOME in ``tmp``: the clients' dotfiles and caches stay there."""
    home = tmp / "client-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "RCLONE_", "LFTP"))}
    return {**env, "HOME": str(home)}


def write_tree(root: Path) -> dict[str, bytes]:
    """A few files, KiB to MiB, none a multiple of pkg/sftp's 32 KiB writes."""
    files = {
        "clip.mp4": os.urandom(300_000),
        "sub/notes.txt": b"hello, gateway\n" * 400,
        "sub/deeper/big.bin": os.urandom(1_048_577),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def uploads(gateway: RunningGateway, count: int) -> list[tuple[str, int, str]]:
    """The first ``count`` upload rows, waited for: with no pipeline the writer commits later."""
    rows = gateway.wait_rows(
        lambda rs: len(rs) >= count, "SELECT path, bytes, state FROM uploads ORDER BY id"
    )
    return [(r["path"], r["bytes"], r["state"]) for r in rows]


def no_failed_requests(gateway: RunningGateway) -> None:
    # A missing path is how both clients ask whether a folder exists; nothing else may fail.
    failed = [r for r in gateway.rows() if r["status"] not in ("ok", "no_such_file")]
    assert failed == []


# -- rclone ---------------------------------------------------------------------------


def rclone_config(gateway: RunningGateway, tmp: Path) -> Path:
    """rclone's config for alice by password, defaults otherwise, in a file of the test's."""
    rclone = need_tool("rclone", INSTALL)
    obscured = subprocess.run(
        [rclone, "obscure", PASSWORDS["alice"]],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env=client_env(tmp),
    ).stdout.strip()
    path = tmp / "rclone.conf"
    path.write_text(
        f"[gate]\ntype = sftp\nhost = 127.0.0.1\nport = {gateway.port}\n"
        f"user = alice\npass = {obscured}\n"
    )
    return path


def rclone(config: Path, tmp: Path, *args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(
        [need_tool("rclone", INSTALL), "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=client_env(tmp),
        check=False,
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"rclone {' '.join(args)} failed:\n{err}{out}"
    return out


def test_rclone_copies_a_folder_up_and_back_with_default_options(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    config = rclone_config(gateway, tmp_path)
    (tmp_path / "src").mkdir()
    files = write_tree(tmp_path / "src")

    rclone(config, tmp_path, "copy", str(tmp_path / "src"), "gate:up")
    assert read_tree(gateway.home("alice") / "up") == files
    rclone(config, tmp_path, "copy", "gate:up", str(tmp_path / "back"))
    assert read_tree(tmp_path / "back") == files

    assert sorted(uploads(gateway, len(files))) == sorted(
        (f"/up/{name}", len(data), "complete") for name, data in files.items()
    )
    rows = gateway.wait_rows(lambda rs: sum(r["op"] == "close" for r in rs) == 2 * len(files))
    closes = [r for r in rows if r["op"] == "close"]
    written = {r["path"]: r["bytes_written"] for r in closes if r["bytes_written"]}
    read = {r["path"]: r["bytes_read"] for r in closes if r["bytes_read"]}
    assert written == read == {f"/up/{name}": len(data) for name, data in files.items()}
    no_failed_requests(gateway)


def test_rclone_rcat_lsjson_moveto_and_deletefile(gateway: RunningGateway, tmp_path: Path) -> None:
    config = rclone_config(gateway, tmp_path)
    streamed = os.urandom(70_001)
    home = gateway.home("alice")

    rclone(config, tmp_path, "rcat", "gate:in/streamed.bin", stdin=streamed)
    assert (home / "in" / "streamed.bin").read_bytes() == streamed
    assert uploads(gateway, 1) == [("/in/streamed.bin", len(streamed), "complete")]

    listing: list[dict[str, Any]] = json.loads(rclone(config, tmp_path, "lsjson", "-R", "gate:"))
    assert sorted((e["Path"], e["Size"], e["IsDir"]) for e in listing) == [
        ("in", -1, True),
        ("in/streamed.bin", len(streamed), False),
    ]

    rclone(config, tmp_path, "moveto", "gate:in/streamed.bin", "gate:in/kept.bin")
    assert (home / "in" / "kept.bin").read_bytes() == streamed
    assert not (home / "in" / "streamed.bin").exists()
    rclone(config, tmp_path, "deletefile", "gate:in/kept.bin")
    assert list((home / "in").iterdir()) == []

    (rename,) = gateway.op_rows("rename")
    assert (rename["path"], rename["path2"], rename["status"]) == (
        "/in/streamed.bin",
        "/in/kept.bin",
        "ok",
    )
    (remove,) = gateway.op_rows("remove")
    assert (remove["path"], remove["status"]) == ("/in/kept.bin", "ok")
    assert uploads(gateway, 1) == [("/in/streamed.bin", len(streamed), "complete")]
    no_failed_requests(gateway)


# -- lftp -----------------------------------------------------------------------------


def lftp(gateway: RunningGateway, tmp: Path, commands: str) -> str:
    """Run an lftp ``-c`` script as bob (key only) through OpenSSH's ssh, in ``tmp``."""
    lftp_path = need_tool("lftp", INSTALL)
    need_tool("ssh", "apt-get install openssh-client")
    ssh = " ".join(
        [
            "ssh -a -x",
            f"-i {gateway.keys['bob']}",
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "-o BatchMode=yes -o IdentitiesOnly=yes -o LogLevel=ERROR",
        ]
    )
    script = (
        f'set sftp:connect-program "{ssh}"; set cmd:fail-exit yes; '
        # "bob:" with an empty password: lftp would otherwise ask for one.
        f"open sftp://bob:@127.0.0.1:{gateway.port}; {commands}"
    )
    result = subprocess.run(
        [lftp_path, "-c", script],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
        env=client_env(tmp),
        check=False,
    )
    assert result.returncode == 0, f"lftp -c {commands!r} failed:\n{result.stderr}{result.stdout}"
    return result.stdout


def test_lftp_mirrors_a_folder_up_and_down(gateway: RunningGateway, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    files = write_tree(tmp_path / "src")

    lftp(gateway, tmp_path, "mirror -R src up; mirror up down")
    assert read_tree(gateway.home("bob") / "up") == files
    assert read_tree(tmp_path / "down") == files

    assert sorted(uploads(gateway, len(files))) == sorted(
        (f"/up/{name}", len(data), "complete") for name, data in files.items()
    )
    gateway.close_clients()
    rows = gateway.wait_rows(lambda rs: any(r["op"] == "logout" for r in rs))
    mkdirs = sorted(r["path"] for r in rows if r["op"] == "mkdir")
    assert mkdirs == ["/up", "/up/sub", "/up/sub/deeper"]
    read = {r["path"]: r["bytes_read"] for r in rows if r["op"] == "close" and r["bytes_read"]}
    assert read == {f"/up/{name}": len(data) for name, data in files.items()}
    no_failed_requests(gateway)


def test_lftp_reput_and_reget_resume_where_the_copy_stopped(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    full = os.urandom(1_000_000)
    (tmp_path / "full.bin").write_bytes(full)
    (tmp_path / "first-part.bin").write_bytes(full[:300_000])
    (tmp_path / "got.bin").write_bytes(full[:400_000])

    # An upload cut at 300,000 bytes, resumed; a download cut at 400,000, resumed.
    lftp(
        gateway,
        tmp_path,
        "put first-part.bin -o clip.bin; reput full.bin -o clip.bin; reget clip.bin -o got.bin",
    )
    assert (gateway.home("bob") / "clip.bin").read_bytes() == full
    assert (tmp_path / "got.bin").read_bytes() == full

    # Each upload counts the bytes its own handle wrote; the resumed one only the rest.
    assert uploads(gateway, 2) == [
        ("/clip.bin", 300_000, "complete"),
        ("/clip.bin", 700_000, "complete"),
    ]
    gateway.close_clients()
    rows = gateway.wait_rows(lambda rs: any(r["op"] == "logout" for r in rs))
    closes = [(r["path"], r["bytes_written"], r["bytes_read"]) for r in rows if r["op"] == "close"]
    assert closes == [
        ("/clip.bin", 300_000, 0),
        ("/clip.bin", 700_000, 0),
        ("/clip.bin", 0, 600_000),
    ]
    no_failed_requests(gateway)


@pytest.mark.parametrize("tool", ["rclone", "lftp"])
def test_the_clients_are_installed_by_setup(tool: str) -> None:
    # scripts/setup.sh installs both; a machine without them fails here, naming the step.
    need_tool(tool, INSTALL)
    setup = Path(__file__).parent.parent / "scripts" / "setup.sh"
    assert tool in setup.read_text().split("DEBIAN_PACKAGES=(", 1)[1].split(")", 1)[0]
