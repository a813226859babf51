"""``sftpgate journal``: search and follow the audit journal."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import NothingThere, UsageError
from ..events import Op
from ..journal import formats
from ..journal.query import JournalFilter, iter_operations, iter_transfers, max_id, parse_time
from ..journal.store import connect
from .common import add_config_option, config_from

HELP = "Search the audit journal by user, time, operation or path; show or follow it."

_OPS = tuple(op.value for op in Op)

Rows = Callable[[sqlite3.Connection, JournalFilter], Iterator[dict[str, Any]]]


class _Usage(Exception):
    """A bad option value; the message names the option."""


def register(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    parser.add_argument("--user", metavar="LOGIN", help="only this login")
    parser.add_argument(
        "--since", metavar="TIME", help="from this time: 15m, 2h, 1d, 1w ago, or 2026-11-23T10:00"
    )
    parser.add_argument("--until", metavar="TIME", help="before this time (same forms as --since)")
    parser.add_argument(
        "--op",
        action="append",
        default=[],
        metavar="OP[,OP...]",
        help=f"only these operations (repeatable): {', '.join(_OPS)}",
    )
    parser.add_argument(
        "--path", metavar="GLOB", help="path or rename target matches this glob (* crosses /)"
    )
    parser.add_argument("--session", metavar="ID", help="only this session id")
    parser.add_argument("--failed", action="store_true", help="only operations that failed")
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="only the last N matching rows (default: all; --follow then adds new ones)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object a line, for scripts")
    output.add_argument(
        "--xferlog",
        action="store_true",
        help="file transfers as wu-ftpd xferlog lines (for existing log tools)",
    )
    parser.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new rows as they arrive"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="with --follow, how often to look for new rows (default: 0.5)",
    )
    # For tests: stop following after this many seconds.
    parser.add_argument("--follow-for", type=float, default=None, help=argparse.SUPPRESS)


def _ops(values: Iterable[str]) -> tuple[str, ...]:
    chosen: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in _OPS:
                raise _Usage(f"--op: unknown operation {name!r} (one of: {', '.join(_OPS)})")
            if name not in chosen:
                chosen.append(name)
    return tuple(chosen)


def _time(option: str, text: str | None, now: float) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text, now)
    except ValueError as exc:
        raise _Usage(f"{option}: {exc}") from None


def _filter(args: argparse.Namespace, now: float) -> JournalFilter:
    """Build the filter from the options; raises _Usage naming the bad option."""
    ops = _ops(args.op)
    if ops and args.xferlog:
        raise _Usage("--op: not with --xferlog, which lists file transfers (closes) only")
    since = _time("--since", args.since, now)
    until = _time("--until", args.until, now)
    if since is not None and until is not None and since >= until:
        raise _Usage("--since: must be before --until")
    if args.limit is not None and args.limit < 1:
        raise _Usage("--limit: must be 1 or more")
    if args.interval <= 0:
        raise _Usage("--interval: must be greater than 0")
    return JournalFilter(
        user=args.user,
        since=since,
        until=until,
        ops=ops,
        path_glob=args.path,
        session=args.session,
        failed_only=args.failed,
        limit=args.limit,
    )


class _Output:
    """Prints rows in the chosen format and remembers the highest id seen."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.line: Callable[[dict[str, Any]], str] = formats.table_row
        self.header: str | None = formats.TABLE_HEADER
        if args.json or args.xferlog:
            self.line = formats.json_line if args.json else formats.xferlog_line
            self.header = None
        self.count = 0
        self.last_id = 0

    def rows(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            if self.header is not None:
                print(self.header, flush=True)
                self.header = None
            print(self.line(row), flush=True)
            self.count += 1
            self.last_id = max(self.last_id, int(row["id"]))


def _show(conn: sqlite3.Connection, flt: JournalFilter, rows: Rows, out: _Output) -> None:
    """Print what matches now; then ids up to the newest one are done, matching or not."""
    # One read transaction: the rows and the high-water mark come from the same snapshot.
    conn.execute("BEGIN")
    try:
        out.rows(rows(conn, flt))
        out.last_id = max(out.last_id, max_id(conn))
    finally:
        conn.execute("COMMIT")


def _has_schema(conn: sqlite3.Connection) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'operations'"
    ).fetchone()
    return found is not None


def _sleep_until(deadline: float | None, interval: float) -> bool:
    """Sleep one interval; False when the --follow-for deadline has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        return False
    time.sleep(
        interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
    )
    return True


def _follow(
    conn: sqlite3.Connection,
    flt: JournalFilter,
    rows: Rows,
    out: _Output,
    interval: float,
    deadline: float | None,
) -> None:
    new = replace(flt, limit=None)
    while _sleep_until(deadline, interval):
        _show(conn, replace(new, after_id=out.last_id), rows, out)


def _open(
    path: Path, follow: bool, interval: float, deadline: float | None
) -> sqlite3.Connection | None:
    """Open the journal read-only; with ``follow``, wait for it to be created.

    Returns None when, following, the deadline passed first. Raises
    :class:`NothingThere` when it is not there (not following) and
    ``sqlite3.Error`` when it cannot be opened.
    """
    if not path.exists():
        if not follow:
            raise NothingThere(
                f"journal {path} does not exist yet (nothing journaled so far, "
                "or journal.path in the config points elsewhere)"
            )
        print(f"sftpgate: journal {path} does not exist yet; waiting for it", file=sys.stderr)
        while not path.exists():
            if not _sleep_until(deadline, interval):
                return None
    conn = connect(path, readonly=True)
    # The writer creates the file a moment before the tables.
    while follow and not _has_schema(conn):
        if not _sleep_until(deadline, interval):
            conn.close()
            return None
    return conn


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    try:
        flt = _filter(args, time.time())
    except _Usage as exc:
        raise UsageError(str(exc)) from None
    deadline = None if args.follow_for is None else time.monotonic() + args.follow_for
    path = config.journal_path
    rows: Rows = iter_transfers if args.xferlog else iter_operations
    out = _Output(args)
    conn: sqlite3.Connection | None = None
    try:
        conn = _open(path, args.follow, args.interval, deadline)
        if conn is None:  # following, and the deadline came first
            return 0
        _show(conn, flt, rows, out)
        if args.follow:
            _follow(conn, flt, rows, out, args.interval, deadline)
        elif out.count == 0:
            print("sftpgate: no matching operations", file=sys.stderr)
    except KeyboardInterrupt:
        return 0
    except sqlite3.Error as exc:
        raise NothingThere(f"cannot read journal {path}: {exc}") from None
    finally:
        if conn is not None:
            conn.close()
    return 0
