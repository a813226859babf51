#!/usr/bin/env bash
# Set up everything sftpgate needs on a Debian machine, idempotently:
# Debian packages (as root), then a virtualenv in .venv with the package and
# its test tools. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(python3 python3-venv python3-pip openssh-client openssh-server openssh-sftp-server ffmpeg
    libcap2-bin util-linux curl rclone lftp
    postgresql  # initdb + pg_ctl for the PostgreSQL tests (tests/pg_kit.py)
    haproxy)  # a real load balancer sending the PROXY protocol (tests/test_proxy_protocol.py)
DEBIAN_PACKAGES+=(iproute2)  # ip netns: the cluster test's hosts (tests/netns_kit.py)
DEBIAN_PACKAGES+=(systemd)  # systemd-analyze verify on the units (tests/test_packaging.py)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

# Debian's interpreter by default: under OpenSSH, `sftpgate subsystem` runs as
# each SFTP user, so the venv's python must be executable by everyone (a
# python under /root, say, is not).
PYTHON=${PYTHON:-/usr/bin/python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: $PYTHON is older than 3.11; set PYTHON=/path/to/python3.11+" >&2
    exit 1
fi
want=$(readlink -f "$(command -v "$PYTHON")")
if [[ -x .venv/bin/python && $(readlink -f .venv/bin/python) != "$want" ]]; then
    echo "setup: .venv was made with another python; recreating it"
    rm -rf .venv
fi
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.sftpgate-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing sftpgate and its test tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
# `sftpgate subsystem` runs as each SFTP user, who cannot write __pycache__ here:
# without compiled bytecode every OpenSSH session would compile the tap's modules
# again (~30 ms). Cheap when nothing changed.
.venv/bin/python -m compileall -q sftpgate
echo "setup: ready"
