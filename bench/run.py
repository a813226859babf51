"""Run the benchmarks side by side with their anchors and write docs/benchmarks.md.

    sudo .venv/bin/python -m bench.run              # every figure, full sizes
    .venv/bin/python -m bench.run --smoke           # tiny sizes (what the tests run)
    .venv/bin/python -m bench.run --only 1,3,8      # some figures

Needs root (it creates a throwaway bench user for the private sshd).
"""

from __future__ import annotations

import argparse
import importlib
import resource
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from .common import FULL, ROOT, SMOKE, Figure, Options, write_report
from .servers import Servers, running_servers

# figure numbers -> scenario module (each module's run() returns those figures)
SCENARIOS: dict[str, tuple[int, ...]] = {
    "transfer": (1, 2, 3, 9),
    "concurrency": (4, 5, 17),
    "latency": (6,),
    "journal": (7,),
    "pipeline": (8,),
    "subsystem": (10, 11, 12),
    "durability": (13,),
    "requests": (14, 15),
    "overload": (16,),
    "postgres": (18, 19),
}


def scenario(name: str) -> Callable[[Servers, Options], list[Figure]]:
    module = importlib.import_module(f"bench.scenarios.{name}")
    run: Callable[[Servers, Options], list[Figure]] = module.run
    return run


def run_all(options: Options, only: set[int] | None = None) -> list[Figure]:
    figures: list[Figure] = []
    with running_servers() as servers:
        for name, numbers in SCENARIOS.items():
            if only and not only.intersection(numbers):
                continue
            print(
                f"bench: {name} (figures {', '.join(map(str, numbers))})",
                file=sys.stderr,
                flush=True,
            )
            for figure in scenario(name)(servers, options):
                if not only or figure.number in only:
                    figures.append(figure)
                    print(
                        f"  {figure.number}. {figure.title}: {figure.measured} -> "
                        f"{figure.value:.3g} (target {figure.target}: "
                        f"{'met' if figure.met else 'NOT met'})",
                        file=sys.stderr,
                        flush=True,
                    )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--only", help="comma-separated figure numbers")
    parser.add_argument("--rounds", type=int, help="measured rounds per pair (default 6)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one size, e.g. --set big_mib=256 (for profiling; see Options)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="where to write the table (default docs/benchmarks.md)",
    )
    args = parser.parse_args(argv)
    options = SMOKE if args.smoke else FULL
    if args.rounds:
        options = replace(options, rounds=args.rounds)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in vars(options):
            parser.error(f"--set {item}: no such size (sizes: {', '.join(vars(options))})")
        options = replace(options, **{name: type(getattr(options, name))(value)})
    only = {int(n) for n in args.only.split(",")} if args.only else None
    if only:
        options = replace(options, only=frozenset(only))
    # 1,000 concurrent sessions need ~2,000 fds in the gateway, which inherits ours.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    figures = run_all(options, only)
    command = "sudo .venv/bin/python -m bench.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(
        write_report(
            figures,
            command.strip(),
            args.output,
            sizes={k: v for k, v in vars(options).items() if k != "only"},
        )
    )
    return 0 if all(f.met for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
