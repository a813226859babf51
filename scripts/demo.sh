#!/usr/bin/env bash
# Set up, then run the demo gateway: user "demo", password "demo", on 127.0.0.1:2222.
# Homes, journal and host keys stay inside this checkout (demo/, hostkeys/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "demo: connect with:  sftp -P 2222 demo@127.0.0.1   (password: demo)"
echo "demo: read the journal with:  .venv/bin/sftpgate journal --config config.yaml"
exec .venv/bin/sftpgate serve --config config.yaml
