"""Hosts on one machine: Linux network namespaces joined to one bridge, for cluster tests.

:class:`Lab` makes one network namespace per host, each with its own ``eth0``
(one end of a veth pair, the other end on a bridge in the root namespace), its
own loopback, its own address on a private /24 and so its own port space. The
root namespace has two addresses on the bridge too: ``.1`` (where the test runs
its own servers, e.g. SMTP) and ``.2`` (the client). Every name carries a random
tag, so runs never collide; :meth:`Lab.close` removes everything it made, and
the test calls it in ``finally``.

A process runs "on" a host with ``ip netns exec NAME argv…`` (an argument list,
no shell); ``ip`` execs the program in place, so the child's pid is the
program's own and a signal to it reaches the program. Only the network is
separate: the filesystem, pids and users are the machine's, so folders on the
local disk stand in for a shared NFS mount. Needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN): without it :func:`Lab.open` fails the test, never skips it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import pg_kit

IP = "ip"


def _ip(*args: str) -> None:
    done = subprocess.run([IP, *args], capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 no interface of the root namespace is on."""
    shown = subprocess.run(
        [IP, "-4", "-o", "addr"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    used = [ipaddress.ip_interface(m) for m in re.findall(r"inet (\S+)", shown)]
    for _ in range(100):
        net = ipaddress.ip_network(
            f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}.0/24"
        )
        if not any(iface.network.overlaps(net) for iface in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24")


@dataclass
class Lab:
    """A bridge and one namespace per host; ``address(host)`` is the host's IPv4 address."""

    hosts: Sequence[str]
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    _made_bridge: bool = False
    _made: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"sgb{self.tag}"

    @property
    def root_address(self) -> str:
        """The root namespace on the bridge: where the test's own servers listen."""
        return str(self.subnet[1])

    @property
    def client_address(self) -> str:
        """A second root-namespace address on the bridge: the client's source address."""
        return str(self.subnet[2])

    def namespace(self, host: str) -> str:
        return f"sg{self.tag}-{host}"

    def address(self, host: str) -> str:
        return str(self.subnet[10 + list(self.hosts).index(host)])

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host`` (in its namespace)."""
        return [IP, "netns", "exec", self.namespace(host), *argv]

    def open(self) -> Lab:
        if os.geteuid() != 0:
            pytest.fail("network namespaces need root: run the suite as root (CI does)")
        if shutil.which(IP) is None:
            pytest.fail("`ip` is missing: apt-get install iproute2 (scripts/setup.sh does this)")
        try:
            self._open()
        except Exception:
            self.close()
            raise
        return self

    def _open(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        for address in (self.root_address, self.client_address):
            _ip("addr", "add", f"{address}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts):
            ns = self.namespace(host)
            outside, inside = f"sg{self.tag}{i}", f"sg{self.tag}{i}p"
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "link", "set", inside, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/{prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Remove every namespace (its veth end goes with it, and so the bridge's) and the
        bridge; goes on past a failure and raises the first at the end."""
        errors: list[Exception] = []
        for ns in reversed(self._made):
            try:
                _ip("netns", "del", ns)
            except Exception as error:  # keep removing the rest
                errors.append(error)
        self._made.clear()
        if self._made_bridge:
            try:
                _ip("link", "del", self.bridge)
                self._made_bridge = False
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]


class HostProcess:
    """A program run on a lab host; its stderr lines are kept (and its stdout, merged)."""

    def __init__(self, lab: Lab, host: str, argv: Sequence[str]) -> None:
        self.host = host
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            lab.argv(host, argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first log line matching ``pattern``; fails past ``timeout`` or if it exits."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                found = compiled.search(line)
                if found:
                    return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.host}: no {pattern!r} (exit {self.proc.poll()}): {self.log()[-3000:]}"
                )
            time.sleep(0.05)  # waiting for a log line, bounded by the deadline

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL past ``timeout``; the exit status of the SIGTERM (None: it had
        to be killed)."""
        status: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return status


@dataclass
class HostPostgres:
    """PostgreSQL on a lab host: listening on the host's address, trusting the lab's /24."""

    lab: Lab
    host: str
    root: Path
    port: int = 5432  # the host's own port space

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{pg_kit.USER}@{self.lab.address(self.host)}:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())

    def stop(self) -> None:
        subprocess.run(
            pg_kit._as_server(
                [
                    str(pg_kit.BIN / "pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "immediate",
                    "stop",
                ]
            ),
            capture_output=True,
            check=False,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(lab: Lab, host: str) -> HostPostgres:
    """initdb, then pg_ctl start inside ``host``'s namespace (as ``postgres`` when root), on a
    fresh folder in the temp dir (pytest's own is private to root); :meth:`HostPostgres.stop`
    removes it."""
    for tool in ("initdb", "pg_ctl"):
        if not (pg_kit.BIN / tool).is_file():
            pytest.fail(f"PostgreSQL's {tool} is not in {pg_kit.BIN}: run `{pg_kit.INSTALL}`")
    root = Path(tempfile.mkdtemp(prefix="sftpgate-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = HostPostgres(lab, host, root)
    data = root / "data"
    initdb = [str(pg_kit.BIN / "initdb"), "-D", str(data), "-U", pg_kit.USER, "--auth=trust"]
    initdb += ["--encoding=UTF8", "--no-sync", "--no-instructions"]
    try:
        subprocess.run(pg_kit._as_server(initdb), capture_output=True, check=True, timeout=120)
    except subprocess.CalledProcessError as error:
        server.stop()
        pytest.fail(f"initdb failed: {error.stderr!r}")
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {lab.subnet} trust\n")  # the lab's hosts, nobody else
    options = (
        f"-p {server.port} -c listen_addresses={lab.address(host)} -k {root}"
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    start = [str(pg_kit.BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options]
    start += ["-w", "-t", "60", "start"]
    done = subprocess.run(
        lab.argv(host, pg_kit._as_server(start)), capture_output=True, text=True, timeout=90
    )
    if done.returncode != 0:
        log = root / "log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        server.stop()
        pytest.fail(f"PostgreSQL did not start on {host}: {done.stderr} {tail}")
    return server
