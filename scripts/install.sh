#!/usr/bin/env bash
# Production install of sftpgate on a Debian host, idempotently (docs/deploy.md,
# "Production install"): the package and its runtime dependencies only (no test
# tools, no openssh-server) in a virtualenv at /opt/sftpgate, the systemd units,
# and a config and an environment file where there are none (never overwritten).
#
# Run as root from a checkout or an unpacked release: bash scripts/install.sh
# Environment:
#   SFTPGATE_INSTALL_PREFIX  the virtualenv (default /opt/sftpgate; units point at its bin/sftpgate)
#   SFTPGATE_INSTALL_ROOT    prepended to /etc and /var paths (default empty: the real ones), for staging
#   PYTHON                   the interpreter (default Debian's /usr/bin/python3, 3.11 or newer)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=${SFTPGATE_INSTALL_PREFIX:-/opt/sftpgate}
root=${SFTPGATE_INSTALL_ROOT:-}
PYTHON=${PYTHON:-/usr/bin/python3}
# Everything installed is readable by all: under OpenSSH, `sftpgate subsystem`
# runs from this venv as each SFTP user. Private files get their modes below.
umask 022

if [[ $prefix != /* || ( -n $root && $root != /* ) ]]; then
    echo "install: SFTPGATE_INSTALL_PREFIX and SFTPGATE_INSTALL_ROOT must be absolute paths" >&2
    exit 1
fi

# Runtime Debian packages only: the interpreter, venv, and ffmpeg for the pipeline.
DEBIAN_PACKAGES=(python3 python3-venv ffmpeg)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "install: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "install: missing Debian packages: ${missing[*]} (run as root)" >&2
        exit 1
    fi
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install: $PYTHON is older than 3.11; set PYTHON=/path/to/python3.11+" >&2
    exit 1
fi

# The package from a copy of the sources: pip builds in the source tree, and
# the checkout stays as it was.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$src/pyproject.toml" "$src/README.md" "$src/sftpgate" "$work/"
find "$work/sftpgate" -name __pycache__ -prune -exec rm -rf {} +
if [[ ! -x $prefix/bin/python ]]; then
    echo "install: creating the virtualenv $prefix"
    "$PYTHON" -m venv "$prefix"
fi
echo "install: installing sftpgate (no test extras) into $prefix"
"$prefix/bin/python" -m pip install -q --disable-pip-version-check --no-input "$work"
"$prefix/bin/python" -I -c 'import sftpgate.cli.main'  # -I: not the checkout in the current folder

# The documents the units' Documentation= lines name.
doc=$prefix/share/doc/sftpgate
install -d "$doc/docs" "$doc/packaging"
install -m 0644 "$src/README.md" "$doc/"
install -m 0644 "$src"/docs/*.md "$doc/docs/"
cp -r "$src/packaging/." "$doc/packaging/"

# Units, pointed at this prefix. Always replaced: local changes belong in a
# drop-in (packaging/systemd/sftpgate.service.d/override.conf.example).
units=$root/etc/systemd/system
install -d "$units"
for unit in sftpgate.service sftpgate-worker.service; do
    text=$(<"$src/packaging/systemd/$unit")
    printf '%s\n' "${text//\/opt\/sftpgate\//$prefix/}" >"$work/$unit"
    install -m 0644 "$work/$unit" "$units/$unit"
done

# Config and environment: written only where absent, private to root (the
# config holds password hashes; the environment file may hold the SMTP password).
etc=$root/etc/sftpgate
install -d -m 0755 "$etc"
if [[ ! -e $etc/config.yaml ]]; then
    install -m 0600 "$src/packaging/config.example.yaml" "$etc/config.yaml"
    echo "install: wrote $etc/config.yaml (no users yet: add them, then sftpgate check-config)"
else
    echo "install: kept $etc/config.yaml"
fi
install -d -m 0755 "$root/etc/default"
if [[ ! -e $root/etc/default/sftpgate ]]; then
    install -m 0600 "$src/packaging/default/sftpgate" "$root/etc/default/sftpgate"
else
    echo "install: kept $root/etc/default/sftpgate"
fi

# OpenSSH mode's spool (subsystem.spool_dir's default): the unit makes /var
# read-only, so the daemon, which sets the mode at start, cannot create it.
install -d -m 1733 "$root/var/spool/sftpgate"

if [[ -z $root && -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi
echo "install: done. Then: systemctl enable --now sftpgate (and sftpgate-worker on worker hosts)"
