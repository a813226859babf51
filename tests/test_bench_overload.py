"""Smoke test of figure 16 (memory under overload) at SMOKE sizes: right, not fast."""

from __future__ import annotations

import math

from bench.common import SMOKE
from bench.scenarios import overload
from bench.servers import running_servers


def test_overload_figure_16_measures_both_gateways_and_loses_no_upload() -> None:
    with running_servers() as servers:
        figures = overload.run(servers, SMOKE)
        assert list(servers.sftpgate.home.iterdir()) == []  # cleaned up after itself

    assert [f.number for f in figures] == [16]
    (figure,) = figures
    assert math.isfinite(figure.value) and figure.value > 0
    assert isinstance(figure.met, bool)  # the target parses
    extra = figure.extra
    assert len(extra["peak_mb"]) == len(extra["unbounded_peak_mb"]) == SMOKE.overload_rounds
    assert all(rate > 0 for rate in extra["mb_s"] + extra["unbounded_mb_s"])
    # (every upload is checked byte count by byte count inside run())
    assert extra["sessions"] == SMOKE.overload_sessions
