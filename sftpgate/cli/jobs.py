"""``sftpgate jobs``: list, show, retry and cancel pipeline jobs."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

from ..jobs.model import Job, JobState
from ..jobs.store import JobStore
from ..journal.formats import escape
from ..storage import open_backend
from .common import add_config_option, add_json_option, config_from

HELP = "List pipeline jobs, show one, retry a failed or dead one, cancel one, or list workers."


def register(parser: argparse.ArgumentParser) -> None:
    add_json_option(parser)  # `sftpgate jobs --json`: the list
    sub = parser.add_subparsers(dest="jobs_command", metavar="ACTION")
    ls = sub.add_parser("list", help="List jobs (the default).", description="List jobs.")
    ls.add_argument(
        "--state",
        action="append",
        default=[],
        choices=[s.value for s in JobState],
        help="only jobs in this state",
    )
    ls.add_argument("--user", metavar="LOGIN", help="only this user's jobs")
    ls.add_argument("--limit", type=int, default=100, help="the newest N jobs (default 100)")
    add_config_option(ls)
    add_json_option(ls)
    for name, text in (
        ("show", "Show one job with every step, its times and errors."),
        ("retry", "Queue a failed, dead or cancelled job again."),
        ("cancel", "Cancel a queued or running job."),
    ):
        action = sub.add_parser(name, help=text, description=text)
        action.add_argument("id", type=int)
        add_config_option(action)
        add_json_option(action)
    text = "List the registered worker processes (serve and worker) and their heartbeats."
    workers = sub.add_parser("workers", help=text, description=text)
    add_config_option(workers)
    add_json_option(workers)


def _age(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%dT%H:%M:%S")


def _line(job: Job) -> str:
    error = escape(job.last_error or "")
    return (
        f"{job.id:>6} {job.state.value:<10} {job.login:<12} {(job.step or '-'):<10}"
        f" {job.progress * 100:>5.0f}% {job.attempts:>2}/{job.max_attempts:<2}"
        f" {_age(job.created_at):>5}  {escape(job.path)}" + (f"  -- {error}" if error else "")
    )


def _show(job: Job) -> list[str]:
    lines = [
        f"job {job.id}: {job.state.value}" + (f" ({job.outcome})" if job.outcome else ""),
        f"  file      {escape(job.path)}",
        f"  user      {job.login}   session {job.session_id}   upload {job.upload_id}",
        f"  attempts  {job.attempts}/{job.max_attempts}   next run {_when(job.next_run_at)}",
        f"  created   {_when(job.created_at)}   started {_when(job.started_at)}"
        f"   finished {_when(job.finished_at)}",
        f"  progress  {job.progress * 100:.0f}%   step {job.step or '-'}",
        f"  email     {job.email_state.value}",
    ]
    if job.lease_owner and job.state is JobState.RUNNING:
        lines.append(f"  lease     {job.lease_owner} until {_when(job.lease_expires_at)}")
    elif job.lease_owner:
        lines.append(f"  digest    being sent by {job.lease_owner}")
    if job.pid:
        lines.append(f"  ffmpeg    pid {job.pid}")
    if job.last_error:
        lines.append(f"  error     {escape(job.last_error)}")
    lines.append("  steps")
    for name in ("probe", "transcode", "sidecar"):
        step: dict[str, Any] = job.steps.get(name, {})
        status = (
            "done"
            if step.get("finished")
            else ("failed" if step.get("error") else ("started" if step.get("started") else "-"))
        )
        detail = f"  {escape(step['error'])}" if step.get("error") else ""
        lines.append(
            f"    {name:<10} {status:<8} started {_when(step.get('started'))}"
            f"  finished {_when(step.get('finished'))}{detail}"
        )
    if job.data.get("rejected"):
        lines.append(f"  rejected  {escape(job.data['rejected'])}")
    outputs = job.data.get("outputs")
    if outputs:
        lines.append(
            f"  outputs   {escape(outputs['flv'])}, {escape(outputs['sidecar'])}, "
            f"{escape(outputs['poster'])}, {len(outputs['thumbnails'])} thumbnails"
        )
    return lines


def _workers(store: JobStore, lease: float, as_json: bool) -> None:
    """The registry: a worker silent for longer than a lease is shown as such (not dead:
    its jobs are only taken over once their leases expire)."""
    rows = store.workers()
    if as_json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return
    print(f"{'NODE':<20} {'PID':>7} {'STARTED':<19} {'HEARTBEAT':>9}  ID")
    for row in rows:
        beat = _age(row["heartbeat_at"])
        silent = time.time() - row["heartbeat_at"] > lease
        print(
            f"{escape(row['node']):<20} {row['pid']:>7} {_when(row['started_at']):<19}"
            f" {beat:>9}  {escape(row['id'])}" + ("  -- silent" if silent else "")
        )


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    store: Any = (
        open_backend(config).jobs() if config.database.url else JobStore(config.journal_path)
    )
    try:
        action = args.jobs_command or "list"
        if action == "workers":
            _workers(store, config.jobs.lease_seconds, args.json)
            return 0
        if action == "list":
            jobs = store.list(
                states=tuple(getattr(args, "state", []) or ()),
                login=getattr(args, "user", None),
                limit=getattr(args, "limit", 100),
            )
            if args.json:
                for job in jobs:
                    print(json.dumps(job.to_dict(), sort_keys=True))
            else:
                print(
                    f"{'ID':>6} {'STATE':<10} {'USER':<12} {'STEP':<10} {'PROG':>6}"
                    f" {'TRY':<5} {'AGE':>5}  FILE"
                )
                for job in jobs:
                    print(_line(job))
            return 0
        job = {"show": store.get, "retry": store.retry, "cancel": store.cancel}[action](args.id)
        if args.json:
            print(json.dumps(job.to_dict(), sort_keys=True))
        elif action == "show":
            print("\n".join(_show(job)))
        else:
            print(f"job {job.id}: {job.state.value}")
        return 0
    finally:
        store.close()
