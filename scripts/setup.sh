#!/usr/bin/env bash
# Install everything shoal needs on a fresh Debian machine: system packages (as root) and a
# virtual environment with the pinned Python packages in .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# clang-14 and libbpf-dev build the XDP program from source (src/shoal/dataplane/bpf/screen.c)
DEBS=(nftables libnftables1 iproute2 procps curl wrk netsniff-ng prometheus chromium nginx openssl systemd
      clang-14 libbpf-dev)
# Debian's own python3 makes virtual environments only with python3-venv
"$PY" -c "import ensurepip" >/dev/null 2>&1 || DEBS+=(python3-venv)
missing=()
for p in "${DEBS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -q >/dev/null
    # the tests run promtool, the Prometheus server and nginx as programs of their own, not as
    # services of this machine: no package may start a service while it installs
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    if ((made_policy)); then rm -f "$policy"; fi
fi

if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import shoal" 
.venv/bin/python -m shoal.dataplane.xdp build >/dev/null
