#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh Debian/Ubuntu machine (run as root):
# system tools, the pinned Python toolchain in .venv/, and the collection tree
# that Ansible and pytest import meshcapture.sidecar from. Fast when done.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
say() { printf 'setup: %s\n' "$*"; }

apt_install() {
    if [ -z "${apt_updated:-}" ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. System tools used by the module, the tests and the demo.
missing=()
for tool in iptables iptables-legacy ip6tables nft ip unshare python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "missing: ${missing[*]}"
    apt_install iptables nftables iproute2 util-linux python3
else
    say "system tools present"
fi
# The SSH scenario (molecule/ssh, tests/integration/test_ssh_operator.py)
# runs a real sshd inside a namespace.
# Installing it must not start an sshd in this machine's own namespace: while
# apt runs, a policy-rc.d (exit 101) keeps the package from starting it.
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
    say "missing: sshd"
    if [ -e /usr/sbin/policy-rc.d ]; then
        apt_install openssh-server
    else
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        apt_install openssh-server
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
fi

# 2. The virtualenv (recreated when missing or broken, e.g. its base
#    interpreter went away).
if ! .venv/bin/python -c '' >/dev/null 2>&1; then
    rm -rf .venv
    say "creating .venv with $(command -v python3)"
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv  # Debian/Ubuntu ship venv's pip bootstrap separately
        apt_install python3-venv
        python3 -m venv .venv
    fi
fi

# 3. The pinned toolchain, re-installed only when requirements.txt changed.
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
stamp=.venv/.requirements.sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "pip install -r requirements.txt"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
    printf '%s\n' "$want" >"$stamp"
else
    say "toolchain up to date"
fi

# 4. ansible_collections/meshcapture/sidecar -> the repository root.
coll=.cache/collections/ansible_collections/meshcapture
mkdir -p "$coll"
if [ "$(readlink "$coll/sidecar" 2>/dev/null)" != "../../../.." ]; then
    rm -rf "$coll/sidecar"
    ln -s ../../../.. "$coll/sidecar"
fi
say "collection at $REPO/$coll/sidecar"
