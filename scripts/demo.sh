#!/usr/bin/env bash
# Set up, then run the demo gateway: user "demo", password "demo", on 127.0.0.1:2222.
# Homes, journal, host keys and mail stay inside this checkout (demo/, hostkeys/).
# A local SMTP sink on 127.0.0.1:2525 stores the pipeline's emails in demo/mail/new/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p demo
.venv/bin/aiosmtpd -n -l 127.0.0.1:2525 -c aiosmtpd.handlers.Mailbox demo/mail &
smtp_pid=$!
trap 'kill "$smtp_pid" 2>/dev/null || true' EXIT
echo "demo: connect with:  sftp -P 2222 demo@127.0.0.1   (password: demo)"
echo "demo: upload a video; its .flv, thumbnails and .json appear in /converted,"
echo "demo: the email in demo/mail/new/. Journal:  .venv/bin/sftpgate journal -c config.yaml"
.venv/bin/sftpgate serve --config config.yaml
