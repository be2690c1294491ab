#!/usr/bin/env bash
# One-command, idempotent setup for pdtb on Debian 12 / Ubuntu 24.04, as root.
# Installs the OS packages the testbed needs, creates .venv from the system python3
# (with --system-site-packages so Debian's mininet module imports) and installs the
# project with its test extras. A second run finds everything in place and changes nothing.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap.sh: run as root (Mininet, tc and iptables need it): sudo ./bootstrap.sh" >&2
    exit 1
fi

PACKAGES=(
    mininet iproute2 iptables ethtool iputils-ping procps
    iperf3 tcpdump tshark mosquitto mosquitto-clients
    openssh-server openssh-client sudo
    python3 python3-venv python3-dev python3-pip build-essential
    libnetfilter-queue-dev libnfnetlink-dev pkg-config
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing OS packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The testbed starts its own mosquitto per run; the distribution's system-wide broker is not used.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv from $PY"
    "$PY" -m venv --system-site-packages .venv
fi

stamp=.venv/.pdtb-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing pdtb and its test extras into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi

.venv/bin/python -c "import mininet.net, netfilterqueue, aiomqtt, scapy" \
    || { echo "bootstrap: the environment is incomplete (see errors above)" >&2; exit 1; }
echo "bootstrap: ready ($(.venv/bin/pdtb --version))"
