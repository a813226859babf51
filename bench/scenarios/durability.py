"""Figure 13: what ``journal.synchronous: full`` costs small uploads that start jobs.

13. many small ``*.mp4`` uploads in one ``sftp`` session (each one's CLOSE
    waits for its upload and job to commit), files/s, a gateway with
    ``synchronous: full`` ÷ one with ``normal``. Under full each such upload
    is fsync'd before the commit, and each commit is fsync'd; under normal
    neither is (the CLOSE still waits for the commit, to the page cache).

Both gateways are started for the figure, with the pipeline on and no
workers: the job rows are made but never run, so only the upload path is
timed. They serve the same home (see figure 9), emptied after every round.
"""

from __future__ import annotations

import shutil

from ..common import Figure, Options
from ..servers import Servers, extra_gateway
from .transfer import _make_file, _rate_figure, _small_upload

SECTIONS = {"pipeline": {"enabled": True}, "jobs": {"workers": 0}}


def run(servers: Servers, options: Options) -> list[Figure]:
    if not options.wants(13):
        return []
    src = servers.workdir / "durability-src"
    src.mkdir()
    try:
        size = options.small_kib * 1024
        clips = [_make_file(src / f"clip-{i:05d}.mp4", size) for i in range(options.small_files)]
        with (
            extra_gateway(
                servers, "sync-full", shared_home=True, journal={"synchronous": "full"}, **SECTIONS
            ) as full,
            extra_gateway(
                servers,
                "sync-normal",
                shared_home=True,
                journal={"synchronous": "normal"},
                **SECTIONS,
            ) as normal,
        ):
            return [
                _rate_figure(
                    13,
                    f"durability cost: {options.small_files} x {options.small_kib} KiB uploads "
                    "that start jobs, journal synchronous full ÷ normal",
                    full,
                    normal,
                    _small_upload(servers, clips),
                    clips,
                    options,
                    unit="files/s",
                    per=len(clips),
                    target=">= 0.3",
                    notes="both sides sftpgate, OpenSSH sftp client, one session; *.mp4 names "
                    "with the pipeline on and no workers (each CLOSE waits for its upload and "
                    "job rows to commit; the jobs never run). full: each upload fsync'd at its "
                    "CLOSE and each commit fsync'd; normal: neither. Target ours (the issue "
                    "sets none): what the OK-means-on-disk promise may cost this worst case "
                    "(tiny files, one at a time, each its own commit)",
                )
            ]
    finally:
        shutil.rmtree(src, ignore_errors=True)
