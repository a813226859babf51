"""Smoke test of bench/scenarios/transfer.py: tiny sizes, one round, correctness only."""

from __future__ import annotations

import math
import os

import pytest

from bench.common import SMOKE
from bench.scenarios import transfer
from bench.servers import Endpoint, clean_home, running_servers


# bench/servers.py leaves each `sftpgate serve` stderr pipe for the garbage collector
def test_transfer_figures_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the transfer benchmark creates a system user and runs a private sshd: "
            "run this test as root"
        )
    seen: dict[str, list[dict[str, int]]] = {}

    def recording_clean(endpoint: Endpoint) -> None:
        # what each round left in the home, just before the scenario empties it
        files = {p.name: p.stat().st_size for p in endpoint.home.iterdir() if p.is_file()}
        seen.setdefault(endpoint.name, []).append(files)
        clean_home(endpoint)

    monkeypatch.setattr(transfer, "clean_home", recording_clean)
    with running_servers() as servers:
        figures = transfer.run(servers, SMOKE)
        homes = [servers.sftpgate.home, servers.openssh.home]
        assert all(not any(home.iterdir()) for home in homes), "a round left files behind"

    assert sorted(f.number for f in figures) == [1, 2, 2, 3, 9]
    titles = [f.title for f in figures if f.number == 2]
    assert any("paramiko" in t for t in titles) and any("asyncssh" in t for t in titles)
    for fig in figures:
        assert math.isfinite(fig.value) and fig.value > 0, fig
        assert fig.measured.strip(), fig
        assert fig.target.startswith(">= "), fig
        assert isinstance(fig.met, bool)

    # rounds per endpoint: figure 1 + two of figure 2 + figure 3; figure 9 has its own two
    per_pair = SMOKE.rounds + SMOKE.warmup
    big = SMOKE.big_mib * 1024 * 1024
    small = SMOKE.small_kib * 1024
    small_names = {f"small-{i:05d}" for i in range(SMOKE.small_files)}
    assert len(seen["openssh"]) == 4 * per_pair
    assert len(seen["sftpgate"]) == 4 * per_pair
    assert len(seen["journal"]) == per_pair
    assert len(seen["nojournal"]) == per_pair
    for name, rounds in seen.items():
        for files in rounds:
            uploads = {n: s for n, s in files.items() if n == transfer.BIG or n in small_names}
            if transfer.BIG in uploads:
                assert uploads == {transfer.BIG: big}, (name, uploads)
            else:
                assert uploads == dict.fromkeys(small_names, small), (name, uploads)
    big_rounds = sum(transfer.BIG in files for files in seen["openssh"])
    assert big_rounds == 3 * per_pair
