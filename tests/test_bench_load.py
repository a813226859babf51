"""Smoke tests of the load benchmarks (figures 4-7) at SMOKE sizes: right, not fast.

One pair of servers (private sshd + ``sftpgate serve``) for the whole module;
each scenario's ``run()`` must return its figures with finite values, lose no
session and no upload, and journal exactly what it was given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest

from bench.common import SMOKE, Figure, interleave
from bench.scenarios import concurrency, journal, latency
from bench.servers import Servers, running_servers


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with running_servers() as running:
        yield running


def check_figures(figures: list[Figure], numbers: list[int]) -> None:
    assert [f.number for f in figures] == numbers
    for figure in figures:
        assert math.isfinite(figure.value), figure
        assert figure.title and figure.measured and figure.target
        assert isinstance(figure.met, bool)  # the target parses


def test_concurrency_figures_4_5_and_17(servers: Servers) -> None:
    figures = concurrency.run(servers, SMOKE)

    check_figures(figures, [4, 4, 5, 5, 17])
    throughput, memory4, failures, memory5, processes = figures
    assert throughput.value > 0
    assert len(throughput.extra["sftpgate_mb_s"]) == SMOKE.rounds
    assert len(throughput.extra["openssh_mb_s"]) == SMOKE.rounds
    assert all(rate > 0 for rate in throughput.extra["sftpgate_mb_s"])
    assert memory4.value > 0 and memory4.extra["openssh_peak_mb"] > 0
    # (every upload of figure 4 is checked byte-count by byte-count inside run())
    assert failures.value == 0, failures.extra["errors"]
    assert failures.extra["arrived"] == SMOKE.many
    assert failures.extra["uploaded"] == SMOKE.many
    assert failures.extra["peak_open"] == SMOKE.many  # they really overlapped
    assert memory5.value > 0
    # Figure 17: the same load against server.processes N and 1 (uploads checked inside run()).
    assert len(processes.extra["processes_mb_s"]) == SMOKE.rounds
    assert all(rate > 0 for rate in processes.extra["one_process_mb_s"])
    assert list(servers.sftpgate.home.iterdir()) == []  # cleaned up after itself


def test_latency_figure_6(servers: Servers) -> None:
    figures = latency.run(servers, SMOKE)

    check_figures(figures, [6])
    (figure,) = figures
    extra = figure.extra
    assert extra["uploads"] == SMOKE.latency_uploads
    assert extra["jobs"] == SMOKE.latency_uploads + SMOKE.warmup  # every upload made a job
    assert extra["states"] == ["succeeded"]  # rejected (not a video) is a finished job
    assert len(extra["start_ms"]) == SMOKE.latency_uploads
    assert all(math.isfinite(v) for v in extra["start_ms"] + extra["commit_ms"])
    # the job row commits before the CLOSE reply, so it is never written after it
    assert all(v <= 0 for v in extra["commit_ms"])
    assert all(v > 0 for v in extra["start_from_sent_ms"])


def test_journal_figure_7(servers: Servers) -> None:
    figures = journal.run(servers, SMOKE)

    check_figures(figures, [7, 7])
    writes, query = figures
    assert writes.value > 0
    assert writes.extra["rows"] == SMOKE.journal_ops  # every event committed, once
    assert query.extra["rows"] == SMOKE.journal_rows == query.extra["inserted"]
    assert query.extra["exit_code"] == 0
    assert query.extra["matched"] > 0
    assert query.extra["printed"] == query.extra["matched"]
    assert query.extra["printed_ok"]
    assert 0 < query.value < 10


def test_interleaved_rounds_alternate_who_goes_first() -> None:
    calls: list[str] = []

    def side(name: str) -> Callable[[], float]:
        def run() -> float:
            calls.append(name)
            return float(len(calls))

        return run

    kept_a, kept_b = interleave(side("A"), side("B"), rounds=4, warmup=1)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A"]
    # each side's values, warm-up dropped, in round order
    assert kept_a == [3.0, 6.0, 7.0, 10.0]
    assert kept_b == [4.0, 5.0, 8.0, 9.0]
