"""config.yaml: loading, path resolution, `file: key: message` errors, env overrides, CLI."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

from sftpgate.cli.main import COMMANDS, command_module, main
from sftpgate.config import SECTIONS, Config, User, check_homes, load_config, reference_markdown
from sftpgate.configschema import MARKER, spec_of, splice
from sftpgate.errors import ConfigError
from sftpgate.passwords import hash_password, verify_password

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "config.yaml"
HASH = hash_password("pw", log_n=10)
PUBKEY = (
    asyncssh.generate_private_key("ssh-ed25519", comment="test@key")
    .export_public_key("openssh")
    .decode("ascii")
    .strip()
)


@pytest.fixture(autouse=True)
def _no_sftpgate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ; keep a developer's SFTPGATE_* variables out of the tests."""
    for name in list(os.environ):
        if name.startswith("SFTPGATE_"):
            monkeypatch.delenv(name)


def _user(login: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "login": login,
        "name": login.title(),
        "surname": "Tester",
        "email": f"{login}@example.org",
        "home": f"homes/{login}",
        "password_hash": HASH,
    }
    data.update(extra)
    return data


BASE: dict[str, Any] = {
    "server": {
        "listen": "127.0.0.1",
        "port": 2222,
        "state_dir": "state",
        "host_keys_dir": "keys",
        "create_homes": True,
    },
    "smtp": {"host": "localhost", "port": 25, "from": "gate@example.org"},
    "log": {"level": "info", "json": False},
    "users": [_user("alice"), _user("bob"), _user("carol")],
}


def write(folder: Path, change: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Write BASE (optionally changed in place by ``change``) to folder/config.yaml."""
    data = copy.deepcopy(BASE)
    if change is not None:
        change(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(path: str | Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return str(info.value)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path, so a config loaded as "config.yaml" is named exactly that in errors."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- loading --------------------------------------------------------------------------------


def test_demo_config_loads() -> None:
    config = load_config(DEMO, environ={})
    assert config.path == DEMO
    assert config.server.listen == "127.0.0.1"
    assert config.server.port == 2222
    assert config.server.create_homes is True
    assert config.server.state_dir == REPO / "demo" / "state"
    assert config.server.host_keys_dir == REPO / "hostkeys"
    assert config.journal_path == REPO / "demo" / "state" / "journal.sqlite3"
    assert config.journal.synchronous == "full"
    assert config.smtp.sender == "sftpgate@localhost"
    assert config.log.level == "info"
    assert config.log.json is False
    [demo] = config.users
    assert demo.login == "demo"
    assert demo.email == "demo@localhost"
    assert demo.home == REPO / "demo" / "home" / "demo"
    assert demo.authorized_keys == ()
    assert demo.password_hash is not None
    assert verify_password("demo", demo.password_hash)
    assert config.user("demo") is demo
    assert config.user("nobody") is None


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def change(data: dict[str, Any]) -> None:
        data["journal"] = {"path": "db/journal.sqlite3"}
        data["smtp"]["password_file"] = "secrets/smtp"
        data["users"][1]["home"] = str(tmp_path / "absolute-home")

    path = write(tmp_path / "etc", change)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config("../etc/config.yaml", environ={})
    etc = (tmp_path / "etc").resolve()
    assert config.path == path.resolve()
    assert config.server.state_dir == etc / "state"
    assert config.server.host_keys_dir == etc / "keys"
    assert config.journal_path == etc / "db" / "journal.sqlite3"
    assert config.smtp.password_file == etc / "secrets" / "smtp"
    assert config.users[0].home == etc / "homes" / "alice"
    assert config.users[1].home == (tmp_path / "absolute-home").resolve()


def test_home_with_tilde_expands_to_the_users_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    path = write(tmp_path, lambda d: d["users"][0].update(home="~/sftp"))
    assert load_config(path, environ={}).users[0].home == (tmp_path / "me" / "sftp").resolve()


def test_empty_config_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# nothing yet\n")
    config = load_config(path, environ={})
    assert config.server.port == 2222
    assert config.users == ()


def test_user_with_only_authorized_keys_loads(tmp_path: Path) -> None:
    def change(data: dict[str, Any]) -> None:
        del data["users"][0]["password_hash"]
        data["users"][0]["authorized_keys"] = [PUBKEY + "  "]

    user = load_config(write(tmp_path, change), environ={}).users[0]
    assert user.password_hash is None
    assert user.authorized_keys == (PUBKEY,)


def test_single_authorized_key_may_be_given_as_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, lambda d: d["users"][0].update(authorized_keys=PUBKEY))
    assert load_config(path, environ={}).users[0].authorized_keys == (PUBKEY,)


# --- errors name the file and the key --------------------------------------------------------


def test_bad_email_names_file_and_key(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["users"][2].update(email="carol.example.org"))
    assert error_of("config.yaml") == "config.yaml: users[2].email: not an email address"


def test_error_names_the_file_as_given(tmp_path: Path) -> None:
    path = write(tmp_path, lambda d: d["users"][2].update(email="nope"))
    assert error_of(path) == f"{path}: users[2].email: not an email address"


def test_unknown_top_level_key_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d.update(colour="blue"))
    assert error_of("config.yaml") == "config.yaml: colour: unknown key"


def test_unknown_key_inside_server_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["server"].update(prot=22))
    assert error_of("config.yaml") == "config.yaml: server.prot: unknown key"


def test_unknown_key_inside_a_user_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["users"][1].update(quota="10G"))
    assert error_of("config.yaml") == "config.yaml: users[1].quota: unknown key"


@pytest.mark.parametrize(("value", "got"), [("2222x", "str"), (True, "bool"), (22.5, "float")])
def test_wrong_type_for_server_port_names_key_and_type(in_tmp: Path, value: Any, got: str) -> None:
    write(in_tmp, lambda d: d["server"].update(port=value))
    message = error_of("config.yaml")
    assert message.startswith("config.yaml: server.port: must be a")
    assert message.endswith(f"got {got}")


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_port_out_of_range_is_reported(in_tmp: Path, port: int) -> None:
    write(in_tmp, lambda d: d["server"].update(port=port))
    assert error_of("config.yaml") == "config.yaml: server.port: must be a port number (0-65535)"


def test_smtp_port_out_of_range_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["smtp"].update(port=70000))
    assert error_of("config.yaml") == "config.yaml: smtp.port: must be a port number (0-65535)"


def test_section_that_is_not_a_mapping_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d.update(server=["port", 22]))
    assert error_of("config.yaml") == "config.yaml: server: must be a mapping"


def test_bad_choice_lists_the_allowed_values(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["log"].update(level="loud"))
    assert error_of("config.yaml") == (
        "config.yaml: log.level: must be one of debug, info, warning, error"
    )


def test_missing_home_of_first_user_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["users"][0].pop("home"))
    assert error_of("config.yaml") == "config.yaml: users[0].home: is required"


def test_missing_name_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["users"][1].update(name="  "))
    assert error_of("config.yaml") == "config.yaml: users[1].name: is required"


def test_user_without_password_hash_or_keys_is_an_openssh_only_user(in_tmp: Path) -> None:
    # Such a user logs in through sshd (`sftpgate subsystem`); `serve` can never let them in.
    write(in_tmp, lambda d: d["users"][0].pop("password_hash"))
    user = load_config(in_tmp / "config.yaml", environ={}).users[0]
    assert (user.password_hash, user.authorized_keys) == (None, ())


@pytest.mark.parametrize(
    "line",
    [
        "not a key",
        "ssh-ed25519 AAAAnotbase64!!! x@y",
        'no-pty,command="x" ' + PUBKEY,  # options are not allowed
    ],
)
def test_bad_authorized_key_line_names_its_index(in_tmp: Path, line: str) -> None:
    write(in_tmp, lambda d: d["users"][1].update(authorized_keys=[PUBKEY, line]))
    assert error_of("config.yaml").startswith(
        "config.yaml: users[1].authorized_keys[1]: not an OpenSSH public key"
    )


def test_authorized_key_that_is_not_a_string_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["users"][0].update(authorized_keys=[{"key": PUBKEY}]))
    assert error_of("config.yaml").startswith(
        "config.yaml: users[0].authorized_keys[0]: must be a string"
    )


@pytest.mark.parametrize(
    ("bad_hash", "reason"),
    [
        ("plaintext-password", "not a supported hash"),
        ("$scrypt$ln=10,r=8$c2FsdA$AAAA", "malformed scrypt hash"),
        ("$2b$12$short", "bcrypt hash has the wrong length"),
    ],
)
def test_malformed_password_hash_is_reported(in_tmp: Path, bad_hash: str, reason: str) -> None:
    write(in_tmp, lambda d: d["users"][2].update(password_hash=bad_hash))
    assert error_of("config.yaml").startswith(f"config.yaml: users[2].password_hash: {reason}")


def test_duplicate_login_is_reported_at_the_second_user(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["users"][2].update(login="alice"))
    assert error_of("config.yaml") == "config.yaml: users[2].login: duplicate login 'alice'"


@pytest.mark.parametrize("login", ["Alice", "al ice", "9lives", "../etc", "a" * 33, "al/ice"])
def test_invalid_login_is_reported(in_tmp: Path, login: str) -> None:
    write(in_tmp, lambda d: d["users"][0].update(login=login))
    assert error_of("config.yaml").startswith("config.yaml: users[0].login: must be lowercase")


def test_user_entry_that_is_not_a_mapping_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d["users"].append("dave"))
    assert error_of("config.yaml") == "config.yaml: users[3]: must be a mapping"


def test_users_that_is_not_a_list_is_reported(in_tmp: Path) -> None:
    write(in_tmp, lambda d: d.update(users={"alice": {}}))
    assert error_of("config.yaml") == "config.yaml: users: must be a list"


def test_invalid_yaml_is_reported(in_tmp: Path) -> None:
    (in_tmp / "config.yaml").write_text("server:\n  port: [2222\n")
    assert error_of("config.yaml").startswith("config.yaml: not valid YAML")


def test_top_level_that_is_not_a_mapping_is_reported(in_tmp: Path) -> None:
    (in_tmp / "config.yaml").write_text("- a\n- b\n")
    assert error_of("config.yaml") == "config.yaml: the top level must be a mapping"


def test_missing_file_is_reported(in_tmp: Path) -> None:
    assert error_of("missing.yaml") == "missing.yaml: cannot read: No such file or directory"


def test_directory_instead_of_file_is_reported(in_tmp: Path) -> None:
    (in_tmp / "conf.d").mkdir()
    assert error_of("conf.d") == "conf.d: cannot read: Is a directory"


def test_file_that_is_not_utf8_is_reported(in_tmp: Path) -> None:
    (in_tmp / "config.yaml").write_bytes(b"server:\n  listen: \xff\xfe\n")
    assert error_of("config.yaml").startswith("config.yaml: not UTF-8 text")


# --- environment overrides -------------------------------------------------------------------


def test_env_override_of_port_keeps_int_type(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), environ={"SFTPGATE_SERVER__PORT": "2300"})
    assert config.server.port == 2300


def test_env_override_of_log_json_is_a_bool(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), environ={"SFTPGATE_LOG__JSON": "true"})
    assert config.log.json is True


def test_fast_paths_off_is_read_as_written_though_yaml_calls_it_false(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), environ={"SFTPGATE_SERVER__FAST_PATHS": "off"})
    assert config.server.fast_paths == "off"
    assert load_config(write(tmp_path), environ={}).server.fast_paths == "auto"
    with pytest.raises(ConfigError, match=r"server\.fast_paths: must be one of auto, off"):
        load_config(write(tmp_path), environ={"SFTPGATE_SERVER__FAST_PATHS": "on"})


def test_env_override_of_smtp_host_is_a_string(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), environ={"SFTPGATE_SMTP__HOST": "mail.example.org"})
    assert config.smtp.host == "mail.example.org"


def test_env_override_fills_a_section_missing_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, lambda d: d.pop("smtp"))
    config = load_config(path, environ={"SFTPGATE_SMTP__HOST": "mail.example.org"})
    assert config.smtp.host == "mail.example.org"


def test_env_override_fills_an_empty_section(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server:\nsmtp:\n")  # sections present but empty (None)
    config = load_config(path, environ={"SFTPGATE_SMTP__HOST": "mail.example.org"})
    assert config.smtp.host == "mail.example.org"


def test_env_override_of_unknown_key_is_reported_as_unknown_key(in_tmp: Path) -> None:
    write(in_tmp)
    assert error_of("config.yaml", {"SFTPGATE_SERVER__PROT": "22"}) == (
        "config.yaml: server.prot: unknown key"
    )
    assert error_of("config.yaml", {"SFTPGATE_SERVR__PORT": "22"}) == (
        "config.yaml: servr: unknown key"
    )


def test_env_override_with_wrong_type_is_reported(in_tmp: Path) -> None:
    write(in_tmp)
    message = error_of("config.yaml", {"SFTPGATE_SERVER__PORT": "twenty-two"})
    assert message.startswith("config.yaml: server.port: must be a")


def test_unrelated_variables_are_ignored(tmp_path: Path) -> None:
    environ = {"SFTPGATE_CONFIG": "/nowhere.yaml", "HOME": "/root", "SERVER__PORT": "1"}
    assert load_config(write(tmp_path), environ=environ).server.port == 2222


def test_process_environment_is_used_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFTPGATE_SERVER__PORT", "2301")
    assert load_config(write(tmp_path)).server.port == 2301


# --- homes -----------------------------------------------------------------------------------


def _no_create(data: dict[str, Any]) -> None:
    data["server"]["create_homes"] = False


def test_check_homes_reports_a_missing_home(tmp_path: Path) -> None:
    (tmp_path / "homes" / "alice").mkdir(parents=True)
    (tmp_path / "homes" / "carol").mkdir()
    config = load_config(write(tmp_path, _no_create), environ={})
    problems = check_homes(config)
    assert len(problems) == 1
    assert problems[0].startswith("config.yaml: users[1].home: ")
    assert str((tmp_path / "homes" / "bob").resolve()) in problems[0]
    assert "not a directory" in problems[0]


def test_check_homes_accepts_missing_homes_when_create_homes(tmp_path: Path) -> None:
    config: Config = load_config(write(tmp_path), environ={})
    assert config.server.create_homes is True
    assert check_homes(config) == []


def test_check_homes_accepts_existing_homes(tmp_path: Path) -> None:
    for login in ("alice", "bob", "carol"):
        (tmp_path / "homes" / login).mkdir(parents=True)
    assert check_homes(load_config(write(tmp_path, _no_create), environ={})) == []


# --- the declarations and their reference ---------------------------------------------------


@pytest.mark.parametrize("cls", [*SECTIONS.values(), User], ids=lambda cls: cls.__name__)
def test_every_key_is_declared_with_a_doc(cls: type[Any]) -> None:
    for f in dataclasses.fields(cls):
        assert spec_of(f).doc.strip(), f"{cls.__name__}.{f.name} has no doc"


def test_docs_configuration_md_is_generated_from_the_declarations() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert splice(text, reference_markdown()) == text, (
        "docs/configuration.md is out of date with sftpgate/config.py: run "
        "`sftpgate check-config --docs docs/configuration.md`"
    )


def test_reference_names_every_key_once() -> None:
    reference = reference_markdown().partition("## Keys that need a restart")[0]
    for section, cls in [*SECTIONS.items(), ("users[]", User)]:
        for f in dataclasses.fields(cls):
            name = spec_of(f).name or f.name
            assert reference.count(f"| `{section}.{name}` |") == 1, f"{section}.{name}"


def test_check_config_docs_prints_the_reference_without_reading_a_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config", "--config", "/nonexistent.yaml", "--docs"]) == 0
    assert capsys.readouterr().out == reference_markdown()


def test_check_config_docs_rewrites_only_what_follows_the_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "configuration.md"
    doc.write_text(f"# Ours\n\nhand-written\n\n{MARKER}\n\nstale table\n")
    assert main(["check-config", "--docs", str(doc)]) == 0
    assert doc.read_text() == f"# Ours\n\nhand-written\n\n{MARKER}\n\n{reference_markdown()}"


def test_check_config_docs_refuses_a_file_without_the_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "configuration.md"
    doc.write_text("# Ours\n")
    assert main(["check-config", "--docs", str(doc)]) == 2
    assert "no line" in capsys.readouterr().err
    assert doc.read_text() == "# Ours\n"


def test_smtp_from_is_read_into_sender(tmp_path: Path) -> None:
    path = write(tmp_path, lambda d: d["smtp"].update({"from": "Gate@Example.org"}))
    assert load_config(path, environ={}).smtp.sender == "Gate@Example.org"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("server", "io_threads", 0, "must be greater than 0"),
        ("journal", "commit_interval", -1, "must not be negative"),
        ("pipeline", "thumbnail_width", 321, "must be an even number of pixels"),
        ("pipeline", "output_dir", "../x", "must be a folder inside the home, without .."),
        ("pipeline", "patterns", ["*.mp4", ""], "must be a non-empty string"),
        ("email", "admin", "nobody", "not an email address"),
        ("log", "json", "yes", "must be true or false, got str"),
    ],
)
def test_each_rule_names_the_file_and_the_key(
    in_tmp: Path, section: str, key: str, value: Any, message: str
) -> None:
    write(in_tmp, lambda d: d.setdefault(section, {}).update({key: value}))
    where = f"{section}.{key}[1]" if isinstance(value, list) else f"{section}.{key}"
    assert error_of("config.yaml") == f"config.yaml: {where}: {message}"


def test_numbers_are_floats_where_a_float_is_declared(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, lambda d: d["server"].update(login_timeout=5)), {})
    assert config.server.login_timeout == 5.0
    assert isinstance(config.server.login_timeout, float)


# --- CLI -------------------------------------------------------------------------------------


def test_check_config_accepts_a_good_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path)
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{path}: ok (3 users, port 2222)"


def test_check_config_accepts_the_demo_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(DEMO)]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_config_rejects_a_bad_config_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, lambda d: d["users"][2].update(email="bad"))
    assert main(["check-config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"{path}: users[2].email: not an email address" in captured.err
    assert "ok" not in captured.out


def test_check_config_rejects_a_missing_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, _no_create)
    assert main(["check-config", "-c", str(path)]) == 2
    assert "users[0].home:" in capsys.readouterr().err


def test_check_config_applies_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SFTPGATE_SERVER__PORT", "2300")
    assert main(["check-config", "--config", str(write(tmp_path))]) == 0
    assert "port 2300" in capsys.readouterr().out


def test_serve_refuses_a_bad_config_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, lambda d: d["users"][2].update(email="bad"))
    assert main(["serve", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"{path}: users[2].email: not an email address" in captured.err
    assert "listening" not in captured.err
    assert not (tmp_path / "state").exists()


def test_serve_refuses_missing_homes_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, _no_create)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: users[0].home:" in err
    assert "listening" not in err


def test_hash_password_from_stdin_prints_a_verifiable_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert main(["users", "hash-password", "--stdin"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("$scrypt$")
    assert verify_password("pw", printed)
    assert not verify_password("pw\n", printed)


def test_hash_password_refuses_an_empty_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["users", "hash-password", "--stdin"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "empty password" in captured.err


def test_users_list_json_prints_the_demo_user(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["users", "list", "--config", str(DEMO), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "login": "demo",
            "name": "Demo",
            "surname": "User",
            "email": "demo@localhost",
            "home": str(REPO / "demo" / "home" / "demo"),
            "auth": "password",
        }
    ]


def test_users_list_shows_auth_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def change(data: dict[str, Any]) -> None:
        data["users"][1]["authorized_keys"] = [PUBKEY]
        del data["users"][2]["password_hash"]
        data["users"][2]["authorized_keys"] = [PUBKEY]

    assert main(["users", "list", "--config", str(write(tmp_path, change)), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["login"], r["auth"]) for r in rows] == [
        ("alice", "password"),
        ("bob", "password+publickey"),
        ("carol", "publickey"),
    ]


def test_users_list_with_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, lambda d: d["server"].update(port=-1))
    assert main(["users", "list", "--config", str(path)]) == 2
    assert f"{path}: server.port: must be a port number" in capsys.readouterr().err


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps help at $COLUMNS; make it wide enough to find one-line descriptions."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.usefixtures("wide")
def test_main_help_exits_0_with_a_description_and_the_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _help(["--help"], capsys)
    assert "SFTP gateway with an audit journal and an upload pipeline." in out
    for name in COMMANDS:
        assert name in out
        assert command_module(name).HELP in out


@pytest.mark.usefixtures("wide")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_exits_0_with_a_one_line_description(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    help_text = command_module(command).HELP
    assert help_text.strip() and "\n" not in help_text
    out = _help([command, "--help"], capsys)
    assert out.startswith("usage: sftpgate " + command)
    assert help_text in out.splitlines()


@pytest.mark.usefixtures("wide")
@pytest.mark.parametrize(
    ("action", "description"),
    [
        ("hash-password", "Print a password hash for users[].password_hash."),
        ("list", "List users."),
    ],
)
def test_users_actions_help_exits_0_with_a_description(
    action: str, description: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _help(["users", action, "--help"], capsys)
    assert description in out.splitlines()


def test_version_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert _help(["--version"], capsys).startswith("sftpgate ")


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: sftpgate" in capsys.readouterr().err


def test_packaged_subsystem_config_loads() -> None:
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "packaging" / "openssh" / "subsystem.yaml", environ={})
    assert config.subsystem.sftp_server == "/usr/lib/openssh/sftp-server"
    assert config.users == ()
