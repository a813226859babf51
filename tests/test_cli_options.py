"""Options anywhere on the line, --json on every listing, the exit codes documented.

Each command runs through ``main([...])`` on a real SQLite journal in a temp dir;
the same words are tried with -c/--json before and after the action.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from sftpgate.cli.main import COMMANDS, build_parser, command_word, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    home = tmp_path / "home"
    home.mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"state_dir": str(tmp_path / "state")},
                "users": [
                    {
                        "login": "alice",
                        "name": "A",
                        "surname": "L",
                        "email": "a@example.org",
                        "home": str(home),
                        "password_hash": "$2b$12$" + "a" * 53,
                    }
                ],
            }
        )
    )
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def lines(out: str) -> list[dict[str, object]]:
    """JSON Lines: every line one object."""
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(isinstance(row, dict) for row in rows), out
    return rows


def placements(words: list[str], cfg: str) -> list[list[str]]:
    """``-c FILE`` at the top, after the command word and at the end."""
    return [
        ["-c", cfg, *words],
        [words[0], "--config", cfg, *words[1:]],
        [*words, "-c", cfg],
        [f"--config={cfg}", *words],
    ]


@pytest.mark.parametrize(
    "words",
    [
        ["users", "list"],
        ["jobs"],
        ["jobs", "list"],
        ["jobs", "workers"],
        ["bans", "list"],
        ["db", "status"],
        ["check-config"],
    ],
)
def test_config_goes_anywhere(
    words: list[str], cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "db", "migrate", "-c", cfg)[0] == 0  # a journal to read
    outputs = set()
    for argv in placements(words, cfg):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv, err)
        outputs.add(out)
    assert len(outputs) == 1  # the same answer wherever the option stood


def test_a_config_after_the_action_wins_over_one_before(
    cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The sub-level copies are SUPPRESSed: no default of theirs undoes the top's value,
    # and a value given lower down is the one used.
    code, out, _ = run(capsys, "-c", str(tmp_path / "nope.yaml"), "users", "list", "-c", cfg)
    assert code == 0 and "alice" in out
    code, _, err = run(capsys, "-c", cfg, "users", "list", "-c", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


def test_jobs_show_retry_cancel_take_options_after_the_id(
    cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No job 1: NothingThere-like, exit 1, and the same wherever -c stands.
    for action in ("show", "retry", "cancel"):
        for argv in placements(["jobs", action, "1"], cfg):
            code, out, err = run(capsys, *argv, "--json")
            assert (code, out) == (1, ""), argv
            assert err.startswith("sftpgate: ") and "1" in err


@pytest.mark.parametrize(
    "words",
    [
        ["jobs", "--json"],
        ["jobs", "list", "--json"],
        ["jobs", "--json", "list"],
        ["jobs", "workers", "--json"],
        ["jobs", "--json", "workers"],
        ["users", "list", "--json"],
        ["users", "--json", "list"],
        ["bans", "list", "--json"],
        ["bans", "--json", "list"],
        ["db", "status", "--json"],
        ["db", "--json", "status"],
        ["journal", "--json"],
    ],
)
def test_json_before_or_after_the_action(
    words: list[str], cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Something to list in each: a ban (and its journal row), a registered worker.
    assert run(capsys, "bans", "add", "192.0.2.7", "-c", cfg)[0] == 0
    from sftpgate.config import load_config
    from sftpgate.jobs.store import JobStore

    store = JobStore(load_config(cfg).journal_path)
    try:
        store.register_worker("w1", 4242, time.time())
    finally:
        store.close()
    code, out, err = run(capsys, *words, "-c", cfg)
    assert code == 0, err
    rows = lines(out)
    if words[0] == "users":
        assert [r["login"] for r in rows] == ["alice"]
    elif words[0] == "bans":
        assert [(r["address"], r["active"]) for r in rows] == [("192.0.2.7", True)]
    elif words[0] == "db":
        assert rows == [
            {"backend": "sqlite", "version": rows[0]["latest"], "latest": rows[0]["latest"]}
        ]
    elif words[0] == "journal":
        assert [r["op"] for r in rows] == ["ban"]
    elif "workers" in words:
        assert [(r["id"], r["pid"]) for r in rows] == [("w1", 4242)]
    else:  # jobs: none yet; the text table would print a header, JSON prints nothing
        assert rows == []


def test_bans_add_and_remove_answer_in_json(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "-c", cfg, "bans", "--json", "add", "192.0.2.9", "--time", "60")
    assert code == 0
    (ban,) = lines(out)
    assert ban["address"] == "192.0.2.9" and ban["strikes"] == 1
    code, out, _ = run(capsys, "bans", "remove", "192.0.2.9", "--json", "-c", cfg)
    assert (code, lines(out)) == (0, [{"address": "192.0.2.9", "lifted": True}])
    code, out, err = run(capsys, "bans", "remove", "192.0.2.9", "-c", cfg)
    assert (code, out) == (1, "") and "not banned" in err


def test_users_hash_password_in_json(
    cfg: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from sftpgate.passwords import verify_password

    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    code, out, _ = run(capsys, "users", "hash-password", "--stdin", "--json", "-c", cfg)
    assert code == 0
    (row,) = lines(out)
    assert verify_password("secret", str(row["password_hash"]))


def test_json_is_refused_where_nothing_is_listed(
    cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No silent --json: commands that print no listing reject it as a usage error.
    for argv in (["serve", "--json"], ["worker", "--json"], ["--json", "jobs"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "-c", cfg])
        assert exc.value.code == 2
        assert "--json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["journal", "--since", "not a time"], 2),  # UsageError
        (["bans", "add", "not-an-ip"], 2),
        (["jobs", "show", "99"], 1),  # not there
        (["bans", "remove", "192.0.2.1"], 1),
    ],
)
def test_exit_codes_of_failures(
    argv: list[str], code: int, cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "-c", cfg]) == code
    assert capsys.readouterr().err.startswith("sftpgate: ")


def test_a_bad_config_is_2_wherever_it_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("users: nope\n")
    for argv in (["-c", str(bad), "jobs"], ["jobs", "list", "-c", str(bad)]):
        assert main(argv) == 2
        assert str(bad) in capsys.readouterr().err


def test_an_unknown_option_is_2(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "list", "--no-such", "-c", cfg])
    assert exc.value.code == 2


def test_the_command_word_is_found_past_the_top_options() -> None:
    assert command_word(["-c", "f", "bans", "list"]) == "bans"
    assert command_word(["--config", "f", "jobs"]) == "jobs"
    assert command_word(["--config=f", "db", "status"]) == "db"
    assert command_word(["-cf", "worker"]) == "worker"
    assert command_word(["--help"]) is None
    assert command_word(["-c", "jobs"]) is None  # "jobs" is the file here


def test_exit_codes_are_in_the_help_and_the_docs() -> None:
    epilog = build_parser().format_help()
    codes = {int(m) for m in re.findall(r"^  (\d+) ", epilog.split("exit codes:")[1], re.M)}
    assert codes == {0, 1, 2, 130, 143}
    # Every code an error class maps to is in the table.
    import sftpgate.errors
    import sftpgate.storage.ports

    for module in (sftpgate.errors, sftpgate.storage.ports):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, sftpgate.errors.SftpgateError):
                assert value.exit_code in codes, value
    page = (ROOT / "docs" / "cli.md").read_text()
    section = page.split("## Exit codes")[1].split("\n#")[0]
    assert {int(c) for c in re.findall(r"^\| `(\d+)` \|", section, re.M)} == codes


def test_every_command_takes_config_after_its_name(capsys: pytest.CaptureFixture[str]) -> None:
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: sftpgate {name}") and "--config" in out, name
