"""Figure 7: the journal's write rate and ``sftpgate journal``'s query time.

- Writes: a :class:`~sftpgate.journal.writer.JournalWriter` driven directly in
  this process, ``synchronous="full"``: ``options.journal_ops`` realistic events
  (built beforehand) are emitted as fast as the loop can, and the clock stops
  when the writer has committed the last of them. Value: events committed/s.
- Query: a journal of ``options.journal_rows`` operations (several users,
  sessions, ops, up to 30 days), inserted directly with ``executemany``; then
  ``sftpgate journal --user u7 --op close --since <1 day before the newest>
  --json`` through the CLI's ``main()`` with stdout sent to /dev/null. Value:
  the median seconds of a few runs (first run included in the list, not kept).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sftpgate.cli.main import main as sftpgate_main
from sftpgate.events import Event, Op, SessionInfo, UploadState
from sftpgate.journal.store import connect
from sftpgate.journal.writer import JournalWriter

from ..common import Figure, Options, median
from ..servers import Servers

USERS = 20
DAYS = 30  # the span of a full-size journal; smaller ones span less (rows_per_day)
ROWS_PER_DAY = 30_000
QUERY_RUNS = 5
WRITE_TIMEOUT = 600.0

# op -> weight in the generated journal (a transfer is open + writes + close)
_OP_WEIGHTS = {
    "open": 20,
    "close": 20,
    "stat": 14,
    "realpath": 8,
    "list": 10,
    "login": 4,
    "logout": 4,
    "rename": 4,
    "remove": 4,
    "mkdir": 2,
    "setstat": 6,
    "fsync": 2,
    "login_failed": 1,
    "read": 1,
}


def _events(count: int) -> list[Event]:
    """``count`` events shaped like real sessions: log in, look around, upload, log out."""
    pattern: list[tuple[Op, dict[str, Any]]] = [
        (Op.LOGIN, {}),
        (Op.REALPATH, {"path": "/"}),
        (Op.LIST, {"path": "/", "attrs": {"entries": 12}}),
        (Op.STAT, {"path": "/incoming"}),
        (Op.OPEN, {"path": "/incoming/clip.mp4", "flags": 0x1A, "mode": 0o644}),
        (
            Op.CLOSE,
            {
                "path": "/incoming/clip.mp4",
                "bytes_written": 52_428_800,
                "duration": 1.7,
                "upload": UploadState.COMPLETE,
            },
        ),
        (Op.SETSTAT, {"path": "/incoming/clip.mp4", "attrs": {"mtime": 1_700_000_000}}),
        (Op.RENAME, {"path": "/incoming/clip.mp4", "path2": "/incoming/clip-1.mp4"}),
        (Op.STAT, {"path": "/missing", "status": "no_such_file", "message": "not found"}),
        (Op.LOGOUT, {}),
    ]
    sessions = [
        SessionInfo(
            id=f"bench-{n:06d}",
            remote_addr="192.0.2.10",
            remote_port=40000 + n % 20000,
            login=f"u{n % USERS}",
            client_version="SSH-2.0-bench",
            auth_method="publickey",
        )
        for n in range(count // len(pattern) + 1)
    ]
    now = time.time()
    events = []
    for index in range(count):
        op, fields = pattern[index % len(pattern)]
        session = sessions[index // len(pattern)]
        if "path" in fields:
            fields = {**fields, "path": fields["path"].replace("clip", f"clip{index}")}
        if "path2" in fields:
            fields = {**fields, "path2": fields["path2"].replace("clip", f"clip{index}")}
        events.append(Event(op, session, time=now + index * 1e-6, **fields))
    return events


def drive(writer: JournalWriter, count: int) -> tuple[float, int]:
    """Start ``writer``, emit ``count`` events (built first) back to back, wait until the last
    is committed, close it; return (seconds from the first emit to that commit, batches)."""
    events = _events(count)
    writer.start()
    try:
        start = time.perf_counter()
        for event in events:
            writer.emit(event)
        deadline = time.monotonic() + WRITE_TIMEOUT
        while writer.committed < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"journal writer committed {writer.committed} of {count} in {WRITE_TIMEOUT} s"
                )
            time.sleep(0.0005)
        return time.perf_counter() - start, writer.batches
    finally:
        writer.close(WRITE_TIMEOUT)


def measure_writes(path: Path, count: int) -> tuple[float, int, int]:
    """Return (seconds, rows in the operations table, batches) for ``count`` events."""
    seconds, batches = drive(JournalWriter(path, synchronous="full"), count)
    conn = connect(path, readonly=True)
    try:
        rows = int(conn.execute("SELECT count(*) FROM operations").fetchone()[0])
    finally:
        conn.close()
    return seconds, rows, batches


def days_for(rows: int) -> int:
    """Days a generated journal spans: 30 for a million rows, never less than 2."""
    return max(2, min(DAYS, rows // ROWS_PER_DAY))


def build_journal(path: Path, rows: int, *, seed: int = 7) -> tuple[int, float]:
    """Fill a new journal with ``rows`` operations; return (rows, newest ts)."""
    rng = random.Random(seed)  # noqa: S311 - made-up data, not secrets
    ops = list(_OP_WEIGHTS)
    weights = list(_OP_WEIGHTS.values())
    end = time.time()
    days = days_for(rows)
    begin = end - days * 86400
    step = (end - begin) / rows
    per_session = 50
    conn = connect(path, synchronous="normal")
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN IMMEDIATE")
        sessions = []
        for n in range(rows // per_session + 1):
            started = begin + n * per_session * step
            sessions.append(
                (
                    f"s{n:07d}",
                    f"u{rng.randrange(USERS)}",
                    f"10.0.{n % 250}.{n % 199}",
                    30000 + n % 30000,
                    "SSH-2.0-OpenSSH_9.2",
                    "publickey",
                    "ok",
                    started,
                    started + per_session * step,
                )
            )
        conn.executemany(
            "INSERT INTO sessions (id, login, remote_addr, remote_port, client_version,"
            " auth_method, result, started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            sessions,
        )
        chosen = rng.choices(ops, weights, k=rows)
        batch: list[tuple[Any, ...]] = []
        for i, op in enumerate(chosen):
            sid, login, addr = sessions[i // per_session][:3]
            ok = rng.random() > 0.03
            closing = op == "close"
            batch.append(
                (
                    begin + i * step,
                    sid,
                    login,
                    addr,
                    op,
                    f"/uploads/{login}/file{i % 977}.mp4"
                    if op not in ("login", "logout")
                    else None,
                    f"/uploads/{login}/renamed{i % 977}.mp4" if op == "rename" else None,
                    0x1A if op == "open" else None,
                    0o644 if op == "open" else None,
                    json.dumps({"entries": i % 40}) if op == "list" else None,
                    0 if closing else None,
                    rng.randrange(1, 200_000_000) if closing else None,
                    round(rng.random() * 2000, 3) if closing else None,
                    "ok" if ok else "permission_denied",
                    None if ok else "denied by the jail",
                )
            )
            if len(batch) >= 50_000:
                _insert(conn, batch)
                batch = []
        _insert(conn, batch)
        conn.execute("COMMIT")
        count = int(conn.execute("SELECT count(*) FROM operations").fetchone()[0])
    finally:
        conn.close()
    return count, begin + (rows - 1) * step


def _insert(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO operations (ts, session_id, login, remote_addr, op, path, path2, flags, mode,"
        " attrs, bytes_read, bytes_written, duration_ms, status, message)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        batch,
    )


def time_query(config: Path, argv: list[str], runs: int) -> tuple[list[float], int]:
    """Seconds of each ``sftpgate journal`` run (stdout to /dev/null); and its exit code."""
    times, code = [], 0
    with open(os.devnull, "w") as devnull:
        for _ in range(runs):
            with contextlib.redirect_stdout(devnull):
                start = time.perf_counter()
                code = sftpgate_main(["journal", "--config", str(config), *argv])
                times.append(time.perf_counter() - start)
    return times, code


def run(servers: Servers, options: Options) -> list[Figure]:
    workdir = servers.workdir / "journal-bench"
    workdir.mkdir(exist_ok=True)

    write_db = workdir / "writes.sqlite3"
    for leftover in workdir.glob("writes.sqlite3*"):
        leftover.unlink()
    seconds, written, batches = measure_writes(write_db, options.journal_ops)
    rate = options.journal_ops / seconds
    writes = Figure(
        number=7,
        title="journal: sustained operations/s (group-commit writer, synchronous=full)",
        measured=(
            f"{rate:,.0f} ops/s ({options.journal_ops:,} events in {seconds:.2f} s, "
            f"{batches} commits)"
        ),
        value=rate,
        target=">= 20000",
        notes=(
            "JournalWriter driven directly in the bench process: events built first, then "
            "emitted back to back; the clock stops when the last one is committed."
        ),
        extra={
            "events": options.journal_ops,
            "rows": written,
            "batches": batches,
            "seconds": seconds,
        },
    )

    query_db = workdir / "query.sqlite3"
    for leftover in workdir.glob("query.sqlite3*"):
        leftover.unlink()
    inserted_start = time.perf_counter()
    rows, newest = build_journal(query_db, options.journal_rows)
    build_seconds = time.perf_counter() - inserted_start
    config = workdir / "journal.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "state_dir": str(workdir / "state"),
                    "host_keys_dir": str(workdir / "hostkeys"),
                },
                "journal": {"path": str(query_db)},
                "log": {"level": "warning"},
            }
        )
    )
    since = datetime.fromtimestamp(newest - 86400).isoformat(timespec="seconds")
    argv = ["--user", "u7", "--op", "close", "--since", since, "--json"]
    times, code = time_query(config, argv, QUERY_RUNS + 1)
    kept = times[1:]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        sftpgate_main(["journal", "--config", str(config), *argv])
    printed = [json.loads(line) for line in captured.getvalue().splitlines()]
    conn = connect(query_db, readonly=True)
    try:
        matched = int(
            conn.execute(
                "SELECT count(*) FROM operations WHERE login = 'u7' AND op = 'close' AND ts >= ?",
                (datetime.fromisoformat(since).timestamp(),),
            ).fetchone()[0]
        )
    finally:
        conn.close()
    query = Figure(
        number=7,
        title=f"journal: `sftpgate journal` filtered query over {rows:,} rows",
        measured=(
            f"{median(kept) * 1000:.0f} ms median of {len(kept)} "
            f"(first {times[0] * 1000:.0f} ms; {matched} rows printed)"
        ),
        value=median(kept),
        target="<= 0.3",
        notes=(
            "`sftpgate journal --user u7 --op close --since <1 day before the newest row> "
            "--json` through the CLI's main(), stdout to /dev/null; journal of "
            f"{USERS} users over {days_for(rows)} days, built in {build_seconds:.1f} s."
        ),
        extra={
            "inserted": options.journal_rows,
            "rows": rows,
            "matched": matched,
            "printed": len(printed),
            "printed_ok": all(r["login"] == "u7" and r["op"] == "close" for r in printed),
            "exit_code": code,
            "times": times,
            "argv": argv,
        },
    )
    return [writes, query]
