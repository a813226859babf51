#!/usr/bin/env bash
# Set up, then run everything CI runs: ruff, mypy and the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check sftpgate tests bench
.venv/bin/ruff format --check sftpgate tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
