#!/usr/bin/env bash
# Set up, then run everything CI runs: ruff, mypy, the whole pytest suite, and the front-door
# tests once more with asyncssh's internals off.
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
echo "== pytest: serve's front door again on asyncssh's public API only (server.fast_paths: off)"
SFTPGATE_SERVER__FAST_PATHS=off .venv/bin/pytest "$@" \
    tests/test_serve_*.py tests/test_openssh_client.py tests/test_interop_rclone_lftp.py \
    tests/test_curl_client.py tests/test_asyncssh_clients.py tests/test_symlink_order.py \
    tests/test_confinement_races.py tests/test_edge_sweep.py tests/test_limits_handles.py \
    tests/test_quota.py tests/test_memory_budget.py
