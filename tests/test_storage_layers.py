"""All SQL lives in the storage adapters (DESIGN.md §4): nothing outside them speaks to a
database driver or holds SQL text. Parsed with ast, never imported; like test_layers.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sftpgate"

# The adapters: the SQLite journal, the SQLite job store, and every backend under storage/.
ADAPTERS = ("journal/", "jobs/store.py", "storage/")
DRIVERS = {"sqlite3", "psycopg", "psycopg_pool", "psycopg2", "asyncpg", "aiosqlite"}
# jobs/model.py types Job.from_row's argument as sqlite3.Row; it runs no SQL (the text check
# below still covers it).
DRIVER_IMPORT_ALLOWED = {"jobs/model.py"}
# SQL is written in capitals here (as every adapter does); prose is not.
SQL = re.compile(
    r"\b(SELECT\s[^\n;]*?\bFROM\s|INSERT\s+(OR\s+[A-Z]+\s+)?INTO\s|UPDATE\s+\w+\s+SET\s|"
    r"DELETE\s+FROM\s|CREATE\s+(TABLE|INDEX)\s|ALTER\s+TABLE\s|PRAGMA\s+\w+\s*=)"
)


def _outside_adapters() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if not rel.startswith(ADAPTERS):
            files.append(path)
    return files


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.partition(".")[0])
    return found


def test_no_module_outside_the_adapters_imports_a_database_driver() -> None:
    offenders = []
    for path in _outside_adapters():
        rel = path.relative_to(PACKAGE).as_posix()
        drivers = _imports(ast.parse(path.read_text(), str(path))) & DRIVERS
        if drivers and rel not in DRIVER_IMPORT_ALLOWED:
            offenders.append(f"{rel}: {sorted(drivers)}")
    assert offenders == []


def test_no_module_outside_the_adapters_holds_sql() -> None:
    offenders = []
    for path in _outside_adapters():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and SQL.search(text):
                rel = path.relative_to(PACKAGE).as_posix()
                offenders.append(f"{rel}:{node.lineno}: {text[:60]!r}")
    assert offenders == []


def test_the_checks_see_sql_and_drivers_where_they_are() -> None:
    # The adapters do hold SQL and import drivers: the patterns are not blind.
    store = PACKAGE / "journal" / "store.py"
    tree = ast.parse(store.read_text())
    assert "sqlite3" in _imports(tree)
    texts = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    assert sum(bool(SQL.search(t)) for t in texts) > 10
    assert not SQL.search("select a file from the list, then update the set")
    assert SQL.search("SELECT ts FROM uploads WHERE id = ?")  # the query pipeline.py ran
