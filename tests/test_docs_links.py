"""The documentation's links lead somewhere, and the commands it names exist.

Every relative link in README.md and docs/*.md resolves to a file or folder of
this checkout, and a `#anchor` to a heading of its target (GitHub's slugs).
Every `sftpgate COMMAND [ACTION]` written in code (inline or a block) is a
command of the real parser, and its action one that command takes.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from sftpgate.cli.main import COMMANDS, build_parser, command_word

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
# `sftpgate` run as a program: first on a line of code (a shell line, an inline
# span) or the last part of a path (/opt/sftpgate/bin/sftpgate), then its words.
# Prose in a block ("restart sftpgate to apply it") is not an invocation.
INVOCATION = re.compile(r"(?:^\s*|/)sftpgate((?:[ \t]+[^\s`|;&#]+)+)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of ``page``: its headings' slugs, repeats numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", page.read_text())):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = INLINE_CODE.sub("", text)  # `[a](b)` in code is not a link
    return [m.group(1) for m in LINK.finditer(text)]


def code(page: Path) -> list[str]:
    """The page's code: each line of its fenced blocks, and each inline span."""
    text = page.read_text()
    out = [line for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    out += INLINE_CODE.findall(FENCE.sub("", text))
    return out


def actions() -> dict[str, set[str]]:
    """Each command's actions: its sub-commands, or the choices of its first positional."""
    out: dict[str, set[str]] = {}
    for name in COMMANDS:
        parser = build_parser(only=name)
        (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = sub.choices[name]
        found: set[str] = set()
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                found |= set(action.choices)
            elif not action.option_strings and action.choices:
                found |= {str(c) for c in action.choices}
        out[name] = found
    return out


def test_slugs_follow_githubs_rules() -> None:
    assert slug("The door: the defender, connection limits, algorithms") == (
        "the-door-the-defender-connection-limits-algorithms"
    )
    assert slug("`sftpgate jobs`") == "sftpgate-jobs"
    assert slug("What the tap trusts (OpenSSH mode)") == "what-the-tap-trusts-openssh-mode"
    assert slug("Figures 18-19: PostgreSQL (issue 18)") == "figures-18-19-postgresql-issue-18"


def test_the_link_checks_catch_a_broken_link_and_anchor(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n## A `b` c\n\n[x](p.md#a-b-c) [y](q.md) [z](#nope)\n")
    assert broken(page) == ["q.md: no such file", "#nope: no such heading in p.md"]


def broken(page: Path) -> list[str]:
    """What is wrong with ``page``'s relative links, as readable lines."""
    out = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, file:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            out.append(f"{target}: no such file")
            continue
        if anchor and (where.suffix != ".md" or anchor not in anchors(where)):
            out.append(f"{target}: no such heading in {where.name}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken(page) == []


def wrong_commands(page: Path) -> tuple[list[str], int]:
    """The page's `sftpgate ...` the parser would not take, and how many it names."""
    known = actions()
    wrong = []
    named = 0
    for snippet in code(page):
        for match in INVOCATION.finditer(snippet):
            words = match.group(1).split()
            name = command_word(words)
            if name is None:
                if all(w.startswith("-") for w in words):
                    continue  # `sftpgate --help`
                wrong.append(f"{snippet!r}: no command {words[0]!r}")
                continue
            named += 1
            rest = words[words.index(name) + 1 :]
            first = rest[0] if rest else None
            action = first and re.fullmatch(r"[a-z][a-z-]*", first)
            if known[name] and action and first not in known[name]:
                wrong.append(f"{snippet!r}: {name} has no action {first!r}")
    return wrong, named


def test_the_command_check_catches_an_unknown_command_and_action(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "Run `sftpgate jobz`, `sftpgate -c f jobs restart 1`, `sftpgate db migrate`.\n\n"
        "```sh\n/opt/sftpgate/bin/sftpgate journal purge\nsftpgate --help\n```\n"
        "```\nrestart sftpgate to apply it\n```\n"
    )
    wrong, named = wrong_commands(page)
    assert [w.split(": ", 1)[1] for w in wrong] == [
        "journal has no action 'purge'",
        "no command 'jobz'",
        "jobs has no action 'restart'",
    ]
    assert named == 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_sftpgate_command_named_exists(page: Path) -> None:
    wrong, named = wrong_commands(page)
    assert wrong == []
    if page.name in ("README.md", "cli.md", "journal.md", "jobs.md"):
        assert named, "the check found no command on a page that names many"
