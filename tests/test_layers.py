"""The layers DESIGN.md draws, checked on the import graph (parsed, never imported).

Front doors only produce events: they import neither the journal, the jobs
nor the pipeline, nor each other (what they share is ``sftpgate.sftp``, which
imports none of them, nor asyncssh). The pipeline does not import a front
door: the confinement it needs (``beneath``, ``identity``) lives where both
can use it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sftpgate"

# (importer prefix, imported prefix): never allowed.
FORBIDDEN = [
    ("sftpgate.frontdoor", "sftpgate.journal"),
    ("sftpgate.frontdoor", "sftpgate.jobs"),
    ("sftpgate.frontdoor", "sftpgate.pipeline"),
    ("sftpgate.frontdoor", "sftpgate.media"),
    ("sftpgate.frontdoor", "sftpgate.notify"),
    ("sftpgate.frontdoor", "sftpgate.subsystem"),
    ("sftpgate.subsystem", "sftpgate.journal"),
    ("sftpgate.subsystem", "sftpgate.jobs"),
    ("sftpgate.subsystem", "sftpgate.pipeline"),
    ("sftpgate.subsystem", "sftpgate.frontdoor"),
    ("sftpgate.pipeline", "sftpgate.frontdoor"),
    ("sftpgate.pipeline", "sftpgate.subsystem"),
    ("sftpgate.media", "sftpgate.frontdoor"),
    ("sftpgate.media", "sftpgate.journal"),
    ("sftpgate.media", "sftpgate.jobs"),
    ("sftpgate.beneath", "sftpgate.frontdoor"),
    ("sftpgate.identity", "sftpgate.frontdoor"),
    ("sftpgate.journal", "sftpgate.frontdoor"),
    ("sftpgate.journal", "sftpgate.pipeline"),
    # The shared SFTP core is pure: no front door, no storage, no asyncssh.
    ("sftpgate.sftp", "sftpgate.frontdoor"),
    ("sftpgate.sftp", "sftpgate.subsystem"),
    ("sftpgate.sftp", "sftpgate.journal"),
    ("sftpgate.sftp", "sftpgate.jobs"),
    ("sftpgate.sftp", "sftpgate.pipeline"),
    ("sftpgate.sftp", "asyncssh"),
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """What ``path`` imports (relative imports resolved; ``from x import y``: x and x.y)."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else node.module
            target = target or base
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(package_dir: Path = PACKAGE) -> list[str]:
    broken = set()
    for path in sorted(package_dir.rglob("*.py")):
        importer = module_name(path, package_dir)
        for imported in imports_of(path, package_dir):
            for source, target in FORBIDDEN:
                if within(importer, source) and within(imported, target):
                    broken.add(f"{importer} imports {imported}")
    return sorted(broken)


def test_no_layer_imports_what_it_must_not() -> None:
    assert not violations(), "\n".join(violations())


@pytest.mark.parametrize(
    "source",
    ["from ..journal import store\n", "from .. import pipeline\n", "import sftpgate.jobs.store\n"],
)
def test_the_check_fails_on_a_front_door_that_imports_storage(tmp_path: Path, source: str) -> None:
    package = tmp_path / "sftpgate"
    (package / "frontdoor").mkdir(parents=True)
    (package / "frontdoor" / "bad.py").write_text(source)
    (package / "frontdoor" / "good.py").write_text("from ..events import Event\n")
    assert violations(package) and all("frontdoor.bad" in v for v in violations(package))
