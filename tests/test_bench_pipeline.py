"""Smoke test of bench/scenarios/pipeline.py (figure 8): a tiny clip, one round, correctness."""

from __future__ import annotations

import math
import os
import time

import pytest

from bench.common import SMOKE
from bench.scenarios import pipeline
from bench.servers import running_servers


# bench/servers.py leaves each `sftpgate serve` stderr pipe for the garbage collector
@pytest.mark.filterwarnings("ignore:unclosed file <_io.TextIOWrapper:ResourceWarning")
def test_pipeline_figure_smoke() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the pipeline benchmark creates a system user and runs a private sshd: "
            "run this test as root"
        )
    start = time.monotonic()
    with running_servers() as servers:
        figures = pipeline.run(servers, SMOKE)
        converted = servers.workdir / "pipeline-home" / "converted"
        on_disk = sorted(p.name for p in converted.glob("*.flv") if p.stat().st_size > 0)
    elapsed = time.monotonic() - start

    assert [f.number for f in figures] == [8]
    fig = figures[0]
    assert math.isfinite(fig.value) and fig.value > 0, fig
    assert fig.target == "<= 1.05"
    assert isinstance(fig.met, bool)
    assert fig.measured.strip() and fig.notes.strip()

    per_pair = SMOKE.rounds + SMOKE.warmup
    names = [f"clip{i}.flv" for i in range(1, per_pair + 1)]
    assert fig.extra["emails"] == per_pair
    assert fig.extra["jobs"] == per_pair
    assert fig.extra["flvs"] == names
    assert on_disk == names
    assert len(fig.extra["a_seconds"]) == len(fig.extra["b_seconds"]) == SMOKE.rounds
    assert all(t > 0 for t in fig.extra["a_seconds"] + fig.extra["b_seconds"])
    phases = fig.extra["a_phases_median"]
    assert {"pickup", "probe", "transcode", "sidecar", "email+finish"} <= set(phases)
    assert phases["transcode"] > 0
    argv = fig.extra["bare_argv"]
    assert argv[argv.index("-f", argv.index("-c:v")) + 1] == "flv"
    assert "add_keyframe_index" in argv
    assert elapsed < 40, f"the smoke run took {elapsed:.1f} s"
