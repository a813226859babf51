"""A cluster on one machine, as separate hosts (issue 18): network namespaces on one bridge
(tests/netns_kit.py) for a PostgreSQL host, two gateway hosts (`sftpgate serve`, no workers),
two worker hosts (`sftpgate worker`) and a HAProxy host (Debian's haproxy, TCP mode,
roundrobin, `send-proxy-v2`, plain TCP health checks). Every process runs in its own
namespace with its own address; the client (paramiko, from a known root-namespace address)
reaches only HAProxy. The homes are one folder on the local disk, standing in for the shared
NFS mount every gateway and worker host would have; SMTP is a real aiosmtpd on the root
namespace's bridge address.

It shows: uploads spread over both gateways, journaled once each in one PostgreSQL journal
with the client's own address (never HAProxy's); jobs spread over both workers; a worker
SIGKILLed mid-transcode has its job finished by the other with exactly one email; a gateway
SIGKILLed is taken out by HAProxy's health check and new sessions go through the other.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from aiosmtpd.controller import Controller

from conftest import PASSWORDS, free_port, need_tool, write_config
from mediakit import make_clip
from netns_kit import HostProcess, Lab, start_postgres
from pipeline_kit import Inbox, pipeline_settings
from sftpgate.jobs.model import Job
from sftpgate.storage.postgres.backend import PostgresBackend

HOSTS = ("db", "gw1", "gw2", "w1", "w2", "lb")
PORT = 2222  # every host has its own port space
LEASE = 3.0  # jobs.lease_seconds: a dead worker's job is taken over within a few seconds
SERVE = [sys.executable, "-m", "sftpgate", "serve", "--config"]
WORKER = [sys.executable, "-m", "sftpgate", "worker", "--config"]
JOB_LINE = re.compile(r"job (\d+): .* \(attempt (\d+)\)")


def _host_configs(
    tmp: Path, keys: dict[str, Path], lab: Lab, url: str, smtp_port: int
) -> dict[str, Path]:
    """One config.yaml per gateway and worker host: its own address, node name and state;
    one database, one SMTP server and one folder of homes (the "NFS mount") for all."""
    extra = pipeline_settings(smtp_port, input_args=["-readrate", "1"])  # ffmpeg runs as long
    extra["smtp"]["host"] = lab.root_address  # as the clip plays, so a kill lands mid-run
    extra["jobs"].update(lease_seconds=LEASE, dedupe_window=0)  # one clip, several names
    extra["database"] = {"url": url}
    base = yaml.safe_load(write_config(tmp, keys, extra).read_text())
    nfs = tmp / "nfs" / "homes"
    paths = {}
    for host in ("gw1", "gw2", "w1", "w2"):
        cfg = copy.deepcopy(base)
        folder = tmp / host
        folder.mkdir()
        cfg["server"].update(
            listen=lab.address(host),
            port=PORT,
            node=host,
            state_dir=str(folder / "state"),
            host_keys_dir=str(folder / "hostkeys"),
        )
        if host.startswith("gw"):
            cfg["server"]["proxy_protocol_from"] = [f"{lab.address('lb')}/32"]
            cfg["jobs"]["workers"] = 0  # the gateways only hand jobs over
        else:
            cfg["jobs"]["workers"] = 1
        for user in cfg["users"]:
            user["home"] = str(nfs / user["login"])
        paths[host] = folder / "config.yaml"
        paths[host].write_text(yaml.safe_dump(cfg))
    return paths


def _haproxy_config(tmp: Path, lab: Lab) -> tuple[Path, Path]:
    sock = tmp / "haproxy.sock"
    servers = "".join(
        # A plain TCP check: connect and close, not a byte; the gateway neither journals nor
        # scores it, so the balancer is never banned.
        f"  server {gw} {lab.address(gw)}:{PORT} send-proxy-v2 check inter 300 fall 2 rise 1\n"
        for gw in ("gw1", "gw2")
    )
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        f"global\n  maxconn 200\n  stats socket {sock} mode 600 level user\n"
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout check 2s\n"
        "  timeout client 60s\n  timeout server 60s\n"
        f"frontend sftp\n  bind {lab.address('lb')}:{PORT}\n  default_backend gateways\n"
        f"backend gateways\n  balance roundrobin\n{servers}"
    )
    return cfg, sock


def _server_status(sock: Path) -> dict[str, str]:
    """HAProxy's view of each gateway ("UP", "DOWN", …), from its stats socket (empty while
    HAProxy is not yet answering there)."""
    data = b""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"show stat\n")
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return {}
    lines = data.decode().splitlines() or [""]
    header = lines[0].lstrip("# ").split(",")
    status: dict[str, str] = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "gateways" and row.get("svname", "").startswith("gw"):
            status[row["svname"]] = row["status"]
    return status


def _wait(what: str, check: Any, timeout: float, interval: float = 0.1) -> Any:
    """``check()``'s first true value; fails naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)  # polling for a condition, bounded by the deadline
    return value


def _upload(lab: Lab, local: Path, name: str) -> paramiko.PKey:
    """One SFTP session through HAProxy, from the client's address: upload ``name``; the
    host key the session saw."""
    sock = socket.create_connection(
        (lab.address("lb"), PORT), timeout=20, source_address=(lab.client_address, 0)
    )
    t = paramiko.Transport(sock)
    try:
        t.connect(username="alice", password=PASSWORDS["alice"])
        client = paramiko.SFTPClient.from_transport(t)
        assert client is not None
        client.put(str(local), f"/{name}")
        return t.get_remote_server_key()
    finally:
        t.close()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
    return found


def _ran(worker: HostProcess) -> dict[int, int]:
    """job id → highest attempt this worker started, from its log."""
    runs: dict[int, int] = {}
    for line in list(worker.lines):
        if found := JOB_LINE.search(line):
            job, attempt = int(found[1]), int(found[2])
            runs[job] = max(attempt, runs.get(job, 0))
    return runs


# ~40 s here; pytest's default 120 s would cut it off mid-run on a loaded machine, where
# each wait below fails on its own bound first (and the ExitStack still cleans up).
@pytest.mark.timeout(300)
def test_a_cluster_of_namespaced_hosts_behind_haproxy_spreads_survives_kills_and_journals_once(
    tmp_path: Path, user_keys: dict[str, Path]
) -> None:
    haproxy = need_tool("haproxy", "apt-get install haproxy")
    clip = make_clip(tmp_path / "clip.mp4", "mp4", seconds=2)
    long_clip = make_clip(tmp_path / "long.mp4", "mp4", seconds=8)
    lab = Lab(HOSTS)
    with contextlib.ExitStack() as stack:
        lab.open()
        stack.callback(lab.close)
        db = start_postgres(lab, "db")
        stack.callback(db.stop)
        db.admin("CREATE DATABASE sftpgate")
        url = db.url("sftpgate")
        backend = PostgresBackend(url, size=2)
        stack.callback(backend.close)
        backend.migrate()
        inbox = Inbox()
        smtp = Controller(inbox, hostname=lab.root_address, port=free_port())
        smtp.start()
        stack.callback(smtp.stop)
        configs = _host_configs(tmp_path, user_keys, lab, url, smtp.port)

        def run(host: str, argv: list[str]) -> HostProcess:
            process = HostProcess(lab, host, argv)
            stack.callback(process.stop, 15)
            return process

        gw1 = run("gw1", [*SERVE, str(configs["gw1"])])
        gw1.wait_line("listening on", 60)
        # Every gateway serves the same host keys (docs/deploy.md): gw1 made them.
        shutil.copytree(tmp_path / "gw1" / "hostkeys", tmp_path / "gw2" / "hostkeys")
        gw2 = run("gw2", [*SERVE, str(configs["gw2"])])
        workers = {host: run(host, [*WORKER, str(configs[host])]) for host in ("w1", "w2")}
        gw2.wait_line("listening on", 60)
        for worker in workers.values():
            worker.wait_line(r"workers \(", 60)
        cfg, stats = _haproxy_config(tmp_path, lab)
        lb = run("lb", [haproxy, "-db", "-f", str(cfg)])
        _wait(
            "HAProxy to see both gateways up",
            lambda: _server_status(stats) == {"gw1": "UP", "gw2": "UP"},
            30,
        )
        store = backend.jobs()

        def job_of(name: str) -> Job:
            return _wait(
                f"the job of {name}",
                lambda: next((j for j in store.list(limit=100) if j.path.endswith(name)), None),
                30,
            )

        def finished(names: list[str]) -> list[Job]:
            def done() -> list[Job] | None:
                jobs = [job_of(n) for n in names]
                return None if any(j.state.value in ("queued", "running") for j in jobs) else jobs

            return _wait(f"the jobs of {names}", done, 120, interval=0.2)

        # 1. Parallel uploads: roundrobin spreads the sessions, Procrastinate the jobs.
        first = [f"clip{i}.mp4" for i in range(4)]
        with ThreadPoolExecutor(len(first)) as pool:
            keys = list(pool.map(lambda name: _upload(lab, clip, name), first))
        assert len({k.asbytes() for k in keys}) == 1  # one host key behind the balancer
        jobs = finished(first)
        assert all((j.state.value, j.outcome) == ("succeeded", "converted") for j in jobs), jobs
        ran = {host: _ran(w) for host, w in workers.items()}
        assert all(ran[host] for host in workers), ran  # each worker ran at least one job
        assert sorted(ran["w1"] | ran["w2"]) == sorted(j.id for j in jobs)
        assert not set(ran["w1"]) & set(ran["w2"]), ran  # and none ran on both

        # 2. The worker running a long transcode is SIGKILLed; the other finishes it.
        _upload(lab, long_clip, "long.mp4")
        job = _wait(
            "ffmpeg to start on the long clip",
            lambda: (j := job_of("long.mp4")).pid_marker and j.lease_owner and j,
            60,
        )
        assert job.lease_owner is not None and job.pid_marker is not None
        victim = job.lease_owner.split(":", 1)[0]  # worker ids are node:pid:random
        (survivor,) = set(workers) - {victim}
        assert _processes_with(job.pid_marker), "ffmpeg should be running"
        workers[victim].kill()
        # Its ffmpeg dies with it (PR_SET_PDEATHSIG), on its own host.
        _wait("the dead worker's ffmpeg to end", lambda: not _processes_with(job.pid_marker), 15)
        (long_job,) = finished(["long.mp4"])
        assert (long_job.state.value, long_job.outcome, long_job.email_state.value) == (
            "succeeded",
            "converted",
            "sent",
        ), long_job
        assert long_job.attempts == 2
        assert _ran(workers[survivor]).get(long_job.id) == 2, workers[survivor].log()[-3000:]
        assert (tmp_path / "nfs" / "homes" / "alice" / "converted" / "long.flv").stat().st_size

        # 3. gw1 is SIGKILLed: HAProxy's health check takes it out; new sessions reach gw2.
        gw1.kill()
        _wait("HAProxy to mark gw1 down", lambda: _server_status(stats).get("gw1") == "DOWN", 30)
        after = ["after0.mp4", "after1.mp4"]
        for name in after:
            _upload(lab, clip, name)
        finished(after)

        # One journal: every upload once, every session from the client's own address.
        names = [*first, "long.mp4", *after]
        with backend._pool.connection() as conn:
            uploads = conn.execute(
                "SELECT u.path, s.node, s.remote_addr FROM uploads u"
                " JOIN sessions s ON s.id = u.session_id ORDER BY u.id"
            ).fetchall()
            sessions = conn.execute(
                "SELECT node, remote_addr FROM sessions WHERE login = 'alice'"
            ).fetchall()
            balancer_rows = conn.execute(
                "SELECT (SELECT count(*) FROM sessions WHERE remote_addr = %(lb)s)"
                " + (SELECT count(*) FROM operations WHERE remote_addr = %(lb)s) AS n",
                {"lb": lab.address("lb")},
            ).fetchone()
        assert Counter(Path(u["path"]).name for u in uploads) == Counter(names), uploads
        by_name = {Path(u["path"]).name: u for u in uploads}
        assert {by_name[n]["node"] for n in first} == {"gw1", "gw2"}  # spread over both
        assert {by_name[n]["node"] for n in after} == {"gw2"}  # gw1 is gone
        assert len(sessions) == len(names)  # health checks made none
        assert {s["remote_addr"] for s in sessions} == {lab.client_address}
        assert balancer_rows is not None and balancer_rows["n"] == 0
        jobs = finished(names)
        assert len(store.list(limit=100)) == len(names)
        assert all(j.email_state.value == "sent" for j in jobs), jobs
        subjects = [str(m["Subject"]) for m in inbox.messages]
        assert Counter(n for s in subjects for n in names if n in s) == Counter(names), subjects
        assert len(subjects) == len(names)  # exactly one email per upload, none doubled

        assert workers[survivor].stop() == 0
        assert gw2.stop() == 0
        lb.stop()
