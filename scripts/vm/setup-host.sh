#!/usr/bin/env bash
# Installs what the VM scenario needs on the controller machine (run as root),
# only when missing: debootstrap (builds the Debian image), qemu (runs it),
# qemu-img (the per-test overlay disk), e2fsprogs (mke2fs -d turns the
# debootstrap tree into a disk image without mounting anything), dpkg-dev
# (dpkg-scanpackages indexes the VM's local package repository) and the
# ssh client. Fast when everything is there.
set -euo pipefail
say() { printf 'vm-setup: %s\n' "$*"; }

need=()
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v dpkg-scanpackages >/dev/null 2>&1 || need+=(dpkg-dev)
command -v mke2fs >/dev/null 2>&1 || [ -x /usr/sbin/mke2fs ] || need+=(e2fsprogs)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)

if [ "${#need[@]}" -eq 0 ]; then
    say "host tools present"
    exit 0
fi
# unique
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
say "apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
say "installed ${need[*]}"
