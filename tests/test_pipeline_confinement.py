"""The pipeline acts on what was uploaded, as the uploader, and never follows a user's link.

Real system users, a root gateway, real ffmpeg and real SMTP. Each attack a
customer could mount with SFTP alone (or, in OpenSSH mode, a local account)
against the pipeline: links planted at every name it writes, playlists
named .mp4 that point at other files, the upload swapped after its CLOSE,
the output folder swapped while ffmpeg runs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from test_openssh_subsystem import Site
from test_openssh_subsystem import site_factory as site_factory

from conftest import RunningGateway, start_gateway
from mediakit import make_clip
from pipeline_kit import SmtpServer, pipeline_settings, settled, wait_jobs
from pipeline_kit import smtp as smtp  # a fixture
from sftpgate.gateway import start_workers
from sftpgate.media import MediaError
from sftpgate.media.probe import probe
from sftpgate.media.sandbox import input_args, sniff
from sshd_kit import TestUser, UserFactory, need_root
from sshd_kit import make_user as make_user
from sshd_kit import shared_dir as shared_dir

THUMBS = 3  # pipeline_settings makes three thumbnails


@dataclass
class Secret:
    """A root-owned file in a root-only folder: what an attacker wants to read or overwrite."""

    path: Path
    content: bytes

    def state(self) -> tuple[bytes, int, int, int]:
        st = self.path.stat()
        return self.path.read_bytes(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def secret(shared_dir: Path) -> Secret:
    folder = shared_dir / "rootonly"
    folder.mkdir(mode=0o700)
    path = folder / "secret"
    content = b"root:only:secret-content-4f1c\n"
    path.write_bytes(content)
    path.chmod(0o600)
    return Secret(path, content)


@dataclass
class Serve:
    gateway: RunningGateway
    alice: TestUser  # the attacker, as gateway login "alice"
    bob: TestUser  # the victim, as gateway login "bob"

    def home(self, login: str) -> Path:
        return self.gateway.home(login)


@pytest.fixture
def serve_factory(
    shared_dir: Path, make_user: UserFactory, user_keys: dict[str, Path], smtp: SmtpServer
) -> Iterator[Callable[..., Serve]]:
    """``sftpgate serve`` as root; logins alice and bob act as two fresh system users."""
    need_root()
    started: list[RunningGateway] = []

    def make(*, workers: int = 2, **pipeline: Any) -> Serve:
        alice, bob = make_user(), make_user()
        site = shared_dir / "site"
        site.mkdir(mode=0o755)
        extra = pipeline_settings(smtp.port, **pipeline)
        extra["jobs"]["workers"] = workers
        users = {
            "alice": {"uid": alice.uid, "gid": alice.gid},
            "bob": {"uid": bob.uid, "gid": bob.gid},
        }
        running = start_gateway(site, user_keys, extra=extra, users=users)
        started.append(running)
        return Serve(running, alice, bob)

    yield make
    for running in started:
        running.stop()


def owned_by(path: Path, user: TestUser) -> Path:
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    return path


def private_clip(home: Path, user: TestUser, tmp_path: Path, name: str = "private.mp4") -> Path:
    """A clip only ``user`` may read."""
    path = home / name
    path.write_bytes(make_clip(tmp_path / f"{user.login}-{name}", "mp4").read_bytes())
    path.chmod(0o600)
    return owned_by(path, user)


def output_names(base: str) -> list[str]:
    thumbs = [f"{base}-thumb-{n:02d}.jpg" for n in range(1, THUMBS + 1)]
    return [f"{base}.flv", f"{base}.json", f"{base}-poster.jpg", *thumbs]


def temp_names(job_id: int, base: str) -> list[str]:
    return [f".part-{job_id}-{name}" for name in output_names(base)]


def everything_said(journal: Path, smtp: SmtpServer) -> str:
    """Every job and journal row and every email, as one text to search."""
    conn = sqlite3.connect(journal)
    try:
        rows = [
            json.dumps(list(row), default=str)
            for table in ("jobs", "operations", "uploads")
            for row in conn.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed names
        ]
    finally:
        conn.close()
    mails = [m.as_string() for m in smtp.inbox.messages]
    return "\n".join(rows + mails)


def tree(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, mode) of everything under ``folder``, links not followed."""
    return sorted(
        (str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mode)
        for p in folder.rglob("*")
    )


# --- symlink plant -----------------------------------------------------------------


def plant(folder: Path, names: list[str], target: Path) -> None:
    for name in names:
        (folder / name).symlink_to(target)


def assert_converted_by_the_user(folder: Path, base: str, user: TestUser) -> None:
    for name in output_names(base):
        st = (folder / name).lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_size > 0, name
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid), name


def test_links_planted_at_every_pipeline_name_are_never_followed_in_serve(
    serve_factory: Callable[..., Serve], secret: Secret, smtp: SmtpServer, tmp_path: Path
) -> None:
    site = serve_factory()
    home = site.home("alice")
    before = secret.state()
    (home / "converted").mkdir()
    out = owned_by(home / "converted", site.alice)
    # Job 1 (a.mp4): links at its temporary names. Job 2 (b.mp4): links at its
    # final names too, and at the temporary names of the names it then picks.
    plant(out, temp_names(1, "a"), secret.path)
    plant(out, [*output_names("b"), *temp_names(2, "b"), *temp_names(2, "b-1")], secret.path)
    client = site.gateway.sftp("alice")
    clip = make_clip(tmp_path / "c.mp4", "mp4")
    client.put(str(clip), "a.mp4")
    wait_jobs(site.gateway, settled)
    # Other content: the same bytes again would be a duplicate (jobs.dedupe_window).
    client.put(str(make_clip(tmp_path / "d.mp4", "mp4", seconds=1)), "b.mp4")
    jobs = wait_jobs(site.gateway, lambda rows: settled(rows, 2))
    assert [(j["state"], j["outcome"]) for j in jobs] == [("succeeded", "converted")] * 2, jobs

    assert secret.state() == before
    assert_converted_by_the_user(out, "a", site.alice)
    assert_converted_by_the_user(out, "b-1", site.alice)
    # The links at b's names are the user's files: left as they were.
    assert all((out / n).readlink() == secret.path for n in output_names("b"))
    assert len(smtp.inbox.messages) == 2
    assert secret.content.decode() not in everything_said(site.gateway.config.journal_path, smtp)


def test_links_planted_at_every_pipeline_name_are_never_followed_in_openssh_mode(
    site_factory: Callable[..., Site], secret: Secret, tmp_path: Path
) -> None:
    smtp = SmtpServer().start()
    try:
        site = site_factory(pipeline_settings(smtp.port))
        user = site.users[0]
        before = secret.state()
        transport, client = site.sftp(user)
        # The user plants the links themself, with the real sftp-server.
        client.mkdir("converted")
        names = [*temp_names(1, "x"), *output_names("x"), *temp_names(1, "x-1")]
        for name in names:
            client.symlink(str(secret.path), f"converted/{name}")
        out = user.home / "converted"
        assert all((out / name).readlink() == secret.path for name in names)
        client.put(str(make_clip(tmp_path / "c.mp4", "mp4")), "x.mp4")
        transport.close()
        (job,) = wait_jobs(site.gateway, settled)
        assert (job["state"], job["outcome"]) == ("succeeded", "converted"), job
        assert secret.state() == before
        assert_converted_by_the_user(out, "x-1", user)
        (message,) = smtp.inbox.messages
        assert secret.content.decode() not in message.as_string()
    finally:
        smtp.stop()


def test_output_folder_planted_as_a_link_fails_the_job_cleanly(
    serve_factory: Callable[..., Serve], secret: Secret, smtp: SmtpServer, tmp_path: Path
) -> None:
    site = serve_factory()
    home = site.home("alice")
    before = secret.state()
    (home / "converted").symlink_to(secret.path.parent)
    site.gateway.sftp("alice").put(str(make_clip(tmp_path / "c.mp4", "mp4")), "v.mp4")
    (job,) = wait_jobs(site.gateway, settled)
    assert job["state"] == "failed", job
    assert "output folder /converted is a link" in job["last_error"]
    assert secret.state() == before
    assert sorted(p.name for p in secret.path.parent.iterdir()) == ["secret"]
    assert smtp.inbox.messages == []


# --- hostile media --------------------------------------------------------------


def hls(target: str) -> bytes:
    return (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:10.0,\nfile:{target}\n#EXT-X-ENDLIST\n"
    ).encode()


def concat(target: str) -> bytes:
    return f"ffconcat version 1.0\nfile '{target}'\n".encode()


@pytest.mark.parametrize("kind", ["hls", "concat"])
@pytest.mark.parametrize("aim", ["passwd", "other-users-clip"])
def test_playlists_named_mp4_are_rejected_before_anything_opens_their_targets(
    serve_factory: Callable[..., Serve], smtp: SmtpServer, tmp_path: Path, kind: str, aim: str
) -> None:
    site = serve_factory()
    if aim == "passwd":
        target = Path("/etc/passwd")
        revealing = ["/etc/passwd", "passwd", "root:x:0:0"]
    else:
        target = private_clip(site.home("bob"), site.bob, tmp_path)
        revealing = [str(target), "private.mp4", str(site.home("bob")), "h264", "320x240"]
    before = target.read_bytes()
    body = (hls if kind == "hls" else concat)(str(target))
    local = tmp_path / "list.mp4"
    local.write_bytes(body)
    site.gateway.sftp("alice").put(str(local), "movie.mp4")
    (job,) = wait_jobs(site.gateway, settled)
    assert (job["state"], job["outcome"]) == ("succeeded", "rejected"), job
    data = json.loads(job["data"])
    assert data["rejected"] == "not a readable media file: a text file, not a video"
    assert "source" not in data  # no ffprobe report: nothing ever read the target
    assert not (site.home("alice") / "converted").exists()
    (message,) = smtp.inbox.messages
    assert message["To"] == "alice@example.org"
    said = everything_said(site.gateway.config.journal_path, smtp)
    for word in revealing:
        assert word not in said, word
    if aim != "passwd":  # /etc/passwd changes whenever a test user comes or goes
        assert target.read_bytes() == before


@pytest.mark.parametrize("kind", ["hls", "concat"])
def test_ffprobe_refuses_playlist_demuxers_even_past_the_sniff(tmp_path: Path, kind: str) -> None:
    """The second wall: were the sniff fooled, the format whitelist still refuses."""
    hidden = tmp_path / "hidden-target.mp4"
    make_clip(hidden, "mp4")
    body = (hls if kind == "hls" else concat)(str(hidden))
    assert sniff(body) is not None
    path = tmp_path / "list.mp4"
    path.write_bytes(body)
    fd = os.open(path, os.O_RDONLY)
    try:
        allowed = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska", "mpegts")
        with pytest.raises(MediaError) as caught:
            probe(fd, "ffprobe", 30, containers=allowed)
    finally:
        os.close(fd)
    assert caught.value.reason == "not a readable media file: not an allowed video format"
    assert str(hidden) not in caught.value.reason
    # Without the box the same ffprobe would read the hidden clip through the list.
    assert "-format_whitelist" in input_args(allowed)


def test_binary_media_passes_the_sniff_and_text_does_not() -> None:
    assert sniff(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00") is None
    assert sniff(b"\x1aE\xdf\xa3\x9fB\x86\x81\x01") is None
    assert sniff(b"") is not None
    for text in (b"\xef\xbb\xbf#EXTM3U\n", b"  ffconcat version 1.0", b"<?xml version='1.0'?>"):
        assert sniff(text) == "not a readable media file: a text file, not a video"
    assert sniff(b"just some words\n" * 100) is not None


# --- swaps after the CLOSE and during ffmpeg ------------------------------------------


@pytest.mark.parametrize("swap", ["link", "other-file"])
def test_upload_swapped_after_its_close_converts_nothing(
    serve_factory: Callable[..., Serve], smtp: SmtpServer, tmp_path: Path, swap: str
) -> None:
    site = serve_factory(workers=0)  # the job waits until the test starts a worker
    alice_home, bob_home = site.home("alice"), site.home("bob")
    victim = private_clip(bob_home, site.bob, tmp_path)
    bob_before = tree(bob_home)
    site.gateway.sftp("alice").put(str(make_clip(tmp_path / "c.mp4", "mp4")), "v.mp4")
    (queued,) = wait_jobs(site.gateway, lambda rows: len(rows) == 1)
    assert queued["state"] == "queued"
    # After the CLOSE reply, before any worker: a link to bob's clip takes the
    # name, or another file alice may read (only the recorded inode stops it).
    swapped = alice_home / ".swap"
    if swap == "link":
        swapped.symlink_to(victim)
        os.chown(swapped, site.alice.uid, site.alice.gid, follow_symlinks=False)
    else:
        private_clip(alice_home, site.alice, tmp_path, name=".swap")
    os.rename(swapped, alice_home / "v.mp4")
    config = site.gateway.config
    pool = site.gateway.loop.run(
        start_workers(replace(config, jobs=replace(config.jobs, workers=1)))
    )
    try:
        (job,) = wait_jobs(site.gateway, settled)
    finally:
        site.gateway.loop.run(pool.stop())
        pool.store.close()
    assert job["state"] == "failed", job
    assert job["last_error"] == "the upload was replaced or removed after it was closed"
    assert not (alice_home / "converted").exists()
    assert tree(bob_home) == bob_before
    assert smtp.inbox.messages == []
    said = everything_said(config.journal_path, smtp)
    assert str(victim) not in said and "private.mp4" not in said


def test_output_folder_swapped_for_a_link_while_ffmpeg_runs_writes_nothing_elsewhere(
    serve_factory: Callable[..., Serve], smtp: SmtpServer, tmp_path: Path
) -> None:
    # -readrate 1: ffmpeg takes as long as the clip plays, so the swap lands mid-run.
    site = serve_factory(input_args=["-readrate", "1"])
    alice_home, bob_home = site.home("alice"), site.home("bob")
    (bob_home / "films").mkdir()
    films = owned_by(bob_home / "films", site.bob)
    films.chmod(0o777)  # even a folder alice could write to gets nothing
    clip = make_clip(tmp_path / "c.mp4", "mp4", seconds=4)
    site.gateway.sftp("alice").put(str(clip), "v.mp4")
    (running,) = wait_jobs(site.gateway, lambda rows: len(rows) == 1 and rows[0]["pid"])
    os.rename(alice_home / "converted", alice_home / "converted.away")
    (alice_home / "converted").symlink_to(films)
    os.kill(running["pid"], 0)  # ffmpeg still runs: the swap happened during it
    (job,) = wait_jobs(site.gateway, settled)
    assert list(films.iterdir()) == []
    assert (job["state"], job["outcome"]) == ("succeeded", "converted"), job
    # Everything went to the folder the job opened, whatever its name is now.
    assert_converted_by_the_user(alice_home / "converted.away", "v", site.alice)
    (message,) = smtp.inbox.messages
    assert message["To"] == "alice@example.org"
