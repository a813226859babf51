"""Smoke test of bench/scenarios/requests.py (figures 14 and 15): tiny sizes, correctness only."""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3

import pytest

from bench.common import SMOKE
from bench.scenarios import requests, transfer
from bench.servers import Endpoint, clean_home, running_servers


def test_request_figures_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the requests benchmark creates a system user and runs a private sshd: "
            "run this test as root"
        )
    uploaded: dict[str, list[dict[str, int]]] = {}

    def recording_clean(endpoint: Endpoint) -> None:
        # what each upload round left in the home (useradd's dot files aside)
        files = {
            p.name: p.stat().st_size
            for p in endpoint.home.iterdir()
            if p.is_file() and not p.name.startswith(".")
        }
        uploaded.setdefault(endpoint.name, []).append(files)
        clean_home(endpoint)

    monkeypatch.setattr(transfer, "clean_home", recording_clean)
    with running_servers() as servers:
        figures = requests.run(servers, SMOKE)
        left = [p.name for p in servers.sftpgate.home.iterdir() if not p.name.startswith(".")]
        assert left == [], "a round left files behind"
        assert not (servers.workdir / "requests-dst").exists()
        journal = servers.config.parent / "state" / "journal.sqlite3"
        with contextlib.closing(sqlite3.connect(journal)) as db:
            rows = db.execute("SELECT path, bytes, state FROM uploads").fetchall()

    assert [f.number for f in figures] == [14, 14, 14, 14, 15]
    for fig in figures:
        assert math.isfinite(fig.value) and fig.value > 0, fig
        assert fig.target == ">= 1.0" and isinstance(fig.met, bool)
        kept = SMOKE.rounds
        assert len(fig.extra["sftpgate"]) == len(fig.extra["openssh"]) == kept
        assert all(s > 0 for s in fig.extra["sftpgate"] + fig.extra["openssh"]), fig
        # the transfer is timed inside the session: shorter than the whole run
        for side in ("sftpgate", "openssh"):
            assert len(fig.extra["whole"][side]) == kept
            pairs = zip(fig.extra[side], fig.extra["whole"][side], strict=True)
            assert all(t < w for t, w in pairs), fig
    titles = [f.title for f in figures[:4]]
    assert ["up:" in t for t in titles] == [True, False, True, False]
    assert "sftp -B 512 -R 64" in titles[0] and "sftp -B 5 -R 10" in titles[2]

    per_pair = SMOKE.rounds + SMOKE.warmup
    count = SMOKE.pipelined_requests
    want = [
        {f"pipelined-{block}-{outstanding}.bin": count * block}
        for block, outstanding in requests.SHAPES
        for _ in range(per_pair)
    ]
    assert uploaded == {"sftpgate": want, "openssh": want}
    # one complete upload row per upload round on sftpgate's side, with its size
    assert rows == [(f"/{n}", size, "complete") for files in want for n, size in files.items()]
