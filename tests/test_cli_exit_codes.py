"""Exit codes come from one place: cli.main turns SftpgateError subclasses into them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from sftpgate.cli.main import main

CLI = Path(__file__).resolve().parent.parent / "sftpgate" / "cli"


def test_no_command_returns_an_error_code_of_its_own() -> None:
    # Commands raise (UsageError, ConfigError, NothingThere ...); only main maps.
    found = []
    for path in sorted(CLI.glob("*.py")):
        if path.name == "main.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Return)
                and isinstance(node.value, ast.Constant)
                and type(node.value.value) is int
                and node.value.value != 0
            ):
                found.append(f"{path.name}:{node.lineno}: return {node.value.value!r}")
    assert not found, found


def config(tmp_path: Path, **server: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"state_dir": str(tmp_path / "state"), **server},
                "users": [
                    {
                        "login": "alice",
                        "name": "A",
                        "surname": "L",
                        "email": "a@example.org",
                        "home": str(tmp_path / "missing-home"),
                        "password_hash": "$2b$12$" + "a" * 53,
                    }
                ],
            }
        )
    )
    return path


def test_each_failure_has_its_exit_code_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path)
    assert main(["check-config", "--config", str(path)]) == 2  # a home is missing
    assert "missing-home" in capsys.readouterr().err
    assert main(["journal", "--config", str(path)]) == 1  # no journal yet
    assert "does not exist yet" in capsys.readouterr().err
    assert main(["journal", "--config", str(path), "--since", "not a time"]) == 2
    assert capsys.readouterr().err.startswith("sftpgate: ")
