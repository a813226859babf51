"""Packaging (issue 19 point 6): the systemd units, scripts/install.sh, the environment file.

The units are checked by ``systemd-analyze verify`` (Debian's systemd; the test
fails, never skips, without it: scripts/setup.sh installs it). A clean verify
prints nothing, and a misspelt key only prints a warning with exit status 0, so
any output counts as a failure. ``verify`` also refuses an ExecStart binary that
does not exist: the repository's units are verified with ExecStart pointed at
this checkout's venv, and the installed ones as install.sh wrote them, pointing
at the venv it made. install.sh runs for real (pip, a venv) into a temporary
prefix and a temporary root for /etc.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sftpgate.config import load_config

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "packaging" / "systemd"
UNIT_NAMES = ("sftpgate.service", "sftpgate-worker.service")
INSTALLED_PREFIX = "/opt/sftpgate/"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: scripts/setup.sh installs Debian's systemd")
    return found


def verify(*units: Path) -> str:
    """``systemd-analyze verify`` on ``units``: its output (empty when clean) and status."""
    done = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return f"{done.stdout}{done.stderr}".strip() + (
        "" if done.returncode == 0 else f"\n(exit {done.returncode})"
    )


def pointed_at(unit: Path, prefix: str, into: Path) -> Path:
    """A copy of ``unit`` in ``into`` whose /opt/sftpgate/ paths name ``prefix`` instead."""
    copy = into / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED_PREFIX, prefix.rstrip("/") + "/"))
    return copy


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            found.setdefault(name, []).append(value)
    return found


def test_units_verify_clean(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    copies = [pointed_at(UNITS / name, str(venv), tmp_path) for name in UNIT_NAMES]
    assert verify(*copies) == ""


def test_verify_catches_a_misspelt_key(tmp_path: Path) -> None:
    """The check above can fail: a typo in a unit is output, not silence."""
    venv = Path(sys.executable).parent.parent
    copy = pointed_at(UNITS / "sftpgate.service", str(venv), tmp_path)
    copy.write_text(copy.read_text().replace("UMask=0077", "UMaks=0077"))
    assert "UMaks" in verify(copy)


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_units_are_hardened(name: str) -> None:
    unit = directives(UNITS / name)
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"], "the homes' root must be writable"
    assert unit["ProtectHome"] == ["yes"]
    assert unit["PrivateTmp"] == ["yes"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["UMask"] == ["0077"]
    assert unit["EnvironmentFile"] == ["-/etc/default/sftpgate"]
    # sd_notify (test_sdnotify.py): only the main process speaks; SIGTERM to it alone.
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStart"][0].startswith(INSTALLED_PREFIX + "bin/sftpgate ")
    for doc in unit["Documentation"]:
        assert doc.startswith("file://" + INSTALLED_PREFIX + "share/doc/sftpgate/")
        # install.sh copies README.md and docs/ there: the file must be in the checkout
        assert (
            REPO / doc.removeprefix("file://" + INSTALLED_PREFIX + "share/doc/sftpgate/")
        ).is_file()


def test_serve_unit_waits_longer_than_the_drain() -> None:
    """systemd's SIGKILL must not cut a drain short: TimeoutStopSec above drain_timeout."""
    unit = directives(UNITS / "sftpgate.service")
    (stop,) = unit["TimeoutStopSec"]
    example = REPO / "packaging" / "config.example.yaml"
    drain = load_config(example, environ={}).server.drain_timeout
    assert int(stop) >= drain + 20


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_every_capability_is_real_and_explained(name: str) -> None:
    text = (UNITS / name).read_text()
    (caps,) = directives(UNITS / name)["CapabilityBoundingSet"]
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.fail("capsh is missing: scripts/setup.sh installs libcap2-bin")
    for cap in caps.split():
        known = subprocess.run(
            [capsh, f"--supports={cap.lower()}"], capture_output=True, timeout=60, check=False
        )
        assert known.returncode == 0, f"{name}: {cap} is not a capability"
        assert re.search(rf"^#.*\b{cap}\b", text, re.M), f"{name}: no comment says why {cap}"
    assert "CAP_NET_BIND_SERVICE" in caps.split() or name == "sftpgate-worker.service"
    for never in ("CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_CHOWN"):
        assert never not in caps.split()


def test_default_file_names_only_variables_sftpgate_reads() -> None:
    """Each variable in packaging/default/sftpgate is one sftpgate reads.

    SFTPGATE_CONFIG, a key override, or the SMTP password named by smtp.password_env.
    """
    text = (REPO / "packaging" / "default" / "sftpgate").read_text()
    names = re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", text, re.M)
    assert names
    example = REPO / "packaging" / "config.example.yaml"
    for name, value in names:
        if name == "SFTPGATE_CONFIG":
            assert "SFTPGATE_CONFIG" in (REPO / "sftpgate" / "cli" / "common.py").read_text()
        elif name.startswith("SFTPGATE_"):
            assert "__" in name, name
            config = load_config(example, environ={name: value})  # an unknown key is refused
            section, key = name.removeprefix("SFTPGATE_").lower().split("__")
            assert str(getattr(getattr(config, section), key)).lower() == value.lower()
        else:
            assert name == "SMTP_PASSWORD", f"{name}: sftpgate does not read it"
            assert f"smtp.password_env: {name}" in text


def test_install_script(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "sftpgate"
    root = tmp_path / "root"
    env = {**os.environ, "SFTPGATE_INSTALL_PREFIX": str(prefix), "SFTPGATE_INSTALL_ROOT": str(root)}
    run = ["bash", str(REPO / "scripts" / "install.sh")]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    python = prefix / "bin" / "python"
    imported = subprocess.run(
        [str(python), "-I", "-c", "import sftpgate, sftpgate.cli.main; print(sftpgate.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    # -I: the interpreter's own sys.path only, never this checkout in the current folder
    assert imported.stdout.startswith(str(prefix)), (
        "sftpgate must come from the new venv, not the checkout"
    )
    for tool in ("pytest", "paramiko", "aiosmtpd", "hypothesis", "mypy"):
        absent = subprocess.run(
            [str(python), "-I", "-c", f"import {tool}"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert absent.returncode != 0, f"{tool} is a test tool: not in a production install"
    assert (prefix / "bin" / "sftpgate").is_file()

    units = root / "etc" / "systemd" / "system"
    for name in UNIT_NAMES:
        unit = directives(units / name)
        assert unit["ExecStart"][0].startswith(f"{prefix}/bin/sftpgate ")
        for doc in unit["Documentation"]:
            assert Path(doc.removeprefix("file://")).is_file(), doc
    assert verify(*(units / name for name in UNIT_NAMES)) == ""

    spool = root / "var" / "spool" / "sftpgate"  # ReadWritePaths= of serve's unit
    assert stat.S_IMODE(spool.stat().st_mode) == 0o1733
    assert f"ReadWritePaths=-/{spool.relative_to(root)}" in (UNITS / "sftpgate.service").read_text()

    config = root / "etc" / "sftpgate" / "config.yaml"
    default = root / "etc" / "default" / "sftpgate"
    for private in (config, default):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            f"from sftpgate.config import load_config; print(load_config({str(config)!r}).users)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0 and loaded.stdout.strip() == "()", loaded.stderr

    # Run again: the admin's config and environment stay as they are.
    config.write_text("# edited by the admin\n")
    default.write_text("SFTPGATE_LOG__LEVEL=debug\n")
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert config.read_text() == "# edited by the admin\n"
    assert default.read_text() == "SFTPGATE_LOG__LEVEL=debug\n"
