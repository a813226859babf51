"""``sftpgate journal``: search and follow the audit journal."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from ..config import Config
from ..errors import NothingThere, UsageError
from ..events import Op
from ..journal import formats
from ..journal.query import JournalFilter, parse_time
from ..storage import open_backend
from ..storage.ports import JournalCursor, JournalReader, StorageUnavailable
from .common import add_json_option, config_from

HELP = (
    "Search the audit journal by user, time, operation or path; show or follow it; "
    "`prune` removes old rows."
)

_OPS = tuple(op.value for op in Op)


class _Usage(Exception):
    """A bad option value; the message names the option."""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=("prune",),
        help="prune: remove rows older than --before (or journal.retention); never a job "
        "still queued or running, nor its upload",
    )
    parser.add_argument(
        "--before",
        metavar="TIME",
        help="with prune: remove rows older than this (400d, 12w, or 2026-01-01); "
        "default: journal.retention",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=5000,
        metavar="N",
        help="with prune: rows per transaction (default: 5000)",
    )
    parser.add_argument("--node", metavar="NAME", help="only sessions on this host")
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
    add_json_option(output)
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
        node=args.node,
    )


class _Output:
    """Prints rows in the chosen format and remembers where the journal was read to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.line: Callable[[dict[str, Any]], str] = formats.table_row
        self.header: str | None = formats.TABLE_HEADER
        if args.json or args.xferlog:
            self.line = formats.json_line if args.json else formats.xferlog_line
            self.header = None
        self.count = 0
        self.cursor: JournalCursor | None = None

    def row(self, row: dict[str, Any]) -> None:
        if self.header is not None:
            print(self.header, flush=True)
            self.header = None
        print(self.line(row), flush=True)
        self.count += 1


def _sleep_until(deadline: float | None, interval: float) -> bool:
    """Sleep one interval; False when the --follow-for deadline has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        return False
    time.sleep(
        interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
    )
    return True


def _show(reader: JournalReader, flt: JournalFilter, transfers: bool, out: _Output) -> None:
    out.cursor = reader.scan(flt, out.row, transfers=transfers, after=out.cursor)


def _first(
    reader: JournalReader,
    flt: JournalFilter,
    transfers: bool,
    out: _Output,
    follow: bool,
    interval: float,
    deadline: float | None,
) -> bool:
    """The first scan; following, wait for a journal to exist. False: the deadline came first."""
    told = False
    while True:
        try:
            _show(reader, flt, transfers, out)
            return True
        except NothingThere as exc:
            if not follow:
                raise
            if not told:
                print(f"sftpgate: {exc}; waiting for it", file=sys.stderr)
                told = True
        if not _sleep_until(deadline, interval):
            return False


def _prune(config: Config, args: argparse.Namespace) -> int:
    now = time.time()
    if args.before is not None:
        before = _time("--before", args.before, now)
        assert before is not None
    elif config.journal.retention is not None:
        before = now - config.journal.retention
    else:
        raise _Usage("prune: give --before, or set journal.retention in the config")
    if args.batch < 1:
        raise _Usage("--batch: must be 1 or more")
    pruner = open_backend(config).pruner()
    report = pruner.prune(before, batch=args.batch)
    if args.json:
        print(json.dumps({"before": before, "removed": report.removed}))
    else:
        stamp = formats.local_time(before)
        counts = ", ".join(f"{table} {n}" for table, n in report.removed.items())
        print(f"sftpgate: pruned {report.total} rows older than {stamp} ({counts})")
    return 0


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    try:
        if args.action == "prune":
            return _prune(config, args)
        flt = _filter(args, time.time())
    except _Usage as exc:
        raise UsageError(str(exc)) from None
    deadline = None if args.follow_for is None else time.monotonic() + args.follow_for
    out = _Output(args)
    reader = open_backend(config).reader()
    try:
        if not _first(reader, flt, args.xferlog, out, args.follow, args.interval, deadline):
            return 0  # following, and the deadline came first
        if args.follow:
            new = replace(flt, limit=None)
            while _sleep_until(deadline, args.interval):
                _show(reader, new, args.xferlog, out)
        elif out.count == 0:
            print("sftpgate: no matching operations", file=sys.stderr)
    except KeyboardInterrupt:
        if args.follow:
            return 0  # Ctrl-C is how a follow ends
        raise  # a listing cut short: 130, as for any other command
    except StorageUnavailable as exc:
        raise NothingThere(str(exc)) from None
    finally:
        reader.close()
    return 0
